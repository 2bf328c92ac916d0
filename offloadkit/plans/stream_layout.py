"""Which blocks of a `stream` component stay on the device, which stream, and from what memory.

Pure: computed from the module tree (loaded, or built on `meta`), the rule and the
memory the caller knows of, so the plan, the runtime and the planner read the same
layout. The runtime (`runtime/strategies/stream.py`) installs exactly this layout.

- Blocks: the elements of the ModuleLists named by `blocks:` (a path to any other
  module makes that module one block), or by default of the model's top-level
  ModuleLists/Sequentials, as diffusers' group offloading finds them. A tensor a
  block shares with anything outside it (tied weights) stays with the rest.
- The rest of the model (embeddings, norms, projections, blocks outside the lists)
  and the resident blocks move together, as one `model` component would.
- The streamed blocks share a pool of `prefetch + 1` device buffers, each the size
  of the largest streamed block.
- Pinned memory is given to streamed blocks in execution order, up to the share of
  the policy's `pinned_memory` left to this component; the others stream from
  pageable memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.rules import DISK
from ..tensor_bytes import module_bytes, tensor_bytes
from ..units import format_bytes, parse_share, share_bytes

PAGE = 4096  # every block's bytes start on a page in its host and device buffers
DECIDED_AT_APPLY = "`resident: auto`: chosen from the device's free memory when applied"


def aligned(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


class BlocksNotFound(ValueError):
    """`blocks:` names nothing streamable, or the model has no ModuleList of blocks."""


@dataclass(frozen=True)
class StreamLayout:
    """One `stream` component's blocks (path, bytes) in the model's order, and what happens to each."""

    blocks: tuple[tuple[str, int], ...]
    resident: tuple[str, ...]  # kept on the device while the model is
    pinned: tuple[str, ...]  # streamed from page-locked host memory (the other streamed ones: pageable)
    rest_bytes: int  # the model outside its blocks
    prefetch: int
    source: str  # "host" or "disk"
    reason: str
    core_pinned: bool = False  # the rest and the resident blocks are copied from page-locked memory too

    @property
    def streamed(self) -> tuple[str, ...]:
        resident = set(self.resident)
        return tuple(path for path, _ in self.blocks if path not in resident)

    @property
    def pageable(self) -> tuple[str, ...]:
        pinned = set(self.pinned)
        return tuple(path for path in self.streamed if path not in pinned)

    def bytes_of(self, paths) -> int:
        sizes = dict(self.blocks)
        return sum(sizes[p] for p in paths)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per forward of the model."""
        return self.bytes_of(self.streamed)

    @property
    def core_bytes(self) -> int:
        """Bytes that move with the model as a whole: the rest and the resident blocks."""
        return self.rest_bytes + self.bytes_of(self.resident)

    @property
    def slots(self) -> int:
        return min(self.prefetch + 1, len(self.streamed))

    @property
    def slot_bytes(self) -> int:
        return max((aligned(self.bytes_of([p])) for p in self.streamed), default=0)

    @property
    def pool_bytes(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory while the model is on the device: the rest, resident blocks and the buffer pool."""
        return self.core_bytes + self.pool_bytes

    def summary(self) -> str:
        """One line for the plan: `12 of 57 blocks resident (...); 45 streamed, prefetch 1, pool 0.6 GiB`."""
        if self.reason == DECIDED_AT_APPLY:
            return f"{len(self.blocks)} blocks; {self.reason}"
        streamed = self.streamed
        text = f"{len(self.resident)} of {len(self.blocks)} blocks resident ({self.reason})"
        if streamed:
            text += (f"; {len(streamed)} streamed ({format_bytes(self.streamed_bytes)} a forward) from "
                     f"{self._from()}, prefetch {self.prefetch}, pool {self.slots} x "
                     f"{format_bytes(self.slot_bytes)}")
        return text

    def _from(self) -> str:
        if self.source == DISK:
            return "disk"
        if not self.pageable:
            return "pinned RAM"
        if not self.pinned:
            return "pageable RAM"
        return f"pinned RAM ({len(self.pinned)}) and pageable RAM ({len(self.pageable)}: " \
               f"{', '.join(self.pageable[:3])}{', ...' if len(self.pageable) > 3 else ''})"

    def to_dict(self) -> dict:
        return {"blocks": len(self.blocks), "resident": list(self.resident), "streamed": list(self.streamed),
                "pinned": list(self.pinned), "core_bytes": self.core_bytes, "streamed_bytes": self.streamed_bytes,
                "pool_bytes": self.pool_bytes, "prefetch": self.prefetch, "from": self.source,
                "reason": self.reason}


# --- finding the blocks ----------------------------------------------------------------------------

def find_blocks(module, paths=None) -> list[tuple[str, object]]:
    """(dotted path, block module) of the blocks, in the model's order. `BlocksNotFound` says why not."""
    import torch

    lists = (torch.nn.ModuleList, torch.nn.Sequential)
    if paths is None:
        found = [(f"{name}.{i}", block) for name, child in module.named_children() if isinstance(child, lists)
                 for i, block in enumerate(child)]
        if not found:
            candidates = [p for p, m in module.named_modules() if p and isinstance(m, lists)]
            raise BlocksNotFound(f"{type(module).__name__} has no top-level ModuleList of blocks to stream. Name "
                                 "them with `blocks:`" + (f", e.g. `blocks: [{candidates[0]}]` (its ModuleLists: "
                                                          f"{', '.join(candidates[:8])})" if candidates else ""))
        return found
    from ..errors import did_you_mean

    names = dict(module.named_modules())
    found, chosen = [], []
    for path in paths:
        target = names.get(path) if path else None
        if target is None:
            candidates = [p for p, m in names.items() if p and isinstance(m, lists)]
            raise BlocksNotFound(f"{type(module).__name__} has no submodule {path!r}. "
                                 + did_you_mean(path, candidates or [p for p in names if p], "ModuleLists"))
        for other in chosen:
            if path.startswith(other + ".") or other.startswith(path + "."):
                raise BlocksNotFound(f"`blocks` names {other!r} and {path!r}, one inside the other. Keep one")
        if path in chosen:
            raise BlocksNotFound(f"`blocks` names {path!r} twice")
        chosen.append(path)
        if isinstance(target, lists):
            found += [(f"{path}.{i}", block) for i, block in enumerate(target)]
        else:
            found.append((path, target))
    if not found:
        raise BlocksNotFound(f"the ModuleLists in `blocks` ({', '.join(paths)}) are empty: there is nothing to "
                             "stream")
    return found


def _tensors(module):
    seen = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen[id(tensor)] = tensor
    return seen


def block_tensors(module, blocks) -> tuple[dict, dict]:
    """({block path: {id: tensor}} of tensors only that block holds, {id: tensor} of the rest of the model).

    A tensor held by two blocks, or also by the model outside the blocks (tied weights), stays with the rest.
    """
    per_block = {path: _tensors(block) for path, block in blocks}
    owners: dict = {}
    for held in per_block.values():
        for key in held:
            owners[key] = owners.get(key, 0) + 1
    outside = _outside_references(module, blocks)
    inside = {path: {k: t for k, t in held.items() if owners[k] == 1 and k not in outside}
              for path, held in per_block.items()}
    claimed = {k for held in inside.values() for k in held}
    return inside, {k: t for k, t in _tensors(module).items() if k not in claimed}


def _outside_references(module, blocks) -> set:
    """ids of tensors held by modules that are not inside any block."""
    inside = {id(m) for _, block in blocks for m in block.modules()}
    found = set()
    for sub in module.modules():
        if id(sub) in inside:
            continue
        for table in (sub._parameters, sub._buffers):
            found.update(id(t) for t in table.values() if t is not None)
    return found


# --- choosing what stays -----------------------------------------------------------------------------

def _spread(count: int, total: int) -> list[int]:
    """`count` indices out of `total`, evenly through them (the middle of each of `count` equal spans)."""
    if count <= 0:
        return []
    return sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})


