"""How a streamed component's weights come and go during one forward, computed from the module tree.

For the planner: the bytes a `sequential`, `disk` or `group` component loads per
forward and the most it has on the device at once, from a model built on the
`meta` device (or a loaded one). The rules mirror what the runtime installs:

- `sequential` / `disk` (`granularity: layer`): Accelerate puts a hook on every
  module with tensors of its own (buffers only with `offload_buffers`); a
  module's tensors stay on the device for its whole forward, children included,
  so the most at once is the heaviest root-to-leaf path of own tensors.
- `disk` with `granularity: block`: the model's own tensors for the whole
  forward, plus one block (an element of a top-level ModuleList, or another
  top-level child) at a time, with its submodules.
- `group`: diffusers' groups (see `sizing.size_module`): the unmatched group is
  onloaded with the model's own forward, the block groups one at a time (two
  with `use_stream`, which prefetches the next); `leaf_level` groups are the
  leaf modules.

A VAE's decode runs only its decoder side: the encoder and `quant_conv` are not
loaded by the layer and block tiers.

Each streamed strategy registers its profile here under its rule class
(`register_profile`); a rule without one does not stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..plans.stream_layout import resized
from ..policy.rules import DISK, HOST, DiskRule, GroupRule, SequentialRule, StrategyRule, StreamRule
from ..tensor_bytes import tensor_bytes
from .sizing import size_module

# Children a VAE's decode never calls (the layer and block tiers load only what runs).
_DECODE_UNUSED = ("encoder", "quant_conv")


@dataclass(frozen=True)
class StreamProfile:
    """Bytes loaded per forward, the most of them on the device at once, and the loads (hook calls) per forward.

    `source` is where the pieces are read from (`host` RAM or `disk`); `pinned` whether they are copied
    from page-locked memory, and `overlapped` whether the copies overlap compute (a prefetching stream).
    """

    per_forward: int
    peak: int
    pieces: int
    source: str = HOST
    pinned: bool = False
    overlapped: bool = False
    # For a chained component that also streams (`stream`): what its chain onload moves, what it then holds
    # on the device (the moved bytes plus the buffer pool), and the bytes of it kept on disk.
    chained_bytes: int | None = None
    device_bytes: int | None = None
    disk_bytes: int = 0
    pinned_fraction: float | None = None  # of the streamed bytes, from pinned memory (None: all or none, `pinned`)

    @property
    def pinned_share(self) -> float:
        if self.pinned_fraction is not None:
            return self.pinned_fraction
        return 1.0 if self.pinned else 0.0


def _nbytes(tensors) -> int:
    return sum(tensor_bytes(t) for t in tensors)


def _own(module, buffers: bool) -> int:
    tensors = [t for t in module._parameters.values() if t is not None]
    if buffers:
        tensors += [t for t in module._buffers.values() if t is not None]
    return _nbytes(tensors)


def _children(module, decode_only: bool):
    for name, child in module.named_children():
        if decode_only and name in _DECODE_UNUSED:
            continue
        yield name, child


def _is_vae(module) -> bool:
    return hasattr(module, "decode") and hasattr(module, "decoder")


# Submodules a pipeline never calls, by the class that holds them: Qwen-Image prompts are text, so its
# Qwen2.5-VL encoder's vision tower never runs (the layer tiers load only what runs).
_NEVER_CALLED = {"Qwen2_5_VLForConditionalGeneration": ("model.visual",)}


def _never_called(module) -> set[int]:
    """ids of the submodules of `module` that its pipeline's forwards never call."""
    found = set()
    for path in _NEVER_CALLED.get(type(module).__name__, ()):
        try:
            found.add(id(module.get_submodule(path)))
        except AttributeError:
            pass
    return found


