"""`resident`: the component stays on the execution device, with no hook.

For small components used every call (a VAE) or ones that must never wait on a
transfer. diffusers' `_exclude_from_cpu_offload` names become `resident`.
"""

from __future__ import annotations

from typing import Literal

from .base import PrecisionRule, Strategy, register


class ResidentRule(PrecisionRule):
    """Keep the component on the execution device for as long as the policy is applied."""

    strategy: Literal["resident"]


def install(ctx, name, module, rule, previous):
    ctx.place(name, module)
    return None


STRATEGY = register(Strategy(
    name="resident",
    rule=ResidentRule,
    summary="kept on the device, never offloaded",
    chained=False,
    placed=True,
    install=install,
    home="device",
))
