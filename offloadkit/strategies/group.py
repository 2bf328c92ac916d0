"""`group`: diffusers' group offloading engine (`apply_group_offloading`), per component.

Weights are onloaded one group of blocks (or one leaf module) at a time and
offloaded right after; with `use_stream` the next group is prefetched on a
side stream while the current one computes. offloadkit only configures the
engine, checks its options up front and removes it again on `remove()`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import PrecisionRule, Strategy, register


class GroupRule(PrecisionRule):
    """Offload groups of blocks (or leaf modules) with diffusers' group offloading."""

    strategy: Literal["group"]
    offload_type: Literal["block_level", "leaf_level"] = Field(
        "block_level",
        description="`block_level`: groups of the model's top-level ModuleList/Sequential blocks; "
        "`leaf_level`: every leaf module on its own (lowest memory).",
    )
    num_blocks_per_group: int = Field(1, ge=1, description="Blocks per group, for `block_level`.")
    use_stream: bool = Field(False, description="Prefetch the next group on a side stream (accelerators only).")
    record_stream: bool = Field(False, description="With `use_stream`: mark tensors for the stream "
                                "(faster, a little more memory).")
    low_cpu_mem_usage: bool = Field(False, description="With `use_stream`: pin on the fly instead of keeping "
                                    "a pinned copy (less host RAM, slower).")
    non_blocking: bool = Field(False, description="Non-blocking host-to-device copies.")
    block_modules: list[str] | None = Field(
        None,
        description="Submodules to treat as blocks (for models whose layers are nested, such as text "
        "encoders: e.g. `[text_model.encoder.layers]`). Default: the model's own setting.",
    )

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        if self.record_stream and not self.use_stream:
            raise ValueError("`record_stream: true` needs `use_stream: true`. Set both, or neither")
        return self


def check(rule: GroupRule, device_type: str) -> str | None:
    """A reason the rule cannot run on this kind of device, or None."""
    if rule.use_stream and device_type == "cpu":
        return "`use_stream: true` needs an accelerator with streams; the device is the CPU. Set it to false"
    return None


def install(ctx, name, module, rule, previous):
    from diffusers.hooks.group_offloading import apply_group_offloading

    module.to("cpu")
    apply_group_offloading(
        module,
        onload_device=ctx.device,
        offload_device="cpu",
        offload_type=rule.offload_type,
        num_blocks_per_group=rule.num_blocks_per_group if rule.offload_type == "block_level" else None,
        non_blocking=rule.non_blocking,
        use_stream=rule.use_stream,
        record_stream=rule.record_stream,
        low_cpu_mem_usage=rule.low_cpu_mem_usage,
        block_modules=rule.block_modules,
    )
    _watch_groups(ctx.stream_stats(name, tier="cpu"), module)
    return None


def _watch_groups(stats, module) -> None:
    """Count every group's onload and offload (the engine calls `group.onload_()` / `offload_()` on the group)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    from ..storage import tensor_bytes

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


STRATEGY = register(Strategy(
    name="group",
    rule=GroupRule,
    summary="groups of blocks onloaded one at a time by diffusers' group offloading",
    chained=False,
    placed=False,
    install=install,
    uninstall=uninstall,
    home="cpu",
    offloaded_by="after each group",
    check=check,
))
