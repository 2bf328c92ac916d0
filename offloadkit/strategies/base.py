"""What every strategy provides: its options (a pydantic model) and the function that installs it.

Kept free of torch imports so that validating a policy stays lightweight; the
install functions import torch and accelerate when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict


class StrategyRule(BaseModel):
    """Options of one component's strategy. Subclasses add a `strategy: Literal[...]` tag."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Strategy:
    """A strategy: its name, options model, role in planning, and installer.

    `chained` strategies take part in the offload sequence: the component is kept
    off the device until used and offloaded when the next chained component runs.
    `placed` strategies put the component on the execution device at apply time.
    `install(ctx, name, module, rule, previous)` returns what the next chained component
    needs (or None); `uninstall(handle, name, module)` undoes it.
    """

    name: str
    rule: type[StrategyRule]
    summary: str
    chained: bool
    placed: bool
    install: Callable
    uninstall: Callable | None = None
    # How the plan shows an unchained strategy: where weights live between uses ("device" means the
    # execution device), what offloads them, and whether the component computes on the device.
    home: str = "cpu"
    offloaded_by: str | None = None
    runs_on_device: bool = True
    # check(rule, device_type) -> a reason the rule cannot run on that kind of device, or None
    check: Callable | None = None


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is registered twice")
    STRATEGIES[strategy.name] = strategy
    return strategy
