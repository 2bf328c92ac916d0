"""Measure the working memory of real forwards on CPU and compare it with offloadkit.prediction.activations' estimate.

Each case runs one inference forward (``torch.no_grad``, eval, float32) of a real model with
random weights and counts the peak bytes of the tensors the forward creates (weights and
inputs excluded) with ``offloadkit.prediction.activations.measure_peak``, a TorchDispatchMode that adds
each new storage when an op returns it and subtracts it when it is freed. CPU SDPA runs
PyTorch's flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``, printed
per case), which, like flash / memory-efficient attention on CUDA, never materialises the
tokens x tokens scores.

Cases: the tiny pipelines' components (``offloadkit.testing``) at two resolutions, and
mid-size models built from the built-in architectures' configs: full-size SD 1.5 UNet, SD VAE,
CLIP-L, Wan 2.1 VAE; SDXL's UNet, SD3.5-medium, FLUX.1-dev, Wan 2.1 1.3B and T5-XXL with fewer
layers (same widths, so the same per-layer activations; the peak is per layer, not per depth).

    .venv/bin/python benchmarks/measure_activations.py            # everything (a few minutes on 2 cores)
    .venv/bin/python benchmarks/measure_activations.py --tiny     # tiny pipelines only (seconds)
    .venv/bin/python benchmarks/measure_activations.py --only unet
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from offloadkit.prediction.activation_measurement import example_forward, measure_peak  # noqa: E402
from offloadkit.prediction.activations import working_memory  # noqa: E402
from offloadkit.prediction.sizing import _quiet_libraries, _read_json, _resolve_class, model_folder, read_model_index  # noqa: E402
from offloadkit.testing import tiny_pipeline  # noqa: E402

MiB = 2**20


def build(arch: str, component: str, **overrides):
    """A real (random-weight, float32, CPU) model from a built-in config, with `overrides` applied."""
    folder = model_folder(arch)
    library, class_name = read_model_index(folder)[1][component]
    cls = _resolve_class(library, class_name, where=folder, component=component)
    config = {**_read_json(folder / component / "config.json"), **overrides}
    config.pop("torch_dtype", None)
    torch.manual_seed(0)
    with _quiet_libraries():
        if hasattr(cls, "from_config"):
            module = cls.from_config(config)
        else:
            module = cls(cls.config_class.from_dict(config))
    return module.float().eval()


def tiny_cases():
    for name in ("sd", "sdxl", "sd3"):
        pipe = tiny_pipeline(name)
        for component, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            role = {"vae": "decode", "unet": "denoise", "transformer": "denoise"}.get(component, "encode")
            sizes = ((32, 32), (64, 64)) if role != "encode" else ((32, 32),)
            for h, w in sizes:
                # tiny VAEs have 2 levels: 2 pixels per latent
                yield f"tiny-{name} {component}", module, role, dict(height=h, width=w, latent_scale=2)


def _short_qwen_vl() -> dict:
    """Qwen2.5-VL-7B's text and vision configs with 2 text layers and 1 vision layer (same widths)."""
    config = _read_json(model_folder("qwen-image") / "text_encoder" / "config.json")
    return {"text_config": {**config["text_config"], "num_hidden_layers": 2, "max_window_layers": 2},
            "vision_config": {**config["vision_config"], "depth": 1, "fullatt_block_indexes": [0]}}


def mid_cases(only: str | None):
    plans = [
        ("sd15 unet", lambda: build("sd15", "unet"), "denoise", [dict(height=256, width=256),
                                                                dict(height=384, width=384, batch=1, guidance=False)]),
        ("sdxl unet (1 transformer layer/block)", lambda: build("sdxl", "unet", transformer_layers_per_block=[1, 1, 1]),
         "denoise", [dict(height=384, width=384), dict(height=512, width=512, guidance=False)]),
        ("sd vae", lambda: build("sd15", "vae"), "decode", [dict(height=256, width=256), dict(height=384, width=384)]),
        ("clip-l text", lambda: build("sd15", "text_encoder"), "encode", [dict(height=1, width=1)]),
        ("t5-xxl text (2 layers)", lambda: build("flux1-dev", "text_encoder_2", num_layers=2), "encode",
         [dict(height=1, width=1, text_tokens=256), dict(height=1, width=1, text_tokens=512)]),
        ("sd35-medium transformer (2 layers)", lambda: build("sd35-medium", "transformer", num_layers=2,
                                                             dual_attention_layers=[0]), "denoise",
         [dict(height=256, width=256), dict(height=512, width=512)]),
        ("flux1-dev transformer (1+1 layers)", lambda: build("flux1-dev", "transformer", num_layers=1,
                                                             num_single_layers=1), "denoise",
         [dict(height=256, width=256), dict(height=512, width=512)]),
        ("wan21-1.3b transformer (2 layers)", lambda: build("wan21-t2v-1.3b", "transformer", num_layers=2), "denoise",
         [dict(height=256, width=256, num_frames=9), dict(height=320, width=512, num_frames=17)]),
        ("wan21 vae", lambda: build("wan21-t2v-1.3b", "vae"), "decode",
         [dict(height=128, width=128, num_frames=5), dict(height=128, width=192, num_frames=9)]),
        ("qwen-image transformer (2 layers)", lambda: build("qwen-image", "transformer", num_layers=2), "denoise",
         [dict(height=256, width=256), dict(height=512, width=512, text_tokens=128)]),
        ("qwen2.5-vl text (2 layers)", lambda: build("qwen-image", "text_encoder", **_short_qwen_vl()), "encode",
         [dict(height=1, width=1, text_tokens=160), dict(height=1, width=1)]),
        ("qwen-image vae", lambda: build("qwen-image", "vae"), "decode",
         [dict(height=256, width=256), dict(height=384, width=512)]),
    ]
    for name, make, role, sizes in plans:
        if only and only not in name:
            continue
        module = make()
        for kwargs in sizes:
            yield name, module, role, kwargs
        del module
        gc.collect()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="only the tiny pipelines' components")
    parser.add_argument("--only", help="only mid-size cases whose name contains this")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cases = list(tiny_cases()) if not args.only else []
    print(f"{'component':42} {'size':>16} {'measured':>12} {'estimate':>12} {'ratio':>6} {'s':>5}  attention kernel")
    ratios = []

    def run(name, module, role, kwargs):
        call, inputs = example_forward(module, role=role, **kwargs)
        started = time.perf_counter()
        peak, kernels = measure_peak(module, call, inputs=inputs)
        seconds = time.perf_counter() - started
        estimate = working_memory(module, role=role, dtype="fp32", **kwargs)
        ratios.append(estimate / peak)
        size = (f"{kwargs['height']}x{kwargs['width']}" if role != "encode" else f"{kwargs.get('text_tokens', 'dflt')} tok")
        if kwargs.get("num_frames"):
            size += f"x{kwargs['num_frames']}f"
        print(f"{name:42} {size:>16} {peak / MiB:10.2f}Mi {estimate / MiB:10.2f}Mi {estimate / peak:6.2f} "
              f"{seconds:5.1f}  {','.join(sorted(kernels)) or '-'}", flush=True)

    for case in cases:
        run(*case)
    if not args.tiny:
        for case in mid_cases(args.only):
            run(*case)
    if ratios:
        print(f"\nestimate/measured over {len(ratios)} cases: min {min(ratios):.2f}, "
              f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
