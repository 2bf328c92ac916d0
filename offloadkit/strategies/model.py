"""`model`: whole-component offload, as `enable_model_cpu_offload` does it.

The component lives in host RAM and moves to the device when its forward (or a
VAE's encode/decode) is called. Components in the sequence form a chain: each
one's onload offloads its predecessor. Components outside the sequence are
offloaded at the end of each call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyRule, register


class ModelRule(StrategyRule):
    """Offload the whole component to host RAM between uses (diffusers' model offload)."""

    strategy: Literal["model"]
    keep_on_device: bool = Field(
        False,
        description="Once onloaded, stay on the device across calls: neither the next model in the chain nor "
        "the end of a call offloads it (until the policy is removed). For servers calling the same pipeline "
        "again and again.",
    )


def install(ctx, name, module, rule, previous):
    from ..hooks import attach_chain_hook

    return attach_chain_hook(ctx, name, module, previous, keep=rule.keep_on_device)


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    if getattr(module, "_hf_hook", None) is handle._hooks.get(name):
        remove_hook_from_module(module)


STRATEGY = register(Strategy(
    name="model",
    rule=ModelRule,
    summary="whole component in host RAM, moved to the device when used",
    chained=True,
    placed=False,
    install=install,
    uninstall=uninstall,
))