def _chosen(count: int, total: int, placement: str) -> list[int]:
    count = max(0, min(count, total))
    if placement == "first":
        return list(range(count))
    if placement == "last":
        return list(range(total - count, total))
    return _spread(count, total)


@dataclass(frozen=True)
class Machine:
    """What the caller knows of the machine a plan is for (None: unknown)."""

    device_free: int | None = None  # device memory free for this pipeline (what it holds now included)
    device_total: int | None = None
    host_ram: int | None = None
    system: str = ""  # platform.system(): "Linux", "Windows", ...
    working: tuple = ()  # (component, working memory of one forward) pairs, where the planner estimated them

    def working_beside_resident(self) -> int:
        """The most working memory any forward of the call needs: resident blocks stay on the device through
        the whole call, so the VAE's decode (often the largest) must fit beside them, not only their model's own."""
        return max((bytes_ for _, bytes_ in self.working), default=0)

    def pinned_cap(self, setting, device_type: str) -> int:
        """Bytes of host RAM the policy's `pinned_memory` allows (0 without CUDA or a known host RAM)."""
        if device_type != "cuda" or not self.host_ram:
            return 0
        if setting == "auto":
            setting = {"Linux": "50%", "Windows": "25%"}.get(self.system, "0%")
        return share_bytes(setting, self.host_ram)


@dataclass(frozen=True)
class DeviceRoom:
    """What the caller knows of the device's memory: a budget, or free and total bytes (None: unknown)."""

    budget: int | None = None
    free: int | None = None
    total: int | None = None
    others: int = 0  # bytes other components keep on the device meanwhile (resident, kept models)
    device_type: str = "cuda"
    working: int = 0  # the largest working memory of a forward of the call, where known (else `headroom` covers it)


