"""`group`: diffusers' group offloading engine (`apply_group_offloading`), per component.

Weights are onloaded one group of blocks (or one leaf module) at a time and
offloaded right after; with `use_stream` the next group is prefetched on a
side stream while the current one computes. offloadkit only configures the
engine, checks its options up front and removes it again on `remove()`.
"""

from __future__ import annotations

from ...policy.rules import GroupRule
from ...tensor_bytes import tensor_bytes
from .registry import register_installer


def install(handle, name, module, rule, previous):
    from diffusers.hooks.group_offloading import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=handle.device,
        offload_device="cpu",
        offload_type=rule.offload_type,
        num_blocks_per_group=rule.num_blocks_per_group if rule.offload_type == "block_level" else None,
        non_blocking=rule.non_blocking,
        use_stream=rule.use_stream,
        record_stream=rule.record_stream,
        low_cpu_mem_usage=rule.low_cpu_mem_usage,
        block_modules=rule.block_modules,
    )
    _watch_groups(handle.stream_stats(name, tier="cpu"), module)
    return None


def _watch_groups(stats, module) -> None:
    """Count every group's onload and offload (the engine calls `group.onload_()` / `offload_()` on the group)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    groups = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if isinstance(registry, HookRegistry) else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    for group in groups.values():
        tensors = {id(t): t for m in group.modules for t in (*m.parameters(), *m.buffers())}
        tensors.update((id(t), t) for t in (*group.parameters, *group.buffers))
        nbytes = sum(tensor_bytes(t) for t in tensors.values())
        group.onload_ = stats.loads(group.onload_, nbytes)
        group.offload_ = stats.drops(group.offload_, nbytes)


def uninstall(handle, name, module):
    # diffusers has no public way back; these are the hooks apply_group_offloading registers.
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import group_offloading as engine

    # Every submodule's registry, not only the model's own: a model with `block_modules` (a VAE's
    # encoder and decoder) has hooks on those children and none on itself.
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if not isinstance(registry, HookRegistry):
            continue
        for hook_name in (engine._LAZY_PREFETCH_GROUP_OFFLOADING, engine._LAYER_EXECUTION_TRACKER,
                          engine._GROUP_OFFLOADING):
            if registry.get_hook(hook_name) is not None:
                registry.remove_hook(hook_name, recurse=False)
    module.to("cpu")


register_installer(GroupRule, install, uninstall)
