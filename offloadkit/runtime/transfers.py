"""Faster whole-component moves for the `model` strategy: a host copy kept while the policy is applied.

Inference weights do not change, so moving a component back to host RAM need not
copy anything: the device tensors are dropped and the parameters point at the
host copy again (`copy-free`). With `pinned`, the host copy lives in page-locked
memory and onloads are non-blocking copies, which the GPU can overlap.

A prefetch (`onload(device, stream)`) makes the copies on a side stream. The device
memory is allocated on the compute stream and marked as used by the side stream
(`record_stream`), so however it is freed (an offload, a cast such as SDXL's VAE
upcast, `remove()`), the allocator does not hand it out again before the copy is
done. The side stream first waits for the compute stream's queued work (the memory
may have just been freed by it); the compute stream waits for the copies (`wait`)
before anything on it can read them.
"""

from __future__ import annotations

from .. import progress

PIN_PROGRESS_FROM = 1 * 2**30  # pinning less than this is quick: no progress bar

class _Prefetchable:
    """A host copy whose onload can be queued on a CUDA side stream (a prefetch), then waited for."""

    pending = None  # the event that ends a prefetch's copies, until the compute stream waits for it

    def _queue(self, device, stream, copy) -> None:
        """Run `copy()` (which queues copies and returns the device tensors it wrote) on `stream`."""
        import torch

        stream.wait_stream(torch.cuda.current_stream(device))  # the memory may have just been freed by it
        with torch.cuda.stream(stream):
            for target in copy():
                target.record_stream(stream)  # allocated on the compute stream, written on this one
            self.pending = torch.cuda.Event()
            self.pending.record(stream)

    def wait(self, device) -> None:
        """Make the compute stream wait for a prefetch's copies (no host synchronisation)."""
        if self.pending is not None:
            import torch

            torch.cuda.current_stream(device).wait_event(self.pending)
            self.pending = None


class HostCopy(_Prefetchable):
    """Every parameter and buffer of a component paired with its host tensor (shared ties counted once)."""

    def __init__(self, module, pinned: bool = False):
        self.pinned = pinned
        self.entries = []
        seen = set()
        total = sum(t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values()) if pinned else 0
        # pinning gigabytes takes seconds (page-locking every page): shown when it is that large
        with progress.bar("pinning host copies", total=total, unit="B", min_total=PIN_PROGRESS_FROM) as shown:
            for sub in module.modules():
                for table in (sub._parameters, sub._buffers):
                    for tensor in table.values():
                        if tensor is None or id(tensor) in seen:
                            continue
                        seen.add(id(tensor))
                        host = tensor.data
                        if host.device.type != "cpu":
                            host = host.cpu()
                        if pinned:
                            host = host.pin_memory()
                            shown.update(host.numel() * host.element_size())
                        tensor.data = host  # the model's host storage is the copy: no second copy in RAM
                        self.entries.append((tensor, host))

    def _keep(self, index, tensor, host):
        if self.pinned and not host.is_pinned():
            host = host.pin_memory()
            tensor.data = host
        self.entries[index] = (tensor, host)
        return host

    def _hosts(self):
        for index, (tensor, host) in enumerate(self.entries):
            current = tensor.data
            if current.device.type == "cpu" and current.data_ptr() != host.data_ptr():
                host = self._keep(index, tensor, current)  # replaced on the host (e.g. cast): the new one counts
            yield tensor, host

    def onload(self, device, stream=None) -> None:
        """Put the weights on `device`; with a CUDA `stream`, as copies queued on it (then `wait` before use)."""
        if stream is None:
            for tensor, host in self._hosts():
                tensor.data = host.to(device, non_blocking=self.pinned)
            return
        import torch

        pairs = [(tensor, host, torch.empty_like(host, device=device)) for tensor, host in self._hosts()]
        self._queue(device, stream, lambda: [target.copy_(host, non_blocking=True) for _, host, target in pairs])
        for tensor, _, target in pairs:
            tensor.data = target

    def offload(self) -> None:
        self.pending = None  # prefetched and never used: record_stream keeps the memory until the copy is done
        # Drop the device copies: the host tensors still hold the same values, unless the model was
        # converted while on the device (SDXL's pipeline upcasts its VAE to float32 mid-call): then copy back.
        for index, (tensor, host) in enumerate(self.entries):
            current = tensor.data
            if current.dtype != host.dtype or current.shape != host.shape:
                host = self._keep(index, tensor, current.to("cpu"))
            tensor.data = host

    def release(self) -> None:
        """Back to ordinary (pageable) host memory, for when the policy is removed."""
        for tensor, host in self.entries:
            tensor.data = host.clone() if self.pinned else host
        self.entries = []


class PackedCopy(_Prefetchable):
    """`HostCopy`'s interface over one `PackedWeights` buffer: for weights `.data` cannot move.

    Quantized weights (torchao and quanto wrapper tensors, bitsandbytes' scales and state) are moved
    by their inner tensors, in one transfer: the device copy is one allocation, dropped on offload.
    """

    def __init__(self, packed):
        self.packed = packed
        self.pinned = packed.pinned
        self.device_buffer = None

    def onload(self, device, stream=None) -> None:
        import torch

        target = torch.empty(self.packed.size, dtype=torch.uint8, device=device)  # on the compute stream
        if stream is None:
            self.packed.copy_to(target, non_blocking=self.pinned)
        else:
            self._queue(device, stream, lambda: [self.packed.copy_to(target, non_blocking=True)])
        self.packed.attach(target)
        self.device_buffer = target

    def offload(self) -> None:
        self.pending = None
        self.packed.detach()
        self.device_buffer = None

    def release(self) -> None:
        self.offload()
        self.packed.unpack()


def host_copy(module, pinned: bool):
    """The host copy a copy-free or pinned `model` transfer keeps: packed where `.data` cannot move the weights."""
    from .packed_weights import PackedWeights, needs_packing

    if not needs_packing(module):
        return HostCopy(module, pinned=pinned)
    tensors = [t for sub in module.modules() for t in (*sub._parameters.values(), *sub._buffers.values())
               if t is not None]
    return PackedCopy(PackedWeights(tensors, list(module.modules()), pinned=pinned))
