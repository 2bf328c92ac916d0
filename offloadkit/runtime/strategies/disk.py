"""`disk`: leaf-level offload whose idle weights live in a safetensors file, not in host RAM.

Like `sequential` (each layer's weights go to the device for its forward only),
but the host copy is a memory-mapped file per component, for machines with
little RAM. Files are namespaced per component and weights fingerprint and
deleted on `remove()` (see `disk_store`).
"""

from __future__ import annotations

from ...policy.rules import DiskRule
from ..disk_store import discard, store
from ..read_safe_streaming import stream_layers, undo
from ..streaming import offloading_modules, stream_blocks
from .registry import register_installer


def install(handle, name, module, rule, previous):
    module.to("cpu")
    weights = store(name, dict(module.state_dict()), handle.disk_folder(rule.folder, name))
    handle.keep_weights(name, weights)
    # The in-RAM tensors are dropped: parameters become meta tensors backed by the file.
    stream = stream_blocks if rule.granularity == "block" else stream_layers
    stream(handle, name, module, rule.offload_buffers, weights)
    handle.watch_stream(name, module, tier="disk")
    # After each forward (and Accelerate's post_forward, which drops the tensors) the pages can go.
    weights.release_handles = [
        sub.register_forward_hook(lambda *_, _keys=keys: weights.release(_keys))
        for _, sub, keys in offloading_modules(module)
    ]
    return None


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    undo(module)
    # Accelerate's detach reads every tensor back from the file into RAM.
    remove_hook_from_module(module, recurse=True)
    weights = handle.take_weights(name)
    if weights is None:
        return
    for release in getattr(weights, "release_handles", ()):
        release.remove()
    # Accelerate's detach gave the model views of the memory map: make them ordinary tensors first.
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = tensor.data.clone()
    _retie(module, weights.aliases)
    discard(weights)


def _retie(module, aliases: dict) -> None:
    """Tied weights were stored once; make the tied names share one tensor object again."""
    for alias, key in aliases.items():
        owner_path, _, attr = alias.rpartition(".")
        source_path, _, source_attr = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        source = module.get_submodule(source_path) if source_path else module
        tensor = getattr(source, source_attr)
        if attr in owner._parameters:
            owner._parameters[attr] = tensor
        else:
            owner._buffers[attr] = tensor


register_installer(DiskRule, install, uninstall)
