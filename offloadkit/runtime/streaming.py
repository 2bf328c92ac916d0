"""Streaming weights from a host mapping (RAM or a disk file) to the device with Accelerate's hooks.

Two granularities:
- `layer`: Accelerate's `cpu_offload`, one hook per module with weights of its own
  (what `enable_sequential_cpu_offload` does): least memory, most hook overhead. Installed by
  `read_safe_streaming.stream_layers`, which also serves the reads such hooks miss.
- `block`: one hook per block (each element of the model's top-level ModuleLists, and
  each other top-level child) that materialises the whole block for its forward:
  a block's weights on the device at a time, far fewer hooks.
"""

from __future__ import annotations

from ..tensor_bytes import tensor_bytes
from .compile_safety import compiler_disabled


def _execution_device(device):
    import torch

    # Accelerate's meta-device materialisation fails for `cpu:0` but works for `cpu`.
    return torch.device("cpu") if device.type == "cpu" else device


def blocks_of(module):
    """(path, block) pairs: elements of top-level ModuleLists/Sequentials, and every other top-level child."""
    import torch

    for child_name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for index, block in enumerate(child):
                yield f"{child_name}.{index}", block
        else:
            yield child_name, child


def stream_blocks(handle, name, module, offload_buffers, weights) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils.offload import PrefixedDataset

    device = _execution_device(handle.device)
    # Buffers (small: position ids, running statistics) stay on the execution device: Accelerate's
    # whole-block materialisation trips over non-persistent ones, which are in no state dict.
    buffers = False if offload_buffers == "auto" else offload_buffers
    # outputs go back where the inputs came from, as with cpu_offload
    add_hook_to_module(module, AlignDevicesHook(io_same_device=True), append=True)
    own = [key for key, value in list(module._parameters.items()) + list(module._buffers.items())
           if value is not None]
    if own:  # tensors of the model itself, used by its own forward: streamed with it
        add_hook_to_module(module, AlignDevicesHook(execution_device=device, offload=True, offload_buffers=buffers,
                                                    weights_map=weights, place_submodules=False), append=True)
    for path, block in blocks_of(module):
        add_hook_to_module(block, AlignDevicesHook(execution_device=device, offload=True, offload_buffers=buffers,
                                                   weights_map=PrefixedDataset(weights, f"{path}."),
                                                   place_submodules=True), append=True)
    handle.set_hook(name, module._hf_hook)


def offloading_modules(module):
    """(path, module, keys) for every module whose hook streams tensors, with the keys it streams."""
    for path, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = getattr(hook, "hooks", (hook,))
        offloads = [h for h in hooks if getattr(h, "offload", False)]
        if not offloads:
            continue
        prefix = f"{path}." if path else ""
        if any(h.place_submodules for h in offloads):
            keys = [prefix + key for key, _ in sub.named_parameters()] + [prefix + key for key, _ in sub.named_buffers()]
        else:
            keys = [prefix + key for key in list(sub._parameters) + list(sub._buffers)]
        yield path, sub, keys


class StreamStats:
    """Bytes and seconds of one streamed component's loads (layers, blocks or groups), summed per call.

    The functions that put a piece's weights on the device and drop them again are replaced, on
    the objects that own them, by wrappers (`loads`, `drops`) that keep the trace's count of
    streamed bytes on the device (for exact peaks) and this call's totals (one `stream` event
    per call, at `flush`).
    """

    def __init__(self, component: str, stage: str, tier: str, trace):
        self.component = component
        self.stage = stage
        self.tier = tier
        self.trace = trace
        self.bytes = 0
        self.seconds = 0.0
        self.report = None  # () -> more figures for the call's summary, for strategies that have them

    def loads(self, load, nbytes: int):
        """`load` wrapped: its duration and `nbytes` counted, the piece counted as on the device."""
        import time

        @compiler_disabled  # bookkeeping: kept out of torch.compile graphs (no guards on the totals)
        def wrapper(*args, **kwargs):
            self.trace.enter_stage(self.stage)  # models of earlier stages leave before this piece comes
            start = time.perf_counter()
            result = load(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.bytes += nbytes
            self.trace.stream_load(self.component, self.stage, nbytes)
            return result

        return wrapper

    def drops(self, drop, nbytes: int):
        """`drop` wrapped: the piece counted as off the device again."""
        @compiler_disabled
        def wrapper(*args, **kwargs):
            result = drop(*args, **kwargs)
            self.trace.stream_drop(nbytes)
            return result

        return wrapper

    def watch(self, module) -> None:
        """Count each offloading Accelerate hook's loads (`pre_forward`) and drops (`post_forward`)."""
        for _, sub, keys in offloading_modules(module):
            hook = sub._hf_hook
            for inner in getattr(hook, "hooks", (hook,)):
                if not getattr(inner, "offload", False):
                    continue
                tensors = _tensors(sub, inner.place_submodules, inner.offload_buffers)
                nbytes = sum(tensor_bytes(t) for t in tensors)
                inner.pre_forward = self.loads(inner.pre_forward, nbytes)
                inner.post_forward = self.drops(inner.post_forward, nbytes)

    def flush(self, device) -> None:
        if self.report is not None:
            self.trace.stream_report(self.component, {"bytes": self.bytes, **self.report()})
        if self.bytes:
            self.trace.record(self.component, "stream", self.tier, device, self.bytes, self.seconds)
        self.bytes, self.seconds = 0, 0.0


def _tensors(module, recurse: bool, buffers: bool):
    found = list(module.parameters(recurse=recurse))
    if buffers:
        found += list(module.buffers(recurse=recurse))
    return found
