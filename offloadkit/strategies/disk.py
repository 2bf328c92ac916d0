"""`disk`: leaf-level offload whose idle weights live in a safetensors file, not in host RAM.

Like `sequential` (each layer's weights go to the device for its forward only),
but the host copy is a memory-mapped file per component, for machines with
little RAM. Files are namespaced per component and weights fingerprint and
deleted on `remove()` (see `disk_store`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyRule, register
from .sequential import stream_layers


class DiskRule(StrategyRule):
    """Stream each layer's weights from a memory-mapped safetensors file to the device."""

    strategy: Literal["disk"]
    folder: str | None = Field(
        None,
        description="Where the files go (a subfolder per component and weights fingerprint is made in it). "
        "Default: a new temporary folder. Files are deleted on remove().",
    )
    offload_buffers: Literal["auto"] | bool = Field(
        "auto", description="Offload buffers too. `auto`: when the model has parameters of its own.")


def install(ctx, name, module, rule, previous):
    from ..disk_store import store

    module.to("cpu")
    weights = store(name, dict(module.state_dict()), ctx.disk_folder(rule.folder))
    ctx.remember_weights(name, weights)
    # The in-RAM tensors are dropped: parameters become meta tensors backed by the file.
    stream_layers(ctx, name, module, rule.offload_buffers, weights)
    _release_after_forward(module, weights)
    return None


def _release_after_forward(module, weights) -> None:
    """After each layer's forward (and Accelerate's post_forward, which drops its tensors), let its pages go."""
    handles = []
    for path, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,))
        if not any(getattr(h, "offload", False) for h in hooks):
            continue
        prefix = f"{path}." if path else ""
        keys = [prefix + key for key in list(sub._parameters) + list(sub._buffers)]
        handles.append(sub.register_forward_hook(lambda *_, _keys=keys: weights.release(_keys)))
    weights.release_handles = handles


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    from ..disk_store import discard

    # Accelerate's detach reads every tensor back from the file into RAM.
    remove_hook_from_module(module, recurse=True)
    weights = handle._weights.pop(name, None)
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


STRATEGY = register(Strategy(
    name="disk",
    rule=DiskRule,
    summary="each layer's weights streamed from a memory-mapped safetensors file",
    chained=False,
    placed=False,
    install=install,
    uninstall=uninstall,
    home="meta (disk)",
    offloaded_by="after each layer",
))
