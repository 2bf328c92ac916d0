"""`stream`: the model's resident part moves like a `model` component; its other blocks stream through a pool.

The plan's layout (`plans/stream_layout.py`) says which blocks stay. At install:

- the rest of the model and the resident blocks are packed into one host buffer
  (`PackedWeights`); the chain hook (`ChainOffloadHook`, so the chain, `keep_on_device`,
  the end of call and the trace work as for `model`) copies it to the device in one
  transfer when the model runs, and drops the device copy on offload (copy-free);
- each streamed block is packed into a host buffer of its own (pinned where the layout
  says, else pageable, or a memory-mapped file with `from: disk`), and its tensors are views
  of that host buffer between uses; a forward pre-hook copies it into a slot of a fixed pool
  of `prefetch + 1` device buffers, allocated with the model's onload, and a forward hook
  points the tensors back at the host buffer and frees the slot. No device memory is
  allocated per block.
- On CUDA the copies run on a side stream of the component's own, `prefetch` blocks ahead of the one
  computing, in the order the blocks ran in the last forward (the model's order at
  first). An event per copy makes the compute stream wait for the block it needs next
  only; an event per slot makes a copy wait until the compute stream is done with the
  block that used the slot before. Elsewhere the copies are made at once.
"""

from __future__ import annotations

import time
from collections import deque

from ...plans.stream_layout import block_tensors, find_blocks, resized
from ...policy.rules import StreamRule
from ..compile_safety import compiler_disabled
from ..packed_weights import PackedWeights
from ..transfers import PackedCopy
from .model import ChainOffloadHook
from .model import uninstall as remove_chain_hook
from .registry import register_installer