def _layer_profile(module, offload_buffers) -> StreamProfile:
    if offload_buffers == "auto":  # diffusers' rule in enable_sequential_cpu_offload, as streaming.py applies it
        offload_buffers = len(module._parameters) > 0
    decode_only = _is_vae(module)
    skipped = _never_called(module)

    def walk(sub, top):
        own = _own(sub, offload_buffers)
        children = _children(sub, decode_only) if top else sub.named_children()
        totals = [walk(child, False) for _, child in children if id(child) not in skipped]
        return (own + sum(t[0] for t in totals), own + max((t[1] for t in totals), default=0),
                (1 if own else 0) + sum(t[2] for t in totals))

    return StreamProfile(*walk(module, True))


def _block_profile(module, offload_buffers) -> StreamProfile:
    import torch

    buffers = False if offload_buffers == "auto" else offload_buffers  # streaming.stream_blocks' rule
    own = _nbytes(t for t in module._parameters.values() if t is not None)
    if buffers:
        own += _nbytes(t for t in module._buffers.values() if t is not None)
    blocks = []
    for _, child in _children(module, _is_vae(module)):
        parts = child if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) else [child]
        for block in parts:
            tensors = list(block.parameters()) + (list(block.buffers()) if buffers else [])
            blocks.append(_nbytes(tensors))
    return StreamProfile(own + sum(blocks), own + max(blocks, default=0), len(blocks) + (1 if own else 0))


