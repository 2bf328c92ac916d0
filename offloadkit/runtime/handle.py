"""The handle of a policy applied to a pipeline: the one owner of its offload state.

Strategies' installers (`runtime/strategies/`) and the pipeline subclass
(`pipeline_class.py`) read and change that state only through the methods below:
the hook of each component, the residency of chained ones, weights kept off the
model, the stream statistics, the prefetch stream and the disk-tier folder.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from contextlib import contextmanager

from ..accelerator import device_memory, device_type_available, empty_cache, host_ram, module_device, \
    resolve_device
from ..errors import DeviceError, PipelineError
from ..plans.pipeline_spec import spec_from_pipeline
from ..plans.plan import Plan
from ..plans.resolve import resolve
from ..plans.stream_layout import Machine
from ..policy.loading import load
from ..tensor_bytes import module_bytes
from .pipeline_class import HANDLE_ATTR, offloaded_class
from .strategies import installer_for
from .strategies.model import ComponentState, install_part
from .streaming import StreamStats
from .trace import Trace


def resolved(pipe, policy, device, *, dry_run: bool = False):
    """(policy, device, plan) for a loaded pipeline: the one resolution `plan`, `apply` and `reinstall` share.

    Without `device`, a policy whose device this machine lacks is planned on the CPU when it is a `dry_run`
    (`plan`), said in a note; `apply` refuses it, as running on the CPU unasked would surprise.
    """
    policy = load(policy)
    note = None
    if device is None and not device_type_available(policy.device):
        missing = ("no accelerator (the policy's `device: auto`)" if policy.device == "auto"
                   else f"no {policy.device!r} device (the policy's `device:`)")
        if not dry_run:
            raise DeviceError(
                f"this machine has {missing}, so policy {policy.display_name!r} cannot run as written. Pass "
                "device='cpu' to offloadkit.apply to test it on the CPU (options that need an accelerator run "
                "as their CPU stand-ins, with the same outputs), or run it where torch sees that device")
        device = "cpu"
        note = f"this machine has {missing}: planned on the CPU instead"
    target = resolve_device(device if device is not None else policy.device)
    spec = spec_from_pipeline(pipe)
    the_plan = resolve(policy, spec, str(target), machine=_machine(spec, target))
    if note is not None:
        the_plan = dataclasses.replace(the_plan, notes=(note, *the_plan.notes))
    return policy, target, the_plan


# module -> the active handle whose policy manages it. One module can follow one policy: two pipelines
# sharing components (`Pipe2(**pipe1.components)`) under two policies would move each other's weights.
_OWNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def refuse_shared_components(pipe, the_plan: Plan) -> None:
    """Refuse a plan managing a module another pipeline's active policy manages (shared `pipe.components`)."""
    components = pipe.components
    for component in the_plan.components:
        module = components.get(component.name)
        owner = _OWNERS.get(module) if component.rule.managed and module is not None else None
        if owner is None or not owner.active or owner.pipe is pipe:
            continue
        other = next((n for n, m in owner.pipe.components.items() if m is module), component.name)
        raise PipelineError(
            f"component {component.name!r} is also {other!r} of another pipeline ({owner._base_class.__name__}, "
            f"e.g. one built with Pipe(**pipe.components)), which is under the offloadkit policy "
            f"{owner.plan.policy!r}. One module can follow one policy at a time: the two would move each other's "
            "weights. Call offloadkit.remove() on the other pipeline first, or give "
            f"{component.name!r} `strategy: skip` in this policy")


def _machine(spec, device) -> Machine:
    """This machine as block layouts see it: free device memory counts what the pipeline holds there now."""
    import platform

    free, total = device_memory(device)
    if free is not None:
        free += sum(c.bytes or 0 for c in spec.components
                    if c.module is not None and getattr(module_device(c.module), "type", None) == device.type)
    return Machine(device_free=free, device_total=total, host_ram=host_ram(), system=platform.system())


def switch_owners(pipe) -> list:
    """The pipeline and the sub-pipelines it holds: where diffusers' own switch keeps its `_all_hooks`.

    A combined pipeline's override switches on its `prior_pipe` and `decoder_pipe`, whose own end of call
    re-installs their chains.
    """
    from diffusers import DiffusionPipeline

    return [pipe, *(v for v in vars(pipe).values() if isinstance(v, DiffusionPipeline))]


