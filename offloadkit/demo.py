"""`offloadkit demo`: the main job end to end on a tiny pipeline built in code (no download, no GPU needed).

Runs the pipeline once without offloading for a reference, applies the policy,
runs it twice more, and shows the plan, the trace and whether outputs match.
"""

from __future__ import annotations

import time


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def run_demo(device: str = "cpu", policy: str = "diffusers-default", pipeline: str = "sdxl",
             dtype: str = "fp32") -> int:
    import numpy as np
    import torch

    import offloadkit
    from offloadkit import testing
    from offloadkit.accelerator import resolve_device

    target = resolve_device(device)
    torch_dtype = getattr(torch, _DTYPES[dtype])

    def build():
        return testing.tiny_pipeline(pipeline).to(torch_dtype)

    pipe = build()
    print(f"built a tiny {type(pipe).__name__} in code ({_parameters(pipe):,} parameters, {_DTYPES[dtype]})")

    # A policy that changes precision (`storage_dtype`, `quantize`) changes the numbers by design: its
    # reference is the same change with every model resident, so the comparison isolates the offloading.
    changed = {c.name: c.rule for c in offloadkit.plan(pipe, policy, device=str(target)).components
               if c.rule.precision_change}
    reference_pipe = build() if changed else pipe
    if changed:
        offloadkit.apply(reference_pipe, {"version": 1, "components": {
            name: {"strategy": "resident", **_precision(rule)} for name, rule in changed.items()}},
            device=str(target))
    else:
        pipe.to(target)
    reference = reference_pipe(**testing.tiny_call_kwargs(reference_pipe)).images
    if changed:
        offloadkit.remove(reference_pipe)
    else:
        pipe.to("cpu")

    started = time.perf_counter()
    handle = offloadkit.apply(pipe, policy, device=str(target))
    apply_ms = (time.perf_counter() - started) * 1e3
    print(f"\napplied {handle.plan.policy!r} in {apply_ms:.1f} ms\n")
    print(handle.plan)

    same = True
    for _ in range(2):
        images = pipe(**testing.tiny_call_kwargs(pipe)).images
        same = same and np.array_equal(images, reference)
    print("\ntrace of 2 calls:")
    print(handle.trace.summary())
    against = "the same precision change without offloading" if changed else "the pipeline without offloading"
    print(f"\noutputs identical to {against}: {'yes' if same else 'NO'}")
    handle.remove()
    return 0 if same else 1


def _precision(rule) -> dict:
    return {key: getattr(rule, key) for key in ("storage_dtype", "compute_dtype", "quantize", "quantize_with")
            if getattr(rule, key, None) not in (None, "auto")}


def _parameters(pipe) -> int:
    import torch

    return sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
