"""Per-layer streaming that also serves the reads per-layer hooks miss (see `direct_reads`).

`stream_layers` of `streaming` installs Accelerate's `cpu_offload`; this does the same, then
streams whole the modules that read their children's tensors, runs weight-norm style pre-hooks
after the weights arrive, keeps on the device the tensors the pipeline reads outside any
forward, and makes the component's `device` answer the execution device when the pipeline
asks it. `undo` takes those changes back before the hooks are removed.
"""

from __future__ import annotations

from .direct_reads import defer_pre_hooks, direct_reads, onload_in_methods, pipeline_reads, report_device, \
    restore_device, restore_methods, restore_pre_hooks
from .streaming import _execution_device, offloading_modules


def stream_layers(handle, name, module, offload_buffers, weights) -> None:
    from accelerate import cpu_offload

    if offload_buffers == "auto":  # diffusers' rule in enable_sequential_cpu_offload
        offload_buffers = len(module._parameters) > 0
    device = _execution_device(handle.device)
    whole, calls = direct_reads(module)
    cpu_offload(module, device, offload_buffers=offload_buffers, state_dict=weights,
                preload_module_classes=whole or None)
    onload_in_methods(calls)
    owners, reads_device = pipeline_reads(handle.pipe, name, module)
    for path in owners:
        _keep_on_device(module.get_submodule(path), path, weights, device)
    defer_pre_hooks(sub for _, sub, _ in offloading_modules(module))
    if reads_device:
        report_device(module, device)
    handle.set_hook(name, module._hf_hook)


def _keep_on_device(owner, path: str, weights, device) -> None:
    """The owner's own tensors on the device for good: its hook stops offloading them."""
    from accelerate.utils import set_module_tensor_to_device

    hook = getattr(owner, "_hf_hook", None)
    for inner in getattr(hook, "hooks", (hook,)):
        if not getattr(inner, "offload", False):
            continue
        prefix = f"{path}." if path else ""
        for key in [*owner._parameters, *owner._buffers]:
            if prefix + key in weights:
                set_module_tensor_to_device(owner, key, device, value=weights[prefix + key])
        inner.offload = False  # pre_forward still moves inputs; nothing is dropped after forward


def undo(module) -> None:
    """Before Accelerate's hooks are removed: the pre-hooks and the class back as they were."""
    restore_pre_hooks(module)
    restore_methods(module)
    restore_device(module)
