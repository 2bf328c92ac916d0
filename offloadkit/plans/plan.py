"""The resolved plan: what each component of one pipeline does under one policy. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..device import AUTO, Device
from ..errors import UnknownComponentError, did_you_mean
from ..policy.rules import DISK, StrategyRule
from ..units import format_bytes
from .stages import strictly_between
from .stream_layout import StreamLayout

END_OF_CALL = "end of call"


@dataclass(frozen=True)
class ComponentPlan:
    """One model component's fate under the policy.

    `rule` is the frozen rule the policy gives it (with what resolution filled in, such as
    `quantize_with`); `offloaded_by` names the component whose onload sends this one back to
    host RAM, `"end of call"` when the pipeline call's end does, or None when it never moves.
    """

    name: str
    type_name: str
    rule: StrategyRule
    home: str
    runs_on: str | None
    offloaded_by: str | None
    chain_index: int | None
    bytes: int | None
    reason: str
    # How the weights are stored: "float32", "torchao (Int8Tensor)", "float8_e4m3fn (layerwise casting, on apply)"
    weights: str | None = None
    stage: str = field(default="denoise", compare=False)  # plans.stages: where its forward's work belongs
    stream: StreamLayout | None = field(default=None, compare=False)  # rules with a block layout, when known

    @property
    def strategy(self) -> str:
        return self.rule.name

    @property
    def options(self) -> dict:
        """The rule's options as the plan shows them (precision keys only when set)."""
        return self.rule.options()

    def to_dict(self) -> dict:
        return {"name": self.name, "type_name": self.type_name, "strategy": self.strategy, "home": self.home,
                "runs_on": self.runs_on, "offloaded_by": self.offloaded_by, "chain_index": self.chain_index,
                "options": self.options, "bytes": self.bytes, "reason": self.reason, "weights": self.weights,
                **({"stream": self.stream.to_dict()} if self.stream is not None else {})}


@dataclass(frozen=True)
class Plan:
    """A policy resolved against a pipeline. `str(plan)` is a table; `plan.to_dict()` is stable."""

    pipeline: str
    policy: str
    device: Device
    sequence: tuple[str, ...]
    components: tuple[ComponentPlan, ...]
    # The hook chains when they are not one chain over `sequence`, as the pipeline's own switch makes them:
    # a combined pipeline's one per sub-pipeline (a chain's first model offloads the chains before it), or
    # links that are a component's submodule (`text_encoder.text_model`, AudioLDM2). Empty: one chain.
    chains: tuple[tuple[str, ...], ...] = ()
    # What the reader of the plan must know about it as a whole, e.g. that it runs stand-ins on the CPU
    # for a GPU policy (`StrategyRule.on_device`). Shown under the header.
    notes: tuple[str, ...] = ()

    def component(self, name: str) -> ComponentPlan:
        """The plan of one component; `UnknownComponentError` (a `KeyError` too) for a name it does not have."""
        for component in self.components:
            if component.name == name:
                return component
        raise UnknownComponentError(f"the plan of {self.pipeline} has no component {name!r}. "
                                    + did_you_mean(name, [c.name for c in self.components], "components"))

    def leaving_at(self, stage: str) -> list[str]:
        """Chain members that leave the device when a hooked model of `stage` starts: those whose own stage is
        before it and whose chain successor's is after it (a model without a successor leaves at the end of
        the call, as diffusers does). The runtime and the planner both follow this."""
        sequence = self.sequence
        return [name for name, successor in zip(sequence, sequence[1:])
                if strictly_between(self.component(name).stage, stage, self.component(successor).stage)]

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "policy": self.policy,
            "device": str(self.device),
            "sequence": list(self.sequence),
            "components": [c.to_dict() for c in self.components],
            **({"chains": [list(c) for c in self.chains]} if self.chains else {}),
            **({"notes": list(self.notes)} if self.notes else {}),
        }

    def __str__(self) -> str:
        # `auto` is decided where the policy is applied: say so once, and name it "device" in the table
        where = (f"{self.device} (the accelerator where the policy is applied)" if self.device.is_auto
                 else str(self.device))
        header = f"{self.pipeline} under policy {self.policy!r} on {where}"
        chain = " | ".join(" -> ".join(c) for c in self.chains or (self.sequence,)) if self.sequence else "(none)"
        columns = ("component", "class", "strategy", "between uses", "runs on", "offloaded by", "moves", "weights",
                   "size", "why")
        rows = [columns]
        for c in self.components:
            rows.append((c.name, c.type_name, c.strategy, _where(c.home), _where(c.runs_on) or "-",
                         c.offloaded_by or "-", _moves(c),
                         c.weights or "-", format_bytes(c.bytes), c.reason))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns) - 1)]
        lines = [header, *(f"note: {note}" for note in self.notes), f"offload chain: {chain}", ""]
        for row in rows:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
            lines.append("  ".join(cells + [str(row[-1])]).rstrip())
        return "\n".join(lines)


def _where(place: str | None) -> str | None:
    """A home or execution device as the table shows it: `auto` (explained in the header) is "device"."""
    return "device" if place == AUTO else place


def _moves(component: ComponentPlan) -> str:
    """How the weights travel, from the rule's options: the transfer kind and what is copied ahead
    (`copy-free, prefetch`; `prefetch 2` blocks for `stream`); `-` for rules without either."""
    options = component.options
    parts = []
    if "transfer" in options:
        parts.append(str(options["transfer"]))
    if options.get("use_stream"):  # group offloading's side stream loads the next group ahead
        parts.append("prefetch")
    prefetch = options.get("prefetch")
    if prefetch is True:
        parts.append("prefetch")
    elif isinstance(prefetch, int) and not isinstance(prefetch, bool):
        parts.append(f"prefetch {prefetch}")
    if options.get("source") == DISK:  # stream blocks read from files
        parts.append("from disk")
    return ", ".join(parts) or "-"
