"""`offloadkit demo`: the main job end to end on a tiny pipeline built in code (no download, no GPU needed).

Runs the pipeline once without offloading for a reference, applies the policy,
runs it twice more, and shows the plan, the trace and whether outputs match.
"""

from __future__ import annotations

import time


def run_demo(device: str = "cpu", policy: str = "diffusers-default", pipeline: str = "sdxl") -> int:
    import numpy as np

    import offloadkit
    from offloadkit import testing
    from offloadkit.accelerator import resolve_device

    target = resolve_device(device)
    pipe = testing.tiny_pipeline(pipeline)
    print(f"built a tiny {type(pipe).__name__} in code ({_parameters(pipe):,} parameters)")

    pipe.to(target)
    reference = pipe(**testing.tiny_call_kwargs(pipe)).images
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
    print(f"\noutputs identical to the pipeline without offloading: {'yes' if same else 'NO'}")
    handle.remove()
    return 0 if same else 1


def _parameters(pipe) -> int:
    import torch

    return sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
