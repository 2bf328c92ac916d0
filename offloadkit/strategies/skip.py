"""`skip`: offloadkit leaves the component alone: no hook, no move.

For components managed by something else (a quantized model loaded straight to
the device, a component the user places by hand).
"""

from __future__ import annotations

from typing import Literal

from .base import Strategy, StrategyRule, register


class SkipRule(StrategyRule):
    """Leave the component where it is and install nothing on it."""

    strategy: Literal["skip"]


def install(ctx, name, module, rule, previous):
    return None


STRATEGY = register(Strategy(
    name="skip",
    rule=SkipRule,
    summary="left where it is; offloadkit installs nothing",
    chained=False,
    placed=False,
    install=install,
    home="unchanged",
    runs_on_device=False,
))
