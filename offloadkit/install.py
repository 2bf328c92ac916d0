"""Plan -> hooks on a live pipeline, and back.

`OffloadHandle` owns the pipeline's offload state while a policy is applied:

- End of call. diffusers ends each call with `maybe_free_model_hooks()`, which
  re-installs its default chain whenever `pipe._all_hooks` is non-empty. We keep
  `_all_hooks` empty (so that is a no-op) and run the policy's own end of call
  from a `try/finally` around `__call__`, so it also runs after an exception.
- Execution device. `pipe._execution_device` is answered from the plan, so
  latents are made on the policy's device whatever the first component is.

Both live in a subclass of the pipeline's class (`pipeline_class.py`), set on
the instance by `apply`; `remove()` puts the original class back.
"""

from __future__ import annotations

from .device import empty_cache, module_device, resolve_device
from .errors import PipelineError
from .pipeline_class import HANDLE_ATTR, offloaded_class
from .loading import load
from .pipeline_spec import spec_from_pipeline
from .storage import module_bytes
from .plans import Plan
from .resolve import resolve
from .strategies import STRATEGIES
from .trace import Trace


def _resolved(pipe, policy, device):
    """(policy, device, plan) for a loaded pipeline: the one resolution `plan` and `apply` share."""
    policy = load(policy)
    target = resolve_device(device if device is not None else policy.device)
    return policy, target, resolve(policy, spec_from_pipeline(pipe), str(target))


def plan(pipe, policy, *, device=None) -> Plan:
    """Resolve `policy` against a loaded pipeline without changing anything.

    Example::

        print(offloadkit.plan(pipe, "diffusers-default", device="cpu"))
    """
    return _resolved(pipe, policy, device)[2]


def apply(pipe, policy, *, device=None) -> "OffloadHandle":
    """Apply an offload policy to a loaded diffusers pipeline.

    `policy` is a `Policy`, a YAML path or a built-in name; `device` overrides the
    policy's `device` (e.g. "cpu" for tests). Applying again replaces the previous
    policy. Returns an `OffloadHandle`; `handle.remove()` undoes everything.

    Example::

        handle = offloadkit.apply(pipe, "diffusers-default")
        image = pipe("a lighthouse at dusk").images[0]
        print(handle.trace.summary())
    """
    policy, target, the_plan = _resolved(pipe, policy, device)
    _check_pipeline(pipe, the_plan)
    previous = getattr(pipe, HANDLE_ATTR, None)
    if previous is not None:
        previous.remove()
    handle = OffloadHandle(pipe, the_plan, policy, target)
    handle._install()
    return handle


