"""Keeping offloadkit's per-forward bookkeeping out of `torch.compile` graphs.

A hook's `pre_forward` reads and writes Python state (residency flags, trace
counters, timers). Traced by dynamo, each of those becomes a guard or a graph
break, and a guard on a value that changes between calls (a call counter, a
residency flag) recompiles the model on the next call. Accelerate marks its own
hooks the same way (its private `accelerate.hooks._compiler_disable`, which this
mirrors rather than imports, being private).
"""

from __future__ import annotations

import functools


def compiler_disabled(fn):
    """`torch.compiler.disable(fn)`, made on first call so importing offloadkit does not import dynamo."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compiler.disable(fn)
        return compiled(*args, **kwargs)

    return wrapper
