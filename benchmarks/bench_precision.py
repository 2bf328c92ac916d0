"""Declared precision on a mid-size model: planned size vs real size, time to apply, forward time, output drift.

An SD 1.5-sized UNet (the built-in `sd15` config: 860M parameters, random fp32 weights) is
built once on the CPU. For each precision rule below, a copy of it goes into a pipeline
under a policy `{unet: {strategy: model, <rule>}}` and this script reports, side by side:

- the UNet's size the plan predicts before anything is changed, and its size once applied
  (they must be equal), and what the trace records for its onload;
- the seconds `offloadkit.apply` takes (the cast or the quantization happens there);
- one UNet forward (batch 2, 32x32 latents = 256x256 images) relative to the unchanged model;
- the largest difference of that forward's output from the unchanged model's.

Run::

    .venv/bin/python benchmarks/bench_precision.py [--threads 2]

CPU only: the forward times say what casting or int8 costs on this CPU, not on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

RULES = {
    "float32 (unchanged)": {},
    "storage_dtype bfloat16": {"storage_dtype": "bfloat16", "compute_dtype": "float32"},
    "storage_dtype float8_e4m3fn": {"storage_dtype": "float8_e4m3fn", "compute_dtype": "float32"},
    "quantize int8 (torchao)": {"quantize": "int8", "quantize_with": "torchao"},
    "quantize int8 (quanto)": {"quantize": "int8", "quantize_with": "quanto"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import logging

    import torch

    logging.getLogger("torchao").setLevel(logging.ERROR)
    sys.path.insert(0, os.path.dirname(__file__))
    from check_predictions import build_sd15

    import offloadkit
    from offloadkit.units import format_bytes
    from offloadkit.tensor_bytes import module_bytes

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = build_sd15()
    original = pipe.unet
    print(f"built an SD 1.5-sized pipeline in {time.perf_counter() - start:.0f} s; "
          f"UNet {format_bytes(module_bytes(original))} fp32")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor(500)

    def forward(unet):
        with torch.no_grad():
            begin = time.perf_counter()
            out = unet(sample, timestep, encoder_hidden_states=text).sample
            return out, time.perf_counter() - begin

    header = (f"{'rule':<30} {'planned':>10} {'applied':>10} {'onload':>10} {'x fp32':>7} {'apply s':>8} "
              f"{'forward':>8} {'max diff':>9}")
    print(header)
    print("-" * len(header))
    baseline = base_seconds = None
    failures = 0
    for label, rule in RULES.items():
        unet = copy.deepcopy(original)
        pipe.register_modules(unet=unet)
        policy = {"version": 1, "components": {"unet": {"strategy": "model", **rule}}}
        planned = offloadkit.plan(pipe, policy, device="cpu").component("unet").bytes
        begin = time.perf_counter()
        handle = offloadkit.apply(pipe, policy, device="cpu")
        apply_seconds = time.perf_counter() - begin
        applied = module_bytes(unet)
        forward(unet)  # warm-up (first-call allocations, lazy kernels)
        out, seconds = forward(unet)
        onload = next((e.bytes for e in handle.trace if e.component == "unet" and e.action == "onload"), None)
        handle.remove()
        if baseline is None:
            baseline, base_seconds = out, seconds
        failures += planned != applied or onload != applied
        print(f"{label:<30} {format_bytes(planned):>10} {format_bytes(applied):>10} {format_bytes(onload):>10} "
              f"{applied / module_bytes(original):>7.2f} {apply_seconds:>8.1f} {seconds / base_seconds:>7.2f}x "
              f"{(out - baseline).abs().max().item():>9.2e}")
        del unet, handle
    print(f"\nplanned size == size after apply == trace onload bytes: "
          f"{'yes' if not failures else 'NO'} for all {len(RULES)} rules")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
