"""Check the planner against the runtime on a mid-size pipeline: predicted moves and peaks vs the trace.

An SD 1.5-sized pipeline (the built-in `sd15` architecture's configs: UNet 860M, CLIP-L text
encoder, VAE; random fp32 weights, no safety checker) is built once on the CPU; then, for each
policy below, `offloadkit.predict(pipe, policy, device="cpu")` is compared with what
`handle.trace` records over two calls (256x256, 2 steps by default):

- every event (component, action, bytes, stage) of both calls, in order;
- the per-stage weight peaks and the call's peak (`calls_summary()`);
- bytes moved per call.

It prints one row per policy with the predicted and recorded figures and whether they are
equal, and exits 1 if any differ. Run::

    .venv/bin/python benchmarks/check_predictions.py [--size 256] [--steps 2]

Takes a few minutes on 2 cores (building the model and the layer-streamed calls dominate).
The tiny pipelines are checked the same way in tests/test_predict.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

POLICIES = {
    "diffusers-default": "diffusers-default",
    "vae-resident": "vae-resident",
    "sequential": "sequential",
    "group (all)": {"version": 1, "components": {"*": {"strategy": "group"}}},
    "disk block unet": {"version": 1, "components": {"unet": {"strategy": "disk", "granularity": "block"}}},
    "copy-free + prefetch": {"version": 1, "components": {
        "*": {"strategy": "model", "transfer": "copy-free", "prefetch": True}}},
    "unet kept": {"version": 1, "components": {"unet": {"strategy": "model", "keep_on_device": True}}},
}


def build_sd15(seed: int = 0):
    """An SD 1.5-sized pipeline with random weights from the built-in configs."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from offloadkit.prediction.sizing import model_folder
    from offloadkit.tiny_parts import _clip_tokenizer

    folder = model_folder("sd15")

    def config(name):
        return json.loads((folder / name / "config.json").read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config("unet")).eval()
    vae = AutoencoderKL.from_config(config("vae")).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image height and width (default 256)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    import offloadkit
    from offloadkit.units import format_bytes

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = build_sd15()
    print(f"built SD 1.5-sized pipeline in {time.perf_counter() - start:.1f} s "
          f"(unet {format_bytes(sum(p.numel() * 4 for p in pipe.unet.parameters()))} fp32)")
    settings = offloadkit.CallSettings(height=args.size, width=args.size, steps=args.steps)

    def call():
        pipe(prompt="a lighthouse at dusk", num_inference_steps=args.steps, height=args.size, width=args.size,
             guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np")

    header = f"{'policy':<22} {'moved/call (pred = rec)':>26} {'peak (pred = rec)':>22} {'stages':>8} {'events':>7}  s"
    print(header)
    print("-" * len(header))
    failures = 0
    for label, policy in POLICIES.items():
        start = time.perf_counter()
        prediction = offloadkit.predict(pipe, policy, device="cpu", settings=settings)
        handle = offloadkit.apply(pipe, policy, device="cpu")
        try:
            call()
            call()
        finally:
            recorded_events = [[(e.component, e.action, e.bytes, e.stage) for e in handle.trace.for_call(c)]
                               for c in (1, 2)]
            summary = handle.trace.calls_summary()[-1]
            handle.remove()
        predicted_events = [[(e.component, e.action, e.bytes, e.stage) for e in prediction.events if e.call == c]
                            for c in (1, 2)]
        predicted_stages = {s.stage: s.traced_weights_bytes for s in prediction.stages
                            if s.traced_weights_bytes is not None}
        checks = {
            "events": predicted_events == recorded_events,
            "stages": predicted_stages == summary.stage_peak_bytes,
            "peak": prediction.traced_peak_bytes == summary.peak_resident_bytes,
            "moved": prediction.bytes_moved == summary.bytes_moved,
        }
        failures += not all(checks.values())
        mark = {True: "=", False: "!="}
        print(f"{label:<22} {format_bytes(prediction.bytes_moved):>11} {mark[checks['moved']]:>2} "
              f"{format_bytes(summary.bytes_moved):>11} {format_bytes(prediction.traced_peak_bytes):>9} "
              f"{mark[checks['peak']]:>2} {format_bytes(summary.peak_resident_bytes):>9} "
              f"{'equal' if checks['stages'] else 'DIFFER':>8} {'equal' if checks['events'] else 'DIFFER':>7}  "
              f"{time.perf_counter() - start:.0f}")
    print(f"\n{len(POLICIES) - failures} of {len(POLICIES)} policies: prediction equal to the trace "
          "(every event of two calls, per-stage and call peaks, bytes moved)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