def remove(pipe) -> None:
    """Remove the policy applied to `pipe` (same as `handle.remove()`); does nothing when there is none."""
    handle = getattr(pipe, HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()


def _check_pipeline(pipe, the_plan: Plan) -> None:
    """Refuse states a policy cannot be put on top of, naming the component."""
    import torch

    device_map = getattr(pipe, "hf_device_map", None)
    if isinstance(device_map, dict) and len(device_map) > 1:
        raise PipelineError(f"the pipeline was loaded with a device map ({device_map}); a policy cannot be "
                            "applied on top of it. Call pipe.reset_device_map() first, or load without device_map")
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    handle = getattr(pipe, HANDLE_ATTR, None)
    # Hooks of the policy being replaced are ours: its remove() takes them away.
    ours = {c.name for c in handle.plan.components if c.strategy != "skip"} if handle is not None else set()
    diffusers_hooks = {id(h.hook) for h in (getattr(pipe, "_all_hooks", None) or [])}
    managed = {c.name for c in the_plan.components if c.strategy != "skip"}
    for name, component in pipe.components.items():
        if name not in managed or name in ours or not isinstance(component, torch.nn.Module):
            continue
        if _is_group_offload_enabled(component):
            raise PipelineError(f"component {name!r} has diffusers group offloading that offloadkit did not "
                                "install (diffusers has no public way to undo it). Reload the component without "
                                "enable_group_offload, use `strategy: group` in the policy instead, or give it "
                                "`strategy: skip`")
        if isinstance(getattr(component, "hf_device_map", None), dict) and len(set(component.hf_device_map.values())) > 1:
            raise PipelineError(f"component {name!r} was loaded with a device map spread over several devices. "
                                "Load it without device_map, or give it `strategy: skip` in the policy")
        for module_name, module in component.named_modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None or id(hook) in diffusers_hooks:
                continue
            where = f"{name}.{module_name}" if module_name else name
            raise PipelineError(
                f"component {name!r} already has an Accelerate hook ({type(hook).__name__} on {where!r}), "
                "installed outside offloadkit (enable_sequential_cpu_offload, cpu_offload or dispatch_model?). "
                "Call pipe.remove_all_hooks() first, or give the component `strategy: skip`")


class _InstallContext:
    """What strategies need while installing: the device, the trace, and bookkeeping."""

    def __init__(self, handle: "OffloadHandle"):
        self.handle = handle
        self.device = handle.device
        self.hooked = handle._hooks
        self.states = handle._states

    def state_for(self, name, module):
        from .hooks import ComponentState

        planned = self.handle.plan.component(name).bytes
        state = ComponentState(name, planned if planned is not None else module_bytes(module), self.handle.trace)
        self.states[name] = state
        return state

    def stream_stats(self, name, tier: str):
        """The per-call totals of a component whose weights move piece by piece (one `stream` event a call)."""
        from .streaming import StreamStats

        stats = self.handle._streams[name] = StreamStats(name, tier, self.handle.trace)
        return stats

    def watch_stream(self, name, module, tier: str) -> None:
        """Trace a component streamed by Accelerate hooks: its layer loads summed per call."""
        self.stream_stats(name, tier).watch(module)

    def prefetch_stream(self):
        """One side stream per handle for prefetches, on CUDA; None elsewhere (prefetches copy at once)."""
        if self.device.type != "cuda":
            return None
        if self.handle._prefetch_stream is None:
            import torch

            self.handle._prefetch_stream = torch.cuda.Stream(self.device)
        return self.handle._prefetch_stream

    def remember_weights(self, name, weights):
        self.handle._weights[name] = weights

    def disk_folder(self, requested: str | None):
        """The policy's folder for disk-tier files, or one temporary folder per handle (deleted with it)."""
        from pathlib import Path

        if requested is not None:
            return Path(requested).expanduser()
        return self.handle._temporary_folder()

    def place(self, name, module):
        import time

        current = module_device(module)
        start = time.perf_counter()
        module.to(self.device)
        nbytes = self.handle.plan.component(name).bytes or module_bytes(module)
        if current is not None and current.type != self.device.type:
            self.handle.trace.record(name, "onload", current, self.device, nbytes, time.perf_counter() - start)
        else:
            self.handle.trace.place(name, nbytes)


class OffloadHandle:
    """A policy applied to a pipeline. `trace` records moves; `remove()` restores the pipeline."""

    def __init__(self, pipe, the_plan: Plan, policy, device):
        self.pipe = pipe
        self.plan = the_plan
        self.policy = policy
        self.device = device
        self.trace = Trace()
        if policy.budget is not None:
            self.trace.budget_bytes = policy.budget.device_memory
            self.trace.on_exceed = policy.budget.on_exceed
        self._hooks: dict = {}  # component -> its top-level hook, for every strategy that installs one
        self._states: dict = {}  # component -> residency state, for chained components
        self._saved_devices: dict = {}
        self._weights: dict = {}  # original tensors kept by strategies that leave meta tensors behind
        self._streams: dict = {}  # component -> StreamStats, for streamed (sequential/disk/group) components
        self._prefetch_stream = None  # the CUDA side stream of `prefetch` uploads, made when first needed
        self._diffusers_offload_device = None  # set when apply replaced enable_model_cpu_offload
        self._tmp = None  # temporary folder of disk-tier files
        self._tmp_cleanup = None
        self._base_class = None
        self._active = False

    def _temporary_folder(self):
        import shutil
        import tempfile
        import weakref
        from pathlib import Path

        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="offloadkit-disk-"))
            # deleted on remove(), or when the handle is garbage collected / the process exits
            self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        return self._tmp

    # --- install / remove ---------------------------------------------------------------------

    def _install(self) -> None:
        pipe = self.pipe
        # diffusers' own model offload is replaced, as enable_model_cpu_offload itself would do,
        # and given back by remove().
        if getattr(pipe, "_all_hooks", None):
            self._diffusers_offload_device = getattr(pipe, "_offload_device", None)
            pipe.remove_all_hooks()
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
        empty_cache(self.device)

    def _save_devices(self) -> None:
        components = self.pipe.components
        for component in self.plan.components:
            if component.strategy != "skip" and component.name not in self._saved_devices:
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
        from .precision import apply_precision, wants_change

        components = self.pipe.components
        for component in self.plan.components:
            if wants_change(component.options):
                apply_precision(component.name, components[component.name], component.options)

    def _install_hooks(self) -> None:
        ctx = _InstallContext(self)
        components = self.pipe.components
        # The plan lists the chain first, in order: each hook needs its predecessor's.
        previous = None
        for component in self.plan.components:
            strategy = STRATEGIES[component.strategy]
            module = components[component.name]
            link = previous if component.chain_index is not None else None
            rule = strategy.rule(strategy=strategy.name, **component.options)
            installed = strategy.install(ctx, component.name, module, rule, link)
            if component.chain_index is not None:
                previous = installed

    def _remove_hooks(self) -> None:
        components = self.pipe.components
        # Reverse of install order.
        for component in reversed(self.plan.components):
            uninstall = STRATEGIES[component.strategy].uninstall
            module = components.get(component.name)
            if uninstall is not None and module is not None:
                uninstall(self, component.name, module)
        self._hooks.clear()
        self._states.clear()
        self._streams.clear()

    def remove(self) -> None:
        """Undo `apply`: hooks removed, original class back, components on the devices they were on.

        If `apply` replaced diffusers' own `enable_model_cpu_offload`, that is switched back on.
        """
        if not self._active:
            return
        pipe = self.pipe
        self._active = False
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
        if self._diffusers_offload_device is not None:
            pipe.enable_model_cpu_offload(device=self._diffusers_offload_device)

    @property
    def active(self) -> bool:
        return self._active

    def reinstall(self) -> None:
        """Put the policy's hooks back after code outside offloadkit removed them (diffusers' loaders).

        The plan is resolved again: a loader may have added a component (`load_ip_adapter`).
        """
        self._remove_hooks()
        self.plan = _resolved(self.pipe, self.policy, self.device)[2]
        self._save_devices()
        self._install_hooks()

    # --- per call -----------------------------------------------------------------------------

    def _begin_call(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.trace.begin_call()

    def end_call(self) -> None:
        """The policy's end of call: everything the chain onloaded goes back to host RAM."""
        components = self.pipe.components
        offloaded = False
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

    def _hooks_intact(self) -> bool:
        components = self.pipe.components
        return all(getattr(components.get(n), "_hf_hook", None) is h for n, h in self._hooks.items())

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<OffloadHandle {self.plan.policy!r} on {self.device} ({state})>"