class BlockStream:
    """The streamed blocks of one component: their packed host copies, the device pool, the prefetch order."""

    def __init__(self, packs: dict, sizes: dict, prefetch: int, device, side_stream, stats, disk=None):
        self.packs = packs  # path -> PackedWeights, in the model's order
        self.sizes = sizes  # path -> the block's bytes as the plan counts them (`tensor_bytes`)
        self.order = list(packs)
        self.position = {path: i for i, path in enumerate(self.order)}
        self.prefetch = prefetch
        self.device = device
        self.side = side_stream  # a CUDA stream, or None: copies made at once
        self.stats = stats
        self.disk = disk  # the DiskWeights the packs' host buffers map, with `from: disk`
        self.slot_size = max((pack.size for pack in packs.values()), default=0)
        self.slot_count = min(prefetch + 1, len(packs))
        self.pool = None
        self.slots = []
        self.free = deque()
        self.free_after = []  # per slot: the compute-stream event after its last use (CUDA), or None
        self.held = {}  # path -> slot index
        self.ready = {}  # path -> the event that ends its copy (CUDA)
        self.running = set()
        self.seen = []
        self.waits = []  # (compute reached the wait, copy done) event pairs of this call (CUDA)
        self.copies = []  # (copy began, copy done, bytes) of this call (CUDA)
        self.host_blocked = 0.0  # seconds the host waited in copies from pageable memory this call (CUDA)

    # --- the pool, with the model's onload and offload -----------------------------------------

    def allocate(self) -> None:
        import torch

        if self.pool is not None or not self.packs:
            return
        self.pool = torch.empty(self.slot_count * self.slot_size, dtype=torch.uint8, device=self.device)
        if self.side is not None:
            self.pool.record_stream(self.side)  # freed with the offload: not reused before queued copies end
        self.slots = [self.pool[i * self.slot_size:(i + 1) * self.slot_size] for i in range(self.slot_count)]
        self.free = deque(range(self.slot_count))
        allocated = None
        if self.side is not None:
            # The memory may have just been freed by work still queued on the compute stream: the first copy
            # into each slot waits for that work, as every later one waits for the slot's previous block.
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(self.device))
        self.free_after = [allocated] * self.slot_count
        self.held, self.ready, self.running = {}, {}, set()

    def free_pool(self) -> None:
        for path in list(self.held):
            self.packs[path].detach()
        self.pool, self.slots, self.free, self.held, self.ready, self.running = None, [], deque(), {}, {}, set()

    # --- loads ------------------------------------------------------------------------------------

    def _load(self, path) -> None:
        import torch

        if not self.free:
            self._evict()
        slot = self.free.popleft()
        pack, target = self.packs[path], self.slots[slot]
        start = time.perf_counter()
        if self.side is not None:
            if self.free_after[slot] is not None:
                self.side.wait_event(self.free_after[slot])
            with torch.cuda.stream(self.side):
                began = torch.cuda.Event(enable_timing=True)
                began.record(self.side)
                queued = time.perf_counter()
                pack.copy_to(target, non_blocking=pack.pinned)
                if not pack.pinned:  # from pageable memory the host waits for the copy: nothing overlaps it
                    self.host_blocked += time.perf_counter() - queued
                done = torch.cuda.Event(enable_timing=True)
                done.record(self.side)
            self.ready[path] = done
            self.copies.append((began, done, self.sizes[path]))
        else:
            pack.copy_to(target)
        if self.disk is not None:  # the file's pages were read: hand them back (RAM stays flat)
            self.disk.release([path])
        pack.attach(target)  # views of the slot; on CUDA usable once the compute stream waited `done`
        self.held[path] = slot
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes += self.sizes[path]

    def _evict(self) -> None:
        """A block the order did not foresee needs a slot: drop a prefetched block that is not running."""
        for path in reversed(list(self.held)):
            if path not in self.running:
                self._drop(path)
                return
        raise RuntimeError(f"stream: {len(self.running)} streamed blocks run at once (nested in each other), more "
                           f"than the pool's {self.slot_count} buffers. Raise `prefetch` to at least "
                           f"{len(self.running)}, or name other `blocks`")

    def _drop(self, path) -> None:
        import torch

        slot = self.held.pop(path)
        self.ready.pop(path, None)
        try:
            self.packs[path].detach()
        finally:  # the slot is free again whatever happened (it is rewritten before any use)
            if self.side is not None:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.free_after[slot] = event
            self.free.append(slot)

    # --- the hooks ----------------------------------------------------------------------------------

    def begin_forward(self) -> None:
        """The model's forward starts: leftovers of an earlier one go, the first blocks are prefetched."""
        self.allocate()
        self.running = set()  # no block runs before its model's forward starts (one that raised never ended)
        for path in list(self.held):
            self._drop(path)
        self.seen = []
        if len(self.waits) > 100_000:  # called outside pipeline calls, which collect them: keep it bounded
            self.waits, self.copies = self.waits[-10_000:], self.copies[-10_000:]
        for path in self.order[:self.prefetch]:
            if self.free and path not in self.held:
                self._load(path)

    def before(self, path) -> None:
        import torch

        if self.pool is None:  # the block runs outside its model's forward (its hook did not allocate)
            self.allocate()
        if path not in self.held:
            self._load(path)
        done = self.ready.pop(path, None)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            reached = torch.cuda.Event(enable_timing=True)
            reached.record(compute)
            compute.wait_event(done)
            self.waits.append((reached, done))
        self.running.add(path)
        self.seen.append(path)
        index = self.position.get(path)
        for following in self.order[index + 1:index + 1 + self.prefetch]:
            if following in self.held:
                continue
            if not self.free:
                break
            self._load(following)

    def after(self, path) -> None:
        self.running.discard(path)
        if path in self.held:
            self._drop(path)

    def end_forward(self) -> None:
        """Learn the order the blocks ran in (prefetches follow it from the next forward)."""
        ran = list(dict.fromkeys(self.seen))
        if ran and ran != self.order[:len(ran)]:
            self.order = ran + [p for p in self.order if p not in set(ran)]
            self.position = {path: i for i, path in enumerate(self.order)}

    def report(self) -> dict:
        """This call's figures: seconds the compute stream waited for copies (the exposed transfer) and the
        copies' own seconds; on CUDA from events, elsewhere (copies made at once) both the copies' time."""
        if self.side is None:
            return {"exposed_seconds": self.stats.seconds, "copy_seconds": self.stats.seconds}
        import torch

        if self.waits or self.copies:
            torch.cuda.synchronize(self.device)
        waited = sum(max(0.0, reached.elapsed_time(done)) for reached, done in self.waits) / 1e3
        copying = sum(began.elapsed_time(done) for began, done, _ in self.copies) / 1e3
        blocked, self.host_blocked = self.host_blocked, 0.0
        self.waits, self.copies = [], []
        return {"exposed_seconds": waited + blocked, "copy_seconds": copying}


class StreamedModelCopy(PackedCopy):
    """The host copy of a `stream` component for the chain hook: its core packed, plus the blocks' pool."""

    def __init__(self, core: PackedWeights, blocks: BlockStream):
        super().__init__(core)
        self.blocks = blocks

    def onload(self, device, stream=None) -> None:
        super().onload(device, stream)
        self.blocks.allocate()

    def offload(self) -> None:
        self.blocks.free_pool()
        super().offload()

    def release(self) -> None:
        """Ordinary host tensors again, for `remove()`: every block's and the rest's."""
        super().release()
        for pack in self.blocks.packs.values():
            pack.unpack()


