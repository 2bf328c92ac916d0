"""`sequential`: leaf-level offload, as `enable_sequential_cpu_offload` does it (Accelerate's `cpu_offload`).

Parameters live in a host-RAM state dict and on the `meta` device in the model;
each leaf module's weights are put on the device just before its forward and
dropped right after. Lowest device memory, slowest calls.
"""

from __future__ import annotations

from ...policy.rules import SequentialRule
from ..read_safe_streaming import stream_layers, undo
from .registry import register_installer


def install(handle, name, module, rule, previous):
    # On the host first (as diffusers does), so the host copies below are the model's own tensors:
    # no second copy, and remove() can put the very same objects back (ties included).
    module.to("cpu")
    handle.keep_weights(name, _own_tensors(module))
    stream_layers(handle, name, module, rule.offload_buffers, dict(module.state_dict()))
    handle.watch_stream(name, module, tier="cpu")
    return None


def _own_tensors(module) -> dict:
    """Every parameter and buffer object, addressed by (submodule path, kind, name)."""
    found = {}
    for path, sub in module.named_modules():
        for key, tensor in sub._parameters.items():
            if tensor is not None:
                found[(path, "parameter", key)] = tensor
        for key, tensor in sub._buffers.items():
            if tensor is not None:
                found[(path, "buffer", key)] = tensor
    return found


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    undo(module)
    # Accelerate's detach puts new tensor objects (over the host copies) where the meta ones were;
    # put the model's own objects back so ties and references held elsewhere hold again.
    remove_hook_from_module(module, recurse=True)
    originals = handle.take_weights(name) or {}
    submodules = dict(module.named_modules())
    for (path, kind, key), original in originals.items():
        sub = submodules.get(path)
        table = getattr(sub, "_parameters" if kind == "parameter" else "_buffers", None)
        current = table.get(key) if table is not None else None
        if current is None or current is original or current.shape != original.shape:
            continue  # gone, already right, or replaced by someone else (a loader resized it): leave it
        if current.device.type == "meta":
            original.data = original.data.to(current.dtype)
        else:
            original.data = current.data  # the values as they are now, e.g. after pipe.to(dtype)
        table[key] = original


register_installer(SequentialRule, install, uninstall)
