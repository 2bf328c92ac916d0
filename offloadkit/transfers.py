"""Faster whole-component moves for the `model` strategy: a host copy kept while the policy is applied.

Inference weights do not change, so moving a component back to host RAM need not
copy anything: the device tensors are dropped and the parameters point at the
host copy again (`copy-free`). With `pinned`, the host copy lives in page-locked
memory and onloads are non-blocking copies, which the GPU can overlap.
"""

from __future__ import annotations


class HostCopy:
    """Every parameter and buffer of a component paired with its host tensor (shared ties counted once)."""

    def __init__(self, module, pinned: bool = False):
        self.pinned = pinned
        self.entries = []
        seen = set()
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
                    tensor.data = host  # the model's host storage is the copy: no second copy in RAM
                    self.entries.append((tensor, host))

    def _keep(self, index, tensor, host):
        if self.pinned and not host.is_pinned():
            host = host.pin_memory()
            tensor.data = host
        self.entries[index] = (tensor, host)
        return host

    def onload(self, device) -> None:
        for index, (tensor, host) in enumerate(self.entries):
            current = tensor.data
            if current.device.type == "cpu" and current.data_ptr() != host.data_ptr():
                host = self._keep(index, tensor, current)  # replaced on the host (e.g. cast): the new one counts
            tensor.data = host.to(device, non_blocking=self.pinned)

    def offload(self) -> None:
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