class OffloadHandle:
    """A policy applied to a pipeline. `trace` records moves; `remove()` restores the pipeline."""

    def __init__(self, pipe, the_plan: Plan, policy, device):
        self.pipe = pipe
        self.plan = the_plan
        self.policy = policy
        self.device = device
        self.trace = Trace(stages={c.name: c.stage for c in the_plan.components}, notes=the_plan.notes)
        self.trace.on_stage = self._stage_entered
        if policy.budget is not None:
            self.trace.budget_bytes = policy.budget.device_memory
            self.trace.on_exceed = policy.budget.on_exceed
        self._hooks: dict = {}  # component -> its top-level hook, for every strategy that installs one
        self._states: dict = {}  # component -> residency state, for chained components
        self._saved_devices: dict = {}
        self._weights: dict = {}  # original tensors kept by strategies that leave meta tensors behind
        self._streams: dict = {}  # component -> StreamStats, for streamed (sequential/disk/group) components
        self._parts: dict = {}  # "component.submodule" -> (submodule, its chain hook), for plans with such links
        self._prefetch_stream = None  # the CUDA side stream of `prefetch` uploads, made when first needed
        self._diffusers_offload_device = None  # set when apply replaced enable_model_cpu_offload
        self._tmp = None  # temporary folder of disk-tier files
        self._tmp_cleanup = None
        self._base_class = None
        self._active = False
        # Calls are serialised: two threads running one pipeline's hooks at once would move the same
        # weights both ways and leave garbage in them.
        self._call_lock = threading.Lock()
        self._caller = None  # the thread inside a call, if any

    def _temporary_folder(self, component: str):
        import shutil
        import tempfile
        from pathlib import Path

        from .disk_store import unwritable

        if self._tmp is None:
            try:
                self._tmp = Path(tempfile.mkdtemp(prefix="offloadkit-disk-"))
            except OSError as exc:
                raise unwritable(component, Path(tempfile.gettempdir()), exc) from None
            # deleted on remove(), or when the handle is garbage collected / the process exits
            self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        return self._tmp

    # --- what strategies read and change --------------------------------------------------------

    def set_hook(self, name, hook) -> None:
        """The top-level hook a strategy installed on a component (checked by `hooks_intact`)."""
        self._hooks[name] = hook

    def hook(self, name):
        return self._hooks.get(name)

    def track_residency(self, name, module, keep: bool = False, nbytes: int | None = None,
                        device_bytes: int | None = None) -> ComponentState:
        """Start tracking whether a chained component is on the device (offloaded at end of call unless `keep`).

        `nbytes`: what its onload moves (default: the component's size); `device_bytes`: what it holds on
        the device meanwhile, when that differs (a `stream` component's buffer pool).
        """
        component = self.plan.component(name)
        if nbytes is None:
            nbytes = component.bytes if component.bytes is not None else module_bytes(module)
        state = self._states[name] = ComponentState(name, component.stage, nbytes, self.trace, keep=keep,
                                                    device_bytes=device_bytes)
        return state

    def residency(self, name) -> ComponentState | None:
        return self._states.get(name)

    def stream_stats(self, name, tier: str) -> StreamStats:
        """The per-call totals of a component whose weights move piece by piece (one `stream` event a call)."""
        stats = self._streams[name] = StreamStats(name, self.plan.component(name).stage, tier, self.trace)
        return stats

    def watch_stream(self, name, module, tier: str) -> None:
        """Trace a component streamed by Accelerate hooks: its layer loads summed per call."""
        self.stream_stats(name, tier).watch(module)

    def prefetch_stream(self):
        """One side stream per handle for prefetches, on CUDA; None elsewhere (prefetches copy at once)."""
        if self.device.type != "cuda":
            return None
        if self._prefetch_stream is None:
            import torch

            self._prefetch_stream = torch.cuda.Stream(self.device)
        return self._prefetch_stream

    def keep_weights(self, name, weights) -> None:
        """Tensors a strategy took off the model (it leaves meta tensors), given back by `take_weights`."""
        self._weights[name] = weights

    def take_weights(self, name):
        return self._weights.pop(name, None)

    def weights_off_model(self) -> list[str]:
        """Components whose weights live off the model (as meta tensors) while the policy is applied."""
        return [c.name for c in self.plan.components if c.name in self._weights]

    def disk_folder(self, requested: str | None, component: str):
        """The policy's folder for disk-tier files, or one temporary folder per handle (deleted with it)."""
        from pathlib import Path

        if requested is not None:
            return Path(requested).expanduser()
        return self._temporary_folder(component)

    def place(self, name, module) -> None:
        """Put a component on the execution device for good (traced as an onload when it came from elsewhere)."""
        current = module_device(module)
        start = time.perf_counter()
        module.to(self.device)
        nbytes = self.plan.component(name).bytes or module_bytes(module)
        if current is not None and current.type != self.device.type:
            self.trace.record(name, "onload", current, self.device, nbytes, time.perf_counter() - start)
        else:
            self.trace.place(name, nbytes)

    # --- install / remove ---------------------------------------------------------------------

    def install(self) -> None:
        """Install the plan on the pipeline (what `offloadkit.apply` does after its checks)."""
        pipe = self.pipe
        self._claim_components()
        # diffusers' own model offload is replaced, as enable_model_cpu_offload itself would do,
        # and given back by remove().
        switched_on = [owner for owner in switch_owners(pipe) if getattr(owner, "_all_hooks", None)]
        if switched_on:
            self._diffusers_offload_device = getattr(switched_on[0], "_offload_device", None)
            for owner in switched_on:  # a sub-pipeline left switched on would put its chain back at its end of call
                owner.remove_all_hooks()
        self._save_devices()
        try:
            self._apply_precision()
            self._install_hooks()
        except BaseException:
            # e.g. out of memory placing a resident model: leave nothing half-installed behind
            try:
                self._remove_hooks()
                self._restore_devices()
            except Exception as cleanup:  # the first error is the one to show
                import warnings

                warnings.warn(f"offloadkit could not fully undo a failed apply: {cleanup}", RuntimeWarning)
            raise
        self._base_class = type(pipe)
        pipe.__class__ = offloaded_class(self._base_class)
        setattr(pipe, HANDLE_ATTR, self)
        self._active = True
        for name in self._managed_names():
            _OWNERS[pipe.components[name]] = self
        empty_cache(self.device)

    def _managed_names(self) -> list[str]:
        components = self.pipe.components
        return [c.name for c in self.plan.components if c.rule.managed and components.get(c.name) is not None]

    def _claim_components(self) -> None:
        refuse_shared_components(self.pipe, self.plan)

    def _release_components(self) -> None:
        for module in list(_OWNERS.keys()):
            if _OWNERS.get(module) is self:
                del _OWNERS[module]

    def _save_devices(self) -> None:
        components = self.pipe.components
        for component in self.plan.components:
            if component.rule.managed and component.name not in self._saved_devices:
                device = module_device(components[component.name])
                if device is not None:
                    self._saved_devices[component.name] = device

    def _restore_devices(self) -> None:
        components = self.pipe.components
        for name, device in self._saved_devices.items():
            module = components.get(name)
            if module is not None and module_device(module) not in (None, device):
                module.to(device)

    def _apply_precision(self) -> None:
        # Before any hook: a diffusers hook (layerwise casting) registered before Accelerate's survives its removal.
        from .precision import apply_precision

        components = self.pipe.components
        for component in self.plan.components:
            if component.rule.precision_change:
                apply_precision(component.name, components[component.name], component.rule)

    def _install_hooks(self) -> None:
        components = self.pipe.components
        # The chains first, in order: each hook needs its predecessor's.
        earlier = []  # the hooks of the chains before the current one
        for chain in self.plan.chains or (self.plan.sequence,):
            previous = None
            for link in chain:
                name, _, path = link.partition(".")
                if path:  # a submodule hooked as a link of its own (AudioLDM2's CLAP text model)
                    module = components[name].get_submodule(path)
                    installed = install_part(self, link, name, module, previous)
                    self._parts[link] = (module, installed.hook)
                else:
                    rule = self.plan.component(name).rule
                    installed = installer_for(rule).install(self, name, components[name], rule, previous)
                if previous is None and earlier:
                    installed.hook.offload_first = tuple(earlier)
                previous = installed
            earlier.extend(self._chain_hooks(chain))
        for component in self.plan.components:
            if component.chain_index is None:
                installer_for(component.rule).install(self, component.name, components[component.name],
                                                      component.rule, None)

    def _chain_hooks(self, chain) -> list:
        """The hooks of a chain's links, as `UserCpuOffloadHook`s: what the next chain's first model offloads."""
        from accelerate.hooks import UserCpuOffloadHook

        components = self.pipe.components
        found = []
        for link in chain:
            module, hook = self._parts[link] if link in self._parts else (components[link], self._hooks.get(link))
            if getattr(hook, "state", None) is not None:
                found.append(UserCpuOffloadHook(module, hook))
        return found

    def _remove_hooks(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        components = self.pipe.components
        # Reverse of install order.
        for component in reversed(self.plan.components):
            uninstall = installer_for(component.rule).uninstall
            module = components.get(component.name)
            if uninstall is not None and module is not None:
                uninstall(self, component.name, module)
        for module, hook in reversed(self._parts.values()):
            if getattr(module, "_hf_hook", None) is hook:
                remove_hook_from_module(module)
        self._parts.clear()
        self._hooks.clear()
        self._states.clear()
        self._streams.clear()

    def remove(self) -> None:
        """Undo `apply`: hooks removed, original class back, components on the devices they were on.

        If `apply` replaced diffusers' own `enable_model_cpu_offload`, that is switched back on.
        """
        if not self._active:
            return
        if self._caller == threading.get_ident():
            raise PipelineError("remove() was called from inside a call of the pipeline it would change (a "
                                "callback?). Remove the policy after the call returns")
        with self._call_lock:  # a call running in another thread finishes first
            self._remove()
        if self._diffusers_offload_device is not None:
            self.pipe.enable_model_cpu_offload(device=self._diffusers_offload_device)

    def _remove(self) -> None:
        pipe = self.pipe
        self._active = False
        self._release_components()
        try:
            self._remove_hooks()
            self._restore_devices()
        finally:
            # whatever failed above, the pipeline is not left looking as if the policy were applied
            pipe.__class__ = self._base_class
            pipe.__dict__.pop(HANDLE_ATTR, None)
            if self._tmp_cleanup is not None:
                self._tmp_cleanup()
            empty_cache(self.device)

    @property
    def active(self) -> bool:
        return self._active

    def reinstall(self) -> None:
        """Put the policy's hooks back after code outside offloadkit removed them (diffusers' loaders).

        The plan is resolved again: a loader may have added a component (`load_ip_adapter`).
        """
        self._remove_hooks()
        self.plan = resolved(self.pipe, self.policy, self.device)[2]
        self.trace.notes = self.plan.notes
        self._save_devices()
        self._install_hooks()

    # --- per call -----------------------------------------------------------------------------

    @contextmanager
    def serialised_call(self):
        """One call at a time: a call from another thread waits for the running one to end.

        A call from inside a running call on the same thread (a callback calling the pipeline) is refused:
        it would offload the models the outer call is using.
        """
        me = threading.get_ident()
        if self._caller == me:
            raise PipelineError("the pipeline was called from inside its own call (a callback calling it?); under "
                                "an offloadkit policy the inner call would offload the models the outer one is "
                                "using. Call it after the outer call returns")
        with self._call_lock:
            self._caller = me
            try:
                yield
            finally:
                self._caller = None

    def begin_call(self) -> None:
        """The policy's start of a call (the pipeline subclass calls it before the pipeline's own `__call__`)."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.trace.begin_call()

    def _stage_entered(self, stage: str) -> None:
        """A hooked model of `stage` starts: chained models of earlier stages still on the device leave now.

        A chained model whose successor in the chain runs in a later stage than the one starting (a text
        encoder before a VAE, with the denoiser under `group` between them) would otherwise stay on the
        device until that successor runs.
        """
        components = self.pipe.components
        offloaded = False
        for name in self.plan.leaving_at(stage):
            state, module = self._states.get(name), components.get(name)
            if state is None or state.keep or module is None or not state.on_device(module):
                continue
            self._hooks[name].init_hook(module)
            offloaded = True
        if offloaded:
            empty_cache(self.device)

    def end_call(self) -> None:
        """The policy's end of call: everything the chain onloaded goes back to host RAM."""
        components = self.pipe.components
        offloaded = False
        for module, hook in self._parts.values():  # before their components, which move them too
            if hook.state.on_device(module):
                hook.init_hook(module)
                offloaded = True
        for name, state in self._states.items():
            module = components[name]
            if not state.keep and state.on_device(module):
                self._hooks[name].init_hook(module)
                offloaded = True
        if offloaded:
            empty_cache(self.device)
        for stats in self._streams.values():
            stats.flush(self.device)
        device_peak = None
        if self.device.type == "cuda":
            import torch

            device_peak = torch.cuda.max_memory_allocated(self.device)
        self.trace.end_call(device_peak)

    def has_hooks(self) -> bool:
        return bool(self._hooks)

    def hooks_intact(self) -> bool:
        """Whether every hook the policy installed is still the top-level hook of its component."""
        components = self.pipe.components
        return all(getattr(components.get(n), "_hf_hook", None) is h for n, h in self._hooks.items())

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<OffloadHandle {self.plan.policy!r} on {self.device} ({state})>"