class StreamModelHook(ChainOffloadHook):
    """The chain hook of a `stream` component: also starts and ends the blocks' stream of each forward."""

    def _onload(self, module) -> bool:
        # Residency is the core's device copy: the model's first parameter may be a streamed block's (on the host).
        state = self.state
        if state.resident and state.host_copy.device_buffer is not None:
            state.host_copy.wait(self.execution_device)
            return False
        return super()._onload(module)

    @compiler_disabled
    def pre_forward(self, module, *args, **kwargs):
        result = super().pre_forward(module, *args, **kwargs)
        self.state.host_copy.blocks.begin_forward()
        return result

    @compiler_disabled
    def post_forward(self, module, output):
        self.state.host_copy.blocks.end_forward()
        return super().post_forward(module, output)


def install(handle, name, module, rule, previous):
    from accelerate.hooks import UserCpuOffloadHook, add_hook_to_module

    module.to("cpu")
    # Sizes as the weights are now (after `storage_dtype` / `quantize`); the plan's choice of blocks.
    layout = resized(handle.plan.component(name).stream, module, rule)
    blocks = dict(find_blocks(module, rule.blocks)) if layout.blocks else {}
    inside, rest = block_tensors(module, list(blocks.items()))
    streamed = set(layout.streamed)
    in_streamed = {id(m) for path in streamed for m in blocks[path].modules()}
    core_tensors = list(rest.values()) + [t for path in layout.resident for t in inside[path].values()]
    core_modules = [m for m in module.modules() if id(m) not in in_streamed]
    cuda = handle.device.type == "cuda"
    core = PackedWeights(core_tensors, core_modules, pinned=cuda and layout.core_pinned)
    pinned = set(layout.pinned) if cuda else set()
    packs = {path: PackedWeights(inside[path].values(), blocks[path].modules(), pinned=path in pinned)
             for path in layout.streamed}
    disk = None
    if rule.source == "disk":
        disk = _to_disk(handle, name, packs, rule)
    for pack in packs.values():
        pack.detach()
    stats = handle.stream_stats(name, tier="disk" if disk is not None else "cpu")
    # A side stream of its own: block copies do not queue behind another model's prefetch on the handle's.
    import torch

    side = torch.cuda.Stream(handle.device) if cuda else None
    stream = BlockStream(packs, dict(layout.blocks), rule.prefetch, handle.device, side, stats, disk)
    stats.report = lambda: {"resident_blocks": len(layout.resident), "streamed_blocks": len(layout.streamed),
                            **stream.report()}
    hooks = []
    for path in layout.streamed:
        block = blocks[path]
        hooks.append(block.register_forward_pre_hook(_before(stream, path)))
        hooks.append(block.register_forward_hook(_after(stream, path), always_call=True))
    handle.keep_weights(name, (hooks, disk))
    state = handle.track_residency(name, module, keep=rule.keep_on_device, nbytes=layout.core_bytes,
                                   device_bytes=layout.device_bytes)
    state.host_copy = StreamedModelCopy(core, stream)
    hook = StreamModelHook(handle.device, previous, state)
    add_hook_to_module(module, hook, append=False)
    handle.set_hook(name, hook)
    return UserCpuOffloadHook(module, hook)


def _before(stream, path):
    @compiler_disabled
    def hook(module, args):
        stream.before(path)

    return hook


def _after(stream, path):
    @compiler_disabled
    def hook(module, args, output):
        stream.after(path)

    return hook


def _to_disk(handle, name, packs, rule):
    """Write the streamed blocks' buffers to one aligned file; their host buffers become its memory map."""
    from ..disk_store import store

    weights = store(name, {path: pack.host for path, pack in packs.items()}, handle.disk_folder(rule.folder, name))
    for path, pack in packs.items():
        pack.host = weights[path]
    return weights


def uninstall(handle, name, module):
    remove_chain_hook(handle, name, module)  # and the host copy released: every block's tensors its own again
    kept = handle.take_weights(name)
    if kept is not None:
        hooks, disk = kept
        for removable in hooks:
            removable.remove()
        if disk is not None:
            from ..disk_store import discard

            discard(disk)


register_installer(StreamRule, install, uninstall)