def _group_profile(module, rule: GroupRule) -> StreamProfile:
    if rule.offload_type == "leaf_level":
        return _leaf_group_profile(module, stream=rule.use_stream)
    width = 2 if rule.use_stream else 1
    size = size_module(module, block_modules=rule.block_modules)
    block_modules = set(rule.block_modules or getattr(module, "_group_offload_block_modules", None) or ())
    skipped = _DECODE_UNUSED if _is_vae(module) else ()
    # Groups of a block module (`decoder.up_blocks_0_0`) belong to that child; the rest to the model itself.
    parts: dict = {}
    for group in size.groups:
        head = group.name.split(".", 1)[0] if "." in group.name else ""
        owner = head if head in block_modules else ""
        if owner in skipped:
            continue
        unmatched, blocks = parts.setdefault(owner, ([], []))
        (unmatched if group.name.endswith("_unmatched_group") else blocks).append(group.bytes)
    per_group = rule.num_blocks_per_group

    def peak_of(unmatched, blocks):
        merged = [sum(blocks[i:i + per_group]) for i in range(0, len(blocks), per_group)]
        return sum(unmatched) + _largest_window(merged, width)

    root_unmatched, root_blocks = parts.pop("", ([], []))
    inner = max((peak_of(*part) for part in parts.values()), default=0)
    peak = sum(root_unmatched) + max(peak_of([], root_blocks), inner)
    per_forward = sum(sum(u) + sum(b) for u, b in parts.values()) + sum(root_unmatched) + sum(root_blocks)
    pieces = sum(len(u) + -(-len(b) // per_group) for u, b in parts.values()) + len(root_unmatched) \
        + -(-len(root_blocks) // per_group)
    return StreamProfile(per_forward, peak, pieces, pinned=rule.use_stream, overlapped=rule.use_stream)


def _leaf_group_profile(module, stream: bool) -> StreamProfile:
    # diffusers' leaf level: each supported layer is a group with everything under it; every other
    # module's own tensors are a group loaded for that module's forward (so, as with layers, a path).
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS as LAYERS

    leaves = []
    decode_only = _is_vae(module)
    skipped = _never_called(module)

    def walk(sub, top=False):
        if isinstance(sub, LAYERS):
            total = _nbytes(list(sub.parameters()) + list(sub.buffers()))
            leaves.append(total)
            return total, total, 1
        own = _own(sub, buffers=True)
        children = [c for _, c in _children(sub, decode_only)] if top else list(sub.children())
        totals = [walk(child) for child in children if id(child) not in skipped]
        return (own + sum(t[0] for t in totals), own + max((t[1] for t in totals), default=0),
                (1 if own else 0) + sum(t[2] for t in totals))

    per_forward, peak, pieces = walk(module, top=True)
    if stream:  # the next layer is prefetched while one computes
        peak += max(leaves, default=0)
    return StreamProfile(per_forward, peak, pieces, pinned=stream, overlapped=stream)


def _largest_window(sizes: list[int], width: int) -> int:
    if not sizes:
        return 0
    return max(sum(sizes[i:i + width]) for i in range(len(sizes)))


def _layer_or_block_profile(module, rule) -> StreamProfile:
    if getattr(rule, "granularity", "layer") == "block":
        return _block_profile(module, rule.offload_buffers)
    return _layer_profile(module, rule.offload_buffers)


def _stream_profile(module, rule: StreamRule, layout) -> StreamProfile:
    # The pool is held from the onload on, so the blocks' loads add nothing to the device count.
    layout = resized(layout, module, rule)
    on_disk = layout.source == DISK
    streamed = layout.streamed_bytes
    return StreamProfile(streamed, 0, len(layout.streamed), source=DISK if on_disk else HOST,
                         pinned=bool(layout.streamed) and not layout.pageable, overlapped=True,
                         chained_bytes=layout.core_bytes, device_bytes=layout.device_bytes,
                         disk_bytes=streamed if on_disk else 0,
                         pinned_fraction=layout.bytes_of(layout.pinned) / streamed if streamed else None)


def _disk_profile(module, rule: DiskRule) -> StreamProfile:
    profile = _layer_or_block_profile(module, rule)
    return StreamProfile(profile.per_forward, profile.peak, profile.pieces, source=DISK)


def disk_allocator_note() -> str | None:
    """Advice for glibc, whose freed heap pages can keep the disk tier's host RAM up; None elsewhere.

    offloadkit does not change the process-wide allocator itself; the variable must be set before
    Python starts (glibc reads it once). Measured in the README's Benchmark section.
    """
    import platform

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return None
    return ("disk tier under glibc: freed heap memory can keep host RAM well above what the tier needs "
            "(a 0.7 GiB higher call peak for an SD 1.5 UNet); start Python with MALLOC_MMAP_THRESHOLD_=1048576 "
            "set to return it")


@dataclass(frozen=True)
class _Registered:
    profile: Callable  # (module, rule) -> StreamProfile; (module, rule, layout) for rules with a block layout
    note: Callable | None  # () -> a note for predictions of plans with this strategy, or None


PROFILES: dict[type[StrategyRule], _Registered] = {}


def register_profile(rule: type[StrategyRule], profile: Callable, note: Callable | None = None) -> None:
    """Register how a streamed strategy's weights come and go, under its rule class (once)."""
    if rule in PROFILES:
        raise ValueError(f"strategy {rule.name!r} has two stream profiles")
    PROFILES[rule] = _Registered(profile, note)


register_profile(SequentialRule, _layer_or_block_profile)
register_profile(DiskRule, _disk_profile, note=disk_allocator_note)
register_profile(GroupRule, _group_profile)
register_profile(StreamRule, _stream_profile)


def streams(rule: StrategyRule) -> bool:
    """Whether the rule's strategy streams weights piece by piece during a forward."""
    return type(rule) in PROFILES


def stream_profile(module, rule: StrategyRule, layout=None) -> StreamProfile | None:
    """The stream profile of `module` under a streamed strategy's rule; None for rules that do not stream.

    Example::

        stream_profile(torch.nn.Linear(4, 4), SequentialRule.default()).per_forward   # 80
    """
    registered = PROFILES.get(type(rule))
    if registered is None:
        return None
    if rule.block_layout:
        return registered.profile(module, rule, layout) if layout is not None else None
    return registered.profile(module, rule)


def stream_note(rule: StrategyRule) -> str | None:
    """The registered note for plans with this rule's strategy (e.g. the disk tier's allocator advice), or None."""
    registered = PROFILES.get(type(rule))
    return registered.note() if registered is not None and registered.note is not None else None
