"""Streaming weights from a host mapping (RAM or a disk file) to the device with Accelerate's hooks.

Two granularities:
- `layer`: Accelerate's `cpu_offload`, one hook per module with weights of its own
  (what `enable_sequential_cpu_offload` does): least memory, most hook overhead.
- `block`: one hook per block (each element of the model's top-level ModuleLists, and
  each other top-level child) that materialises the whole block for its forward:
  a block's weights on the device at a time, far fewer hooks.
"""

from __future__ import annotations


def _execution_device(device):
    import torch

    # Accelerate's meta-device materialisation fails for `cpu:0` but works for `cpu`.
    return torch.device("cpu") if device.type == "cpu" else device


def stream_layers(ctx, name, module, offload_buffers, weights) -> None:
    from accelerate import cpu_offload

    if offload_buffers == "auto":  # diffusers' rule in enable_sequential_cpu_offload
        offload_buffers = len(module._parameters) > 0
    cpu_offload(module, _execution_device(ctx.device), offload_buffers=offload_buffers, state_dict=weights)
    ctx.hooked[name] = module._hf_hook


def blocks_of(module):
    """(path, block) pairs: elements of top-level ModuleLists/Sequentials, and every other top-level child."""
    import torch

    for child_name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for index, block in enumerate(child):
                yield f"{child_name}.{index}", block
        else:
            yield child_name, child


def stream_blocks(ctx, name, module, offload_buffers, weights) -> None:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils.offload import PrefixedDataset

    device = _execution_device(ctx.device)
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
    ctx.hooked[name] = module._hf_hook


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
    """Bytes and seconds of one streamed component's layer loads, summed over a call (for the trace).

    Each offloading Accelerate hook's `pre_forward` (where a layer's weights are put on the device)
    is timed through an instance attribute, which is what Accelerate calls.
    """

    def __init__(self, component: str, tier: str):
        self.component = component
        self.tier = tier
        self.bytes = 0
        self.seconds = 0.0

    def watch(self, module) -> None:
        import time

        for _, sub, keys in offloading_modules(module):
            hook = sub._hf_hook
            for inner in getattr(hook, "hooks", (hook,)):
                if not getattr(inner, "offload", False):
                    continue
                tensors = _tensors(sub, inner.place_submodules, inner.offload_buffers)
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                original = inner.pre_forward

                def timed(module, *args, _original=original, _nbytes=nbytes, **kwargs):
                    start = time.perf_counter()
                    result = _original(module, *args, **kwargs)
                    self.seconds += time.perf_counter() - start
                    self.bytes += _nbytes
                    return result

                inner.pre_forward = timed

    def flush(self, trace, device) -> None:
        if self.bytes:
            trace.record(self.component, "stream", self.tier, device, self.bytes, self.seconds)
        self.bytes, self.seconds = 0, 0.0


def _tensors(module, recurse: bool, buffers: bool):
    found = list(module.parameters(recurse=recurse))
    if buffers:
        found += list(module.buffers(recurse=recurse))
    return found
