"""Check the planner's memory figures against a process's real RSS, on the CPU, for a mid-size pipeline.

An SD 1.5-sized pipeline (`check_predictions.build_sd15`: UNet 860M, CLIP-L, VAE, random fp32
weights) runs one call (256x256, 2 steps) under each policy below, each in a fresh process. On
the CPU the execution device is host RAM too, so what the process holds during the call is the
planner's host RAM figure plus its device figure (weights on the "device" and working memory):

    predicted = max over the stages of (host RAM weights + device peak)   [StagePrediction: host_bytes,
                                                                           device_peak_bytes]
    measured  = peak RSS during the call (VmHWM, reset after `apply`) - RSS before the pipeline was built

It prints both and their ratio per policy, and exits 1 when a ratio is outside 0.9-1.1.

    .venv/bin/python benchmarks/check_host_ram.py [--policies model,stream] [--json out.json]

Each policy takes about a minute on 2 cores. MALLOC_MMAP_THRESHOLD_ is set for the children (glibc
keeps freed heap pages otherwise; see the disk tier's note).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402

POLICIES = {
    "model": "diffusers-default",
    "disk": {"version": 1, "components": {"unet": {"strategy": "disk", "granularity": "block"}}},
    "stream": {"version": 1, "components": {"unet": {"strategy": "stream", "resident": 0}}},
    "stream-half": {"version": 1, "components": {"unet": {"strategy": "stream", "resident": "50%"}}},
}


def child(name: str, folder: str, size: int, steps: int) -> int:
    import torch

    import offloadkit
    from check_predictions import build_sd15

    torch.set_num_threads(2)
    before = benchkit.read_status()["VmRSS"]
    pipe = build_sd15()
    settings = offloadkit.CallSettings(height=size, width=size, steps=steps)
    prediction = offloadkit.predict(pipe, POLICIES[name], device="cpu", settings=settings)
    handle = offloadkit.apply(pipe, POLICIES[name], device="cpu")
    benchkit.reset_hwm()
    pipe(prompt="a lighthouse at dusk", num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
         generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    peak = benchkit.read_status()["VmHWM"]
    handle.remove()
    result = {"method": name, "ok": True, "measured": peak - before, "baseline_rss": before,
              "predicted": max(s.host_bytes + s.device_peak_bytes for s in prediction.stages),
              "host_peak": prediction.host_peak_bytes, "device_peak": prediction.device_peak_bytes}
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(result, f)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.result_dir, args.size, args.steps)
    results, failures = {}, 0
    print(f"{'policy':<12} {'predicted':>10} {'measured':>10} {'ratio':>6}")
    for name in [p.strip() for p in args.policies.split(",") if p.strip()]:
        folder = tempfile.mkdtemp(prefix=f"check-ram-{name}-")
        command = [sys.executable, os.path.abspath(__file__), "--child", name, "--result-dir", folder,
                   "--size", str(args.size), "--steps", str(args.steps)]
        r = results[name] = benchkit.run_child(name, command, folder, 900,
                                               extra_env={"MALLOC_MMAP_THRESHOLD_": "1048576"})
        if not r.get("ok"):
            failures += 1
            print(f"{name:<12} failed: {r.get('error', '')[:300]}")
            continue
        ratio = r["predicted"] / r["measured"]
        r["ratio"] = ratio
        failures += not 0.9 <= ratio <= 1.1
        print(f"{name:<12} {r['predicted'] / 2**30:>9.2f}G {r['measured'] / 2**30:>9.2f}G {ratio:>6.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
