"""`stream` against diffusers' group offloading (block_level) on an SD 1.5-sized UNet, on the CPU.

One run compares, side by side, each in a fresh process (peak RSS is a per-process high-water mark):

- `plain`: the UNet with no offload (the reference output);
- `diffusers-group`: `apply_group_offloading(offload_type="block_level", num_blocks_per_group=1)`;
- `stream-0`: offloadkit `stream` with no resident block (`resident: 0`, `prefetch: 1`);
- `stream-half`: offloadkit `stream` with half the blocks resident (`resident: 50%`).

Each method runs `--forwards` UNet forwards at a fixed input and reports seconds per forward (median
after a warm-up), peak RSS and a fingerprint of the output; the report gives the time ratios to
diffusers' group offloading and whether every output equals the plain one bit for bit.

On the CPU, the execution device is host RAM: group offloading's "moves" are no-op `.to("cpu")`
calls, while `stream` really copies each streamed block into its pool buffer (the code path a GPU
runs, without side streams). So this measures `stream`'s bookkeeping and copy overhead against a
baseline that copies nothing; it says nothing of GPU speed (see bench_gpu.py --flux for that).

    python benchmarks/bench_stream_cpu.py                  # SD 1.5 UNet, 256x256 (32x32 latents)
    python benchmarks/bench_stream_cpu.py --size small     # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402
from bench_disk import SIZES, TIMESTEP  # noqa: E402  (the same UNet sizes as the disk benchmark)

METHODS = ("plain", "diffusers-group", "stream-0", "stream-half")


def _build(size: str, seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**SIZES[size]["config"]).eval().requires_grad_(False)


def _inputs(size: str, latent: int, seed: int):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed + 1)
    shape = SIZES[size]["latents"]
    sample = torch.randn((shape[0], shape[1], latent, latent), generator=generator)
    context = torch.randn(SIZES[size]["context"], generator=generator)
    return sample, torch.tensor(TIMESTEP), context


def _setup(method: str, unet):
    """(module to call, objects to keep alive)."""
    import torch

    if method == "plain":
        return unet, ()
    if method == "diffusers-group":
        from diffusers.hooks.group_offloading import apply_group_offloading

        apply_group_offloading(unet, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1)
        return unet, ()
    import offloadkit
    from offloadkit.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")  # the carrier: offloadkit applies policies to pipelines
    pipe.register_modules(unet=unet)
    resident = {"stream-0": 0, "stream-half": "50%"}[method]
    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "unet": {"strategy": "stream", "resident": resident, "prefetch": 1}}}, device="cpu")
    return pipe.unet, (pipe, handle)


def child(args) -> int:
    import hashlib

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    result = {"method": args.child, "ok": False}
    try:
        unet = _build(args.size, args.seed)
        module, keep = _setup(args.child, unet)
        sample, timestep, context = _inputs(args.size, args.latent, args.seed)
        times = []
        with torch.no_grad():
            for _ in range(args.forwards + 1):  # the first is a warm-up
                start = time.perf_counter()
                out = module(sample, timestep, encoder_hidden_states=context).sample
                times.append(time.perf_counter() - start)
        result.update(ok=True, seconds=times[1:], per_forward=statistics.median(times[1:]),
                      peak_rss=benchkit.ru_maxrss_bytes(),
                      output_sha=hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest())
        if keep:  # the UNet is called directly, outside pipeline calls (whose end records `stream` events)
            layout = keep[1].plan.component("unet").stream
            result["streamed_bytes_per_forward"] = layout.streamed_bytes
            result["layout"] = layout.summary()
    except Exception as exc:  # reported, not raised: the other methods still run
        result["error"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(args.result_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (32: 256x256 images)")
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    results = {}
    for method in args.methods:
        folder = tempfile.mkdtemp(prefix=f"bench-stream-{method}-")
        command = [sys.executable, os.path.abspath(__file__), "--child", method, "--result-dir", folder,
                   "--size", args.size, "--latent", str(args.latent), "--forwards", str(args.forwards),
                   "--threads", str(args.threads), "--seed", str(args.seed)]
        results[method] = benchkit.run_child(method, command, folder, args.timeout)
        r = results[method]
        line = f"{method:<16} " + (f"{r['per_forward']:.3f} s/forward  peak RSS {r['peak_rss'] / 2**30:.2f} GiB"
                                   if r.get("ok") else f"failed: {r.get('error')}")
        print(line, flush=True)
        if args.json:  # after every method: a cut-short run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)

    base = results.get("diffusers-group", {})
    reference = results.get("plain", {}).get("output_sha")
    print(f"\nSD 1.5-sized UNet ({args.size}), {args.latent}x{args.latent} latents, {args.forwards} forwards after a "
          f"warm-up, {args.threads} threads")
    print(f"{'method':<16} {'s/forward':>10} {'vs group':>9} {'peak RSS':>10} {'output':>10}  layout")
    for method, r in results.items():
        if not r.get("ok"):
            continue
        ratio = f"{r['per_forward'] / base['per_forward']:.2f}x" if base.get("ok") else "-"
        same = "same" if reference and r["output_sha"] == reference else ("-" if not reference else "DIFFERS")
        print(f"{method:<16} {r['per_forward']:>10.3f} {ratio:>9} {r['peak_rss'] / 2**30:>9.2f}G {same:>10}  "
              f"{r.get('layout', '')}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
