"""Why copies into ordinary host memory are slow: the host side of `module.to("cpu")`, measured without a GPU.

A device-to-host copy into pageable memory (`module.to("cpu")`, `tensor.cpu()`) writes into a
tensor torch has just allocated. Large allocations come from fresh pages, so every 4 KiB page is
faulted in and zeroed by the kernel while the copy runs: the copy is bound by the host's page-fault
rate, not by the PCIe link. A host-to-device copy from pageable memory reads pages that already
exist (the weights), staged through the driver's pinned buffer at host memcpy speed.

This script times both host-side costs on one thread (as the CUDA driver's staging copy runs):
a copy into a freshly allocated tensor, and a copy into a reused one. The built-in hardware
profiles' `d2h` and `h2d_pageable` figures are set from these two mechanisms and the one GPU
measurement we have (H100, benchmarks/results/h100-2026-11-26-calibrated.yaml: 1.41 GB/s d2h,
8.47 GB/s pageable h2d).

    .venv/bin/python benchmarks/measure_host_copies.py [--gib 1] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def measure(nbytes: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    source = torch.ones(nbytes, dtype=torch.uint8)
    fresh = []
    for _ in range(repeats):
        start = time.perf_counter()
        target = torch.empty(nbytes, dtype=torch.uint8)  # fresh pages: faulted in during the copy
        target.copy_(source)
        fresh.append(nbytes / (time.perf_counter() - start))
        del target
    target = torch.empty(nbytes, dtype=torch.uint8)
    target.copy_(source)  # fault the pages in once
    reused = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        reused.append(nbytes / (time.perf_counter() - start))
    return {"bytes": nbytes, "repeats": repeats, "fresh_pages_GBps": statistics.median(fresh) / 1e9,
            "reused_pages_GBps": statistics.median(reused) / 1e9,
            "ratio_reused_over_fresh": statistics.median(reused) / statistics.median(fresh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes per copy, in GiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result = measure(int(args.gib * 2**30), args.repeats)
    print(f"copy into fresh pages (as d2h into pageable memory): {result['fresh_pages_GBps']:.2f} GB/s")
    print(f"copy into reused pages (as pageable h2d staging):      {result['reused_pages_GBps']:.2f} GB/s")
    print(f"reused / fresh: {result['ratio_reused_over_fresh']:.1f}x")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
