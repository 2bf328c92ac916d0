"""Counting the bytes of tensors as they are stored, which for quantized tensors is not `numel * element_size`.

torchao and quanto weights are wrapper tensors that report the dtype they compute in
(float32) while holding int8 data and scales inside; bitsandbytes keeps its scales
beside the packed data. Every size offloadkit shows, traces or predicts goes through
`tensor_bytes`, so a quantized component is counted at its real size everywhere.

The planner sizes precision changes (`storage_dtype`, `quantize`) before they are
made: `planned_sizes` lends it the bytes each affected tensor will have.
"""

from __future__ import annotations

import contextlib
import contextvars

_PLANNED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("offloadkit_planned_sizes", default=None)


def tensor_bytes(tensor) -> int:
    """Bytes `tensor` occupies as stored, wherever it is (meta tensors included)."""
    planned = _PLANNED.get()
    if planned is not None and id(tensor) in planned:
        return planned[id(tensor)]
    kind = type(tensor).__name__
    base = tensor.numel() * tensor.element_size()
    if kind == "Params4bit":  # packed 4-bit data plus its quantization state (absmax, code, nested state)
        state = getattr(tensor, "quant_state", None)
        return base + (_state_bytes(state) if state is not None else 0)
    if kind == "Int8Params":  # int8 rows plus one float scale per row
        scales = getattr(tensor, "SCB", None)
        return base + (scales.numel() * scales.element_size() if scales is not None else 0)
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:  # torchao, quanto: the inner tensors are what is stored
        try:
            names, _ = flatten()
        except Exception:  # a subclass that cannot flatten now: its nominal size is the best we know
            return base
        inner = [getattr(tensor, name, None) for name in names]
        return sum(tensor_bytes(t) for t in inner if t is not None)
    return base


def _state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState's tensors (absmax, code, offset), nested state included."""
    total = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if hasattr(value, "element_size"):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    return total + (_state_bytes(nested) if nested is not None else 0)


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers as stored (tied tensors counted once)."""
    seen = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def module_sizes(module) -> dict[str, int]:
    """Stored bytes of every submodule by path ("" is the module), tied tensors counted at first sight.

    The same figures as Accelerate's `compute_module_sizes` for ordinary tensors, and the real
    ones for quantized tensors (which it counts at their nominal float size).
    """
    sizes: dict[str, int] = {}
    for path, tensor in (*module.named_parameters(), *module.named_buffers()):
        size = tensor_bytes(tensor)
        parts = path.split(".")
        for depth in range(len(parts)):
            prefix = ".".join(parts[:depth])
            sizes[prefix] = sizes.get(prefix, 0) + size
    return sizes


def planned_context():
    """The planned sizes in effect now (None outside `planned_sizes`), as an object to key caches by."""
    return _PLANNED.get()


@contextlib.contextmanager
def planned_sizes(sizes: dict):
    """Within the block, `tensor_bytes(t)` is `sizes[id(t)]` for the tensors it names."""
    outer = _PLANNED.get()
    token = _PLANNED.set({**(outer or {}), **sizes})
    try:
        yield
    finally:
        _PLANNED.reset(token)
