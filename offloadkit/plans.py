"""The resolved plan: what each component of one pipeline does under one policy. Pure data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

END_OF_CALL = "end of call"


@dataclass(frozen=True)
class ComponentPlan:
    """One model component's fate.

    `offloaded_by` names the component whose onload sends this one back to host RAM,
    `"end of call"` when the pipeline call's end does, or None when it never moves.
    """

    name: str
    type_name: str
    strategy: str
    home: str
    runs_on: str | None
    offloaded_by: str | None
    chain_index: int | None
    options: dict
    bytes: int | None
    reason: str
    # How the weights are stored: "float32", "torchao (Int8Tensor)", "float8_e4m3fn (layerwise casting, on apply)"
    weights: str | None = None


@dataclass(frozen=True)
class Plan:
    """A policy resolved against a pipeline. `str(plan)` is a table; `plan.to_dict()` is stable."""

    pipeline: str
    policy: str
    device: str
    sequence: tuple[str, ...]
    components: tuple[ComponentPlan, ...]

    def component(self, name: str) -> ComponentPlan:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "pipeline": self.pipeline,
            "policy": self.policy,
            "device": self.device,
            "sequence": list(self.sequence),
            "components": [asdict(c) for c in self.components],
        }

    def __str__(self) -> str:
        header = f"{self.pipeline} under policy {self.policy!r} on {self.device}"
        chain = " -> ".join(self.sequence) if self.sequence else "(none)"
        columns = ("component", "class", "strategy", "between uses", "runs on", "offloaded by", "weights", "size",
                   "why")
        rows = [columns]
        for c in self.components:
            rows.append((c.name, c.type_name, c.strategy, c.home, c.runs_on or "-", c.offloaded_by or "-",
                         c.weights or "-", format_bytes(c.bytes), c.reason))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(columns) - 1)]
        lines = [header, f"offload chain: {chain}", ""]
        for row in rows:
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
            lines.append("  ".join(cells + [str(row[-1])]).rstrip())
        return "\n".join(lines)


def format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
