"""What every strategy provides: its options (a pydantic model) and the function that installs it.

Kept free of torch imports so that validating a policy stays lightweight; the
install functions import torch and accelerate when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrategyRule(BaseModel):
    """Options of one component's strategy. Subclasses add a `strategy: Literal[...]` tag."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Precision keys are dropped from a plan's options when unset, so plans of policies without them do not change.
PRECISION_KEYS = ("storage_dtype", "compute_dtype", "quantize", "quantize_with")


class PrecisionRule(StrategyRule):
    """A strategy rule that may also change how the component's weights are stored (applied in place)."""

    storage_dtype: Literal["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"] | None = Field(
        None,
        description="Store the weights of the component's layers in this dtype and cast each layer up to "
        "`compute_dtype` only while it runs (diffusers' layerwise casting): fewer bytes stored and moved. "
        "Norms, embeddings and the layers the model keeps in float32 stay as they are. Changes the weights "
        "in place; `remove()` does not undo it.",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="With `storage_dtype`: the dtype layers run in. Default: the component's dtype.")
    quantize: Literal["int8"] | None = Field(
        None,
        description="Quantize the weights of every Linear layer when the policy is applied (`int8`: weight-only "
        "int8 with one scale per output row), so no quantized checkpoint is needed. Changes the weights in "
        "place; `remove()` does not undo it.",
    )
    quantize_with: Literal["auto", "torchao", "quanto"] = Field(
        "auto",
        description="Backend for `quantize`: `auto` picks torchao, or optimum-quanto where torchao is not "
        "installed or cannot serve the strategy.",
    )

    @model_validator(mode="after")
    def _one_precision_change(self):
        if self.storage_dtype is not None and self.quantize is not None:
            raise ValueError("`storage_dtype` and `quantize` cannot both be set: a quantized layer has no float "
                             "storage to cast. Keep one")
        if self.compute_dtype is not None and self.storage_dtype is None:
            raise ValueError("`compute_dtype` is the dtype layers are cast up to from `storage_dtype`. Set "
                             "`storage_dtype` too, or remove `compute_dtype`")
        if self.quantize_with != "auto" and self.quantize is None:
            raise ValueError("`quantize_with` picks the backend of `quantize`. Set `quantize: int8` too, or "
                             "remove `quantize_with`")
        return self


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
