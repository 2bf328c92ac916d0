"""`disk`: leaf-level offload whose idle weights live in a safetensors file, not in host RAM.

Like `sequential` (each layer's weights go to the device for its forward only),
but the host copy is a memory-mapped file per component, for machines with
little RAM. Files are namespaced per component and weights fingerprint and
deleted on `remove()` (see `disk_store`).
"""

from __future__ import annotations

import os
import platform
from typing import Literal

from pydantic import Field, model_validator

from ..streaming import offloading_modules, stream_blocks, stream_layers
from .base import PrecisionRule, Strategy, register


def host_allocator_note() -> str | None:
    """Advice for glibc, whose freed heap pages can keep the disk tier's host RAM up; None elsewhere.

    offloadkit does not change the process-wide allocator itself; the variable must be set before
    Python starts (glibc reads it once). Measured in the README's Benchmark section.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return None
    return ("disk tier under glibc: freed heap memory can keep host RAM well above what the tier needs "
            "(a 0.7 GiB higher call peak for an SD 1.5 UNet); start Python with MALLOC_MMAP_THRESHOLD_=1048576 "
            "set to return it")


class DiskRule(PrecisionRule):
    """Stream each layer's weights from a memory-mapped safetensors file to the device."""

    strategy: Literal["disk"]
    folder: str | None = Field(
        None,
        description="Where the files go (a subfolder per component and weights fingerprint is made in it). "
        "Default: a new temporary folder. Files are deleted on remove().",
    )
    offload_buffers: Literal["auto"] | bool = Field(
        "auto", description="Offload buffers too. `auto`: when the model has parameters of its own.")
    granularity: Literal["layer", "block"] = Field(
        "layer",
        description="`layer`: each module's weights for its own forward (least memory). `block`: a whole "
        "block (an element of the model's top-level ModuleLists, or another top-level child) at a time: "
        "more memory, far less hook overhead.",
    )

    @model_validator(mode="after")
    def _block_streaming_keeps_buffers(self):
        if self.granularity == "block" and self.offload_buffers is True:
            raise ValueError("`offload_buffers: true` does not work with `granularity: block` (buffers stay on the "
                             "device there). Use 'auto' or false, or `granularity: layer`")
        return self


def install(ctx, name, module, rule, previous):
    from ..disk_store import store

    module.to("cpu")
    weights = store(name, dict(module.state_dict()), ctx.disk_folder(rule.folder))
    ctx.remember_weights(name, weights)
    # The in-RAM tensors are dropped: parameters become meta tensors backed by the file.
    stream = stream_blocks if rule.granularity == "block" else stream_layers
    stream(ctx, name, module, rule.offload_buffers, weights)
    ctx.watch_stream(name, module, tier="disk")
    # After each forward (and Accelerate's post_forward, which drops the tensors) the pages can go.
    weights.release_handles = [
        sub.register_forward_hook(lambda *_, _keys=keys: weights.release(_keys))
        for _, sub, keys in offloading_modules(module)
    ]
    return None


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
