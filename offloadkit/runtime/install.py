"""Plan -> hooks on a live pipeline, and back.

`OffloadHandle` owns the pipeline's offload state while a policy is applied:

- End of call. diffusers ends each call with `maybe_free_model_hooks()`, which
  re-installs its default chain whenever `pipe._all_hooks` is non-empty. We keep
  `_all_hooks` empty (so that is a no-op) and run the policy's own end of call
  from a `try/finally` around `__call__`, so it also runs after an exception.
- Execution device. `pipe._execution_device` is answered from the plan, so
  latents are made on the policy's device whatever the first component is.

Both live in a subclass of the pipeline's class (`pipeline_class.py`), set on
the instance by `apply`; `remove()` puts the original class back. The handle
(`handle.py`) owns the hook state.
"""

from __future__ import annotations

from ..errors import PipelineError
from ..plans.plan import Plan
from .handle import OffloadHandle, refuse_shared_components, resolved, switch_owners
from .pipeline_class import HANDLE_ATTR


def plan(pipe, policy, *, device=None) -> Plan:
    """Resolve `policy` against a loaded pipeline without changing anything.

    On a machine without the policy's device (and no `device` given) the plan is for the CPU, as
    `apply(..., device="cpu")` would run it; `plan.notes` says so.

    Example::

        print(offloadkit.plan(pipe, "diffusers-default", device="cpu"))
    """
    return resolved(pipe, policy, device, dry_run=True)[2]


def apply(pipe, policy, *, device=None) -> "OffloadHandle":
    """Apply an offload policy to a loaded diffusers pipeline.

    `policy` is a `Policy`, a YAML path or a built-in name; `device` overrides the
    policy's `device` (e.g. "cpu" for tests: options that need an accelerator then run
    as their CPU stand-ins, noted in `handle.plan.notes` and `handle.trace.notes`).
    Applying again replaces the previous policy. Returns an `OffloadHandle`;
    `handle.remove()` undoes everything.

    Example::

        handle = offloadkit.apply(pipe, "diffusers-default")
        image = pipe("a lighthouse at dusk").images[0]
        print(handle.trace.summary())
    """
    policy, target, the_plan = resolved(pipe, policy, device)
    refuse_shared_components(pipe, the_plan)  # before the hook check: those hooks are another policy's
    _check_pipeline(pipe, the_plan)
    previous = getattr(pipe, HANDLE_ATTR, None)
    if previous is not None:
        previous.remove()
    handle = OffloadHandle(pipe, the_plan, policy, target)
    handle.install()
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
    ours = {c.name for c in handle.plan.components if c.rule.managed} if handle is not None else set()
    diffusers_hooks = {id(h.hook) for owner in switch_owners(pipe)
                       for h in (getattr(owner, "_all_hooks", None) or [])}
    managed = {c.name for c in the_plan.components if c.rule.managed}
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
