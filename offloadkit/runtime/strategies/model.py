"""`model`: whole-component offload, as `enable_model_cpu_offload` does it, and its chain hook.

The component lives in host RAM and moves to the device when its forward (or a
VAE's encode/decode) is called. Components in the sequence form a chain: each
one's onload offloads its predecessor. Components outside the sequence are
offloaded at the end of each call.

`ChainOffloadHook` is an Accelerate `CpuOffload` (so diffusers and its loaders
recognise model offload) that behaves the same way (onload on first use, offload
the predecessor in the chain) and also:

- tracks residency itself, so a move is recorded once, also on CPU where
  `cpu` and `cpu:0` differ only by name and `CpuOffload` would "move" every step;
- records each onload/offload in the trace with bytes and seconds;
- works for components without parameters (`CpuOffload` raises StopIteration);
- can start the upload of the next model in the chain (`prefetch`) when its own
  forward runs, so that upload overlaps this model's work.
"""

from __future__ import annotations

import time

from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module
from accelerate.utils import send_to_device

from ...accelerator import empty_cache, module_device, same_device
from ...policy.rules import ModelRule
from ...tensor_bytes import module_bytes
from ..compile_safety import compiler_disabled
from ..transfers import host_copy
from .registry import register_installer

HOST = "cpu"


class ComponentState:
    """Where one chained component is, and its size for the trace."""

    def __init__(self, name: str, stage: str, nbytes: int, trace, keep: bool = False, device_bytes=None):
        self.name = name
        self.stage = stage
        self.nbytes = nbytes  # what an onload moves
        self.device_bytes = nbytes if device_bytes is None else device_bytes  # what it holds on the device
        self.trace = trace
        self.keep = keep  # once onloaded, only remove() offloads it
        self.resident = False
        self.host_copy = None  # a transfers.HostCopy for copy-free / pinned moves

    def on_device(self, module) -> bool:
        """Resident by our own account, or moved off the host by someone else (then offload it too)."""
        if self.resident:
            return True
        device = module_device(module)
        return device is not None and device.type not in ("cpu", "meta")


class ChainOffloadHook(CpuOffload):
    def __init__(self, execution_device, prev_module_hook, state: ComponentState):
        super().__init__(execution_device=execution_device, prev_module_hook=prev_module_hook)
        self.state = state
        self.prefetch_next = None  # the hook of the next model in the chain, when that one is prefetched
        # At the start of a chain after the first (a combined pipeline's next sub-pipeline): the earlier chains'
        # hooks, whose models diffusers' sub-pipeline end of call has offloaded by then; offloaded here.
        self.offload_first = ()
        self.stream = None  # the side stream this component's prefetches run on (CUDA), else None

    def init_hook(self, module):
        """Offload to host RAM (also what `UserCpuOffloadHook.offload()` calls)."""
        state = self.state
        if not state.on_device(module):
            return module if state.host_copy is not None else module.to(HOST)
        start = time.perf_counter()
        if state.host_copy is not None:
            state.host_copy.offload()
        else:
            module = module.to(HOST)
        state.resident = False
        state.trace.record(state.name, "offload", self.execution_device, HOST, state.nbytes,
                           time.perf_counter() - start)
        return module

    @compiler_disabled
    def pre_forward(self, module, *args, **kwargs):
        previous = self.prev_module_hook
        leaving = [h for h in (previous, *self.offload_first)
                   if h is not None and not h.hook.state.keep and h.hook.state.on_device(h.model)]
        for hook in leaving:
            hook.offload()
        if leaving:
            empty_cache(self.execution_device)
        self.state.trace.enter_stage(self.state.stage)  # models of earlier stages leave before this one comes
        moved = self._onload(module)
        self.state.trace.running(self.state.stage)
        # queued after this model's own upload, which is needed first
        following = self.prefetch_next
        if following is not None and not following.state.resident:
            following.prefetch(during=self.state.stage)
        if not moved:
            return args, kwargs
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def _onload(self, module) -> bool:
        """Put the module on the execution device unless it is there; True when it moved."""
        state = self.state
        if state.resident:
            if state.host_copy is not None:
                state.host_copy.wait(self.execution_device)  # a prefetch's copies end before first use
            current = module_device(module)
            if current is None or same_device(current, self.execution_device):
                return False
        start = time.perf_counter()
        if state.host_copy is not None:
            state.host_copy.onload(self.execution_device)
        else:
            module.to(self.execution_device)
        state.resident = True
        state.trace.record(state.name, "onload", HOST, self.execution_device, state.nbytes,
                           time.perf_counter() - start, resident=state.device_bytes)
        return True

    @compiler_disabled
    def post_forward(self, module, output):
        # The compute stream waits for a prefetch started during this forward before anything after
        # the forward runs: code between models (SDXL casts its VAE to float32) may touch its weights.
        following = self.prefetch_next
        if following is not None:
            following.state.host_copy.wait(self.execution_device)
        return output

    def prefetch(self, during: str) -> None:
        """Start the upload now, as the model before it in the chain starts its forward (in stage `during`)."""
        state = self.state
        start = time.perf_counter()
        state.host_copy.onload(self.execution_device, stream=self.stream)
        state.resident = True
        # On CUDA the seconds are the host's time queueing the copies; the copies themselves overlap.
        state.trace.record(state.name, "prefetch", HOST, self.execution_device, state.nbytes,
                           time.perf_counter() - start, stage=during, resident=state.device_bytes)


def install(handle, name, module, rule, previous):
    """Install a chain hook on `module`, offloaded by the next one; returns the handle the next one needs.

    With `prefetch`, the previous model's hook starts this one's upload when it runs.
    """
    state = handle.track_residency(name, module, keep=rule.keep_on_device)
    if rule.transfer != "standard":
        if state.on_device(module):
            module.to(HOST)
        state.host_copy = host_copy(module, pinned=rule.transfer == "pinned")
    hook = ChainOffloadHook(handle.device, previous, state)
    if rule.prefetch and previous is not None:  # the plan leaves the first model of a wildcard rule without one
        hook.stream = handle.prefetch_stream()
        previous.hook.prefetch_next = hook
    add_hook_to_module(module, hook, append=False)
    handle.set_hook(name, hook)
    return UserCpuOffloadHook(module, hook)


def install_part(handle, link, owner, module, previous):
    """A chain hook on a submodule of a component (`text_encoder.text_model`), as AudioLDM2's own switch installs.

    Its moves are traced under `link`; the component's own hook, if any, moves it whole.
    """
    state = ComponentState(link, handle.plan.component(owner).stage, module_bytes(module), handle.trace)
    hook = ChainOffloadHook(handle.device, previous, state)
    add_hook_to_module(module, hook, append=False)
    return UserCpuOffloadHook(module, hook)


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    hook = handle.hook(name)
    if getattr(module, "_hf_hook", None) is hook:
        remove_hook_from_module(module)
    state = handle.residency(name)
    if state is not None and state.host_copy is not None:
        state.host_copy.offload()
        state.host_copy.release()
        state.host_copy = None


register_installer(ModelRule, install, uninstall)