def layout(module, rule, room: DeviceRoom, pinned_available: int = 0, whole: bool = False) -> StreamLayout:
    """The layout of `module` under a `stream` rule (see the module docstring).

    `whole`: a model without blocks to find moves as a whole (for `components.*` rules) instead of failing.
    """
    try:
        sizes, rest_bytes = block_sizes(module, rule.blocks)
    except BlocksNotFound:
        if not whole or rule.blocks is not None:
            raise
        return StreamLayout((), (), (), module_bytes(module), rule.prefetch, rule.source,
                            "no top-level ModuleList of blocks: moves as a whole")
    total = len(sizes)

    def build(count, reason):
        chosen = {sizes[i][0] for i in _chosen(count, total, rule.placement)}
        resident = tuple(p for p, _ in sizes if p in chosen)
        return StreamLayout(sizes, resident, (), rest_bytes, rule.prefetch, rule.source, reason)

    value = rule.resident
    if isinstance(value, int):
        chosen = build(value, f"`resident: {value}`" + (f", the model has {total}" if value > total else ""))
    elif value == "auto":
        chosen = _auto(build, total, rule, room)
    else:
        kind, amount = parse_share(value)
        if kind == "fraction":
            chosen = build(round(total * amount), f"`resident: {value}`")
        else:
            chosen = _largest(build, total, lambda d: d.bytes_of(d.resident) <= amount, f"`resident: {value}`")
    return _with_pinned(chosen, pinned_available)


def _largest(build, total, fits, reason) -> StreamLayout:
    for count in range(total, -1, -1):
        draft = build(count, reason)
        if fits(draft):
            return draft
    return build(0, reason)


def _auto(build, total, rule, room: DeviceRoom) -> StreamLayout:
    if room.budget is not None:
        limit = room.budget - room.others
        what = f"fits the budget of {format_bytes(room.budget)}"
    elif room.free is not None:
        headroom = max(share_bytes(rule.headroom, room.total or room.free), room.working)
        limit = room.free - headroom - room.others
        kept = "headroom" if headroom > room.working else "working memory"
        what = f"fits {format_bytes(room.free)} free less {format_bytes(headroom)} {kept}"
    elif room.device_type == "cpu":
        return build(total, "`resident: auto` on the CPU without a budget: every block")
    else:
        return build(0, DECIDED_AT_APPLY)
    if room.others:
        what += f" and {format_bytes(room.others)} of other components"
    draft = _largest(build, total, lambda d: d.device_bytes <= limit, what)
    if draft.device_bytes > limit:
        return build(0, f"nothing fits: the rest of the model and the pool need {format_bytes(draft.device_bytes)}, "
                        f"{format_bytes(max(limit, 0))} is left")
    return draft


def _with_pinned(draft: StreamLayout, available: int) -> StreamLayout:
    from dataclasses import replace

    if draft.source == DISK:
        return draft
    pinned, left = [], available
    for path in draft.streamed:  # streamed blocks first: they are copied every forward
        size = aligned(draft.bytes_of([path]))
        if size > left:
            break
        pinned.append(path)
        left -= size
    core = len(pinned) == len(draft.streamed) and aligned(draft.core_bytes) <= left
    return replace(draft, pinned=tuple(pinned), core_pinned=core)


def pinned_bytes(draft: StreamLayout) -> int:
    """Page-locked host bytes the layout takes (pinned streamed blocks and core, page-aligned)."""
    return sum(aligned(draft.bytes_of([p])) for p in draft.pinned) + (aligned(draft.core_bytes)
                                                                       if draft.core_pinned else 0)


def resized(draft: StreamLayout, module, rule) -> StreamLayout:
    """The same choice of blocks with the sizes the module's tensors have now (after a precision change)."""
    from dataclasses import replace

    if not draft.blocks:
        return replace(draft, rest_bytes=module_bytes(module))
    sizes, rest_bytes = block_sizes(module, rule.blocks)
    return replace(draft, blocks=sizes, rest_bytes=rest_bytes)


_SIZES: "weakref.WeakKeyDictionary" = None  # module -> {(paths, sizes in effect): (sizes, rest bytes)}


def block_sizes(module, paths) -> tuple[tuple[tuple[str, int], ...], int]:
    """((block path, bytes), ...) in the model's order and the bytes of the rest, cached per module.

    Synthesis resolves the same model under many rules: walking its module tree once is enough, once
    per set of planned sizes (`tensor_bytes.planned_sizes`, for precision changes).
    """
    import weakref

    from ..tensor_bytes import planned_context

    global _SIZES
    if _SIZES is None:
        _SIZES = weakref.WeakKeyDictionary()
    planned = planned_context()
    # under planned sizes the key holds them too: the same precision change is sized once
    key = (tuple(paths) if paths is not None else None,
           frozenset(planned.items()) if planned is not None else None)
    cached = _SIZES.setdefault(module, {})
    if key not in cached:
        blocks = find_blocks(module, paths)
        inside, rest = block_tensors(module, blocks)
        cached[key] = (tuple((path, sum(tensor_bytes(t) for t in inside[path].values())) for path, _ in blocks),
                       sum(tensor_bytes(t) for t in rest.values()))
    return cached[key]
