"""What moved, when: onload/offload events recorded by the hooks."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from .plans import format_bytes


@dataclass(frozen=True)
class TraceEvent:
    """One move of one component. `call` is 0 for moves made by `apply` itself."""

    call: int
    component: str
    action: str  # "onload" or "offload"
    source: str
    target: str
    bytes: int
    seconds: float
    at: float  # seconds since apply


@dataclass
class Trace:
    """The events since `apply`. Iterable; `summary()` is a table; `to_json()` for tools.

    Example::

        handle = offloadkit.apply(pipe, "diffusers-default")
        pipe("a lighthouse")
        [(e.component, e.action) for e in handle.trace]
    """

    events: list = field(default_factory=list)
    calls: int = 0
    started: float = field(default_factory=time.perf_counter)

    def record(self, component: str, action: str, source, target, nbytes: int, seconds: float) -> None:
        self.events.append(TraceEvent(self.calls, component, action, str(source), str(target), nbytes, seconds,
                                      time.perf_counter() - self.started))

    def __iter__(self):
        return iter(self.events)

    def __len__(self):
        return len(self.events)

    def for_call(self, call: int) -> list[TraceEvent]:
        return [e for e in self.events if e.call == call]

    def bytes_moved(self, call: int | None = None) -> int:
        events = self.events if call is None else self.for_call(call)
        return sum(e.bytes for e in events)

    def clear(self) -> None:
        self.events.clear()

    def to_json(self) -> str:
        return json.dumps({"calls": self.calls, "events": [asdict(e) for e in self.events]}, indent=2)

    def summary(self) -> str:
        lines = [f"{'call':>4}  {'component':<16} {'action':<8} {'from':<8} {'to':<8} {'size':>10} {'ms':>8}"]
        for e in self.events:
            lines.append(f"{e.call:>4}  {e.component:<16} {e.action:<8} {e.source:<8} {e.target:<8} "
                         f"{format_bytes(e.bytes):>10} {e.seconds * 1e3:>8.2f}")
        lines.append(f"{len(self.events)} moves, {format_bytes(self.bytes_moved())} in {self.calls} call(s)")
        return "\n".join(lines)
