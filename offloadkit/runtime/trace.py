"""What moved, when: onload/offload events recorded by the hooks, per-call totals, and the budget check.

Resident bytes are counted from parameter and buffer sizes of the components
offloadkit places (exact on any machine); on CUDA each call also records
`torch.cuda.max_memory_allocated`, which includes activations.

A pipeline served for days must not grow its trace without bound: the trace keeps
the last `max_events` events and `max_calls` call summaries (a window), while the
totals (`calls`, `total_events`, `bytes_moved()`) count everything since `apply`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field

from ..errors import BudgetExceededError, BudgetWarning, OffloadkitError
from ..plans.stages import STAGES, stage_of
from ..units import format_bytes

# The window's default size: a few thousand calls of a typical chain, a few megabytes at most.
MAX_EVENTS = 10_000
MAX_CALLS = 1_000


@dataclass(frozen=True)
class TraceEvent:
    """One move of one component. `call` is 0 for moves made by `apply` itself."""

    call: int
    component: str
    # "onload", "offload", "prefetch" (an onload started ahead of use, on a side stream where there is one),
    # or "stream" (a call's piece-by-piece loads of a streamed component, summed)
    action: str
    source: str
    target: str
    bytes: int
    seconds: float
    at: float  # seconds since apply
    resident_bytes: int  # whole components on the device after this move, counted from parameter sizes
    stage: str


@dataclass(frozen=True)
class CallSummary:
    """Totals of one pipeline call."""

    call: int
    bytes_moved: int
    seconds_moving: float
    peak_resident_bytes: int
    stage_peak_bytes: dict
    device_peak_bytes: int | None  # torch.cuda.max_memory_allocated on CUDA, else None
    # per `stream` component: bytes streamed, blocks resident and streamed, exposed_seconds (the time the
    # compute waited for copies, on CUDA; elsewhere the copies' own time) and copy_seconds (the copies' time)
    streams: dict = field(default_factory=dict)


@dataclass
class Trace:
    """The events since `apply`. Iterable; `summary()` is a table; `to_json()` for tools.

    Example::

        handle = offloadkit.apply(pipe, "diffusers-default")
        pipe("a lighthouse")
        [(e.component, e.action) for e in handle.trace]
        handle.trace.calls_summary()[-1].peak_resident_bytes
    """

    events: deque = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    calls: int = 0
    total_events: int = 0  # every event since apply, also those the window no longer holds
    total_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)
    resident: dict = field(default_factory=dict)  # component -> bytes on the device now
    streaming: int = 0  # bytes of streamed components' pieces (layers, blocks, groups) on the device now
    resident_bytes: int = 0  # the sum of `resident`, kept as it changes (read on every layer of a stream)
    budget_bytes: int | None = None
    on_exceed: str = "warn"
    stages: dict = field(default_factory=dict)  # component -> its stage (from the plan); else by its name
    summaries: deque = field(default_factory=lambda: deque(maxlen=MAX_CALLS))
    # the plan's notes (`Plan.notes`), e.g. that a GPU policy runs CPU stand-ins: timings read differently then
    notes: tuple = ()
    _call_peak: int = 0
    _call_bytes: int = 0
    _call_seconds: float = 0.0
    _stage_peaks: dict = field(default_factory=dict)
    _call_streams: dict = field(default_factory=dict)
    # called with a stage when a hooked model of another stage than the last one starts (set by the handle)
    on_stage: object = field(default=None, repr=False, compare=False)
    _stage_now: str | None = None

    def _set_resident(self, component: str, nbytes: int | None) -> None:
        self.resident_bytes -= self.resident.pop(component, 0)
        if nbytes is not None:
            self.resident[component] = nbytes
            self.resident_bytes += nbytes

    def place(self, component: str, nbytes: int) -> None:
        """A component put on the device without a traced move (resident strategy on the same device)."""
        self._set_resident(component, nbytes)
        self._check_budget(component)

    def record(self, component: str, action: str, source, target, nbytes: int, seconds: float,
               stage: str | None = None, resident: int | None = None) -> None:
        """One move. `stage` defaults to the component's own (a prefetch happens during its predecessor's).

        `resident`: for an onload, the bytes the component then holds on the device, when not `nbytes`.
        """
        onload = action in ("onload", "prefetch")
        if onload:
            self._set_resident(component, nbytes if resident is None else resident)
        elif action == "offload":
            self._set_resident(component, None)
        # "stream": the pieces were counted as they came and went (stream_load / stream_drop)
        total = self.resident_bytes
        stage = stage or self.stages.get(component) or stage_of(component)
        self.events.append(TraceEvent(self.calls, component, action, str(source), str(target), nbytes, seconds,
                                      time.perf_counter() - self.started, total, stage))
        self.total_events += 1
        self.total_bytes += nbytes
        self._call_bytes += nbytes
        self._call_seconds += seconds
        if onload:
            self._peak(stage, total + self.streaming)
            self._check_budget(component)

    def enter_stage(self, stage: str) -> None:
        """A hooked model of `stage` is about to load: the handle offloads what earlier stages left behind."""
        if stage != self._stage_now:
            self._stage_now = stage
            if self.on_stage is not None:
                self.on_stage(stage)

    def running(self, stage: str) -> None:
        """A hooked component's forward starts: what is on the device now counts for its stage's peak."""
        self._peak(stage, self.resident_bytes + self.streaming)

    def stream_load(self, component: str, stage: str, nbytes: int) -> None:
        """A piece of a streamed component was put on the device (called for every layer/block/group)."""
        self.streaming += nbytes
        self._peak(stage, self.resident_bytes + self.streaming)
        if self.budget_bytes is not None:
            self._check_budget(component)

    def stream_drop(self, nbytes: int) -> None:
        self.streaming -= nbytes

    def stream_report(self, component: str, figures: dict) -> None:
        """A streamed component's figures for this call (in `CallSummary.streams`)."""
        self._call_streams[component] = dict(figures)

    def _peak(self, stage: str, total: int) -> None:
        if total > self._call_peak:
            self._call_peak = total
        if total > self._stage_peaks.get(stage, 0):
            self._stage_peaks[stage] = total

    def _check_budget(self, component: str) -> None:
        total = self.resident_bytes + self.streaming
        if self.budget_bytes is None or total <= self.budget_bytes:
            return
        listed = ", ".join(f"{name} {format_bytes(size)}" for name, size in sorted(self.resident.items()))
        if self.streaming:
            listed += f", streamed pieces {format_bytes(self.streaming)}"
        message = (f"{format_bytes(total)} on the device after {component!r} was onloaded, over the "
                   f"policy's budget of {format_bytes(self.budget_bytes)} ({listed}). Offload more components "
                   "or raise `budget.device_memory`")
        if self.on_exceed == "error":
            raise BudgetExceededError(message)
        warnings.warn(message, BudgetWarning, stacklevel=3)

    # --- per call ---------------------------------------------------------------------------------

    def begin_call(self) -> None:
        self.calls += 1
        self._call_bytes, self._call_seconds = 0, 0.0
        self.streaming = 0  # a failed forward may have skipped its drop: each call counts afresh
        self._call_peak = self.resident_bytes
        self._stage_peaks = {}
        self._call_streams = {}
        self._stage_now = None

    def end_call(self, device_peak_bytes: int | None = None) -> None:
        self.summaries.append(CallSummary(
            call=self.calls,
            bytes_moved=self._call_bytes,
            seconds_moving=self._call_seconds,
            peak_resident_bytes=self._call_peak,
            stage_peak_bytes=dict(self._stage_peaks),
            device_peak_bytes=device_peak_bytes,
            streams=dict(self._call_streams),
        ))

    def calls_summary(self) -> list[CallSummary]:
        """The summaries of the last `max_calls` calls, oldest first."""
        return list(self.summaries)

    @property
    def max_events(self) -> int:
        """How many of the latest events the trace keeps (older ones leave the window; totals stay exact)."""
        return self.events.maxlen

    @max_events.setter
    def max_events(self, value: int) -> None:
        self.events = deque(self.events, maxlen=_window(value, "max_events"))

    @property
    def max_calls(self) -> int:
        """How many of the latest call summaries the trace keeps."""
        return self.summaries.maxlen

    @max_calls.setter
    def max_calls(self, value: int) -> None:
        self.summaries = deque(self.summaries, maxlen=_window(value, "max_calls"))

    @property
    def dropped_events(self) -> int:
        """Events recorded since apply that the window no longer holds."""
        return self.total_events - len(self.events)

    # --- reading ----------------------------------------------------------------------------------

    def __iter__(self):
        return iter(self.events)

    def __len__(self):
        return len(self.events)

    def for_call(self, call: int) -> list[TraceEvent]:
        return [e for e in self.events if e.call == call]

    def bytes_moved(self, call: int | None = None) -> int:
        """All bytes moved since apply (exact, whatever the window), or those of one call in the window."""
        if call is None:
            return self.total_bytes
        return sum(e.bytes for e in self.for_call(call))

    def to_json(self) -> str:
        return json.dumps({"calls": self.calls, "total_events": self.total_events, "bytes_moved": self.total_bytes,
                           "dropped_events": self.dropped_events, "events": [asdict(e) for e in self.events],
                           "per_call": [asdict(s) for s in self.summaries],
                           **({"notes": list(self.notes)} if self.notes else {})}, indent=2)

    def summary(self) -> str:
        lines = [*(f"note: {note}" for note in self.notes),
                 f"{'call':>4}  {'component':<16} {'action':<8} {'from':<8} {'to':<8} {'size':>10} {'ms':>8} "
                 f"{'resident':>10}"]
        for e in self.events:
            lines.append(f"{e.call:>4}  {e.component:<16} {e.action:<8} {e.source:<8} {e.target:<8} "
                         f"{format_bytes(e.bytes):>10} {e.seconds * 1e3:>8.2f} {format_bytes(e.resident_bytes):>10}")
        lines.append(f"{self.total_events} moves, {format_bytes(self.bytes_moved())} in {self.calls} call(s)"
                     + (f" (the oldest {self.dropped_events} moves are no longer kept: `max_events` is "
                        f"{self.max_events})" if self.dropped_events else ""))
        if self.summaries:
            lines.append("")
            lines.append(f"{'call':>4}  {'moved':>10} {'ms moving':>10} {'peak':>10} "
                         + " ".join(f"{s:>10}" for s in STAGES) + f" {'cuda peak':>10}")
            for s in self.summaries:
                stages = " ".join(f"{format_bytes(s.stage_peak_bytes[k]) if k in s.stage_peak_bytes else '-':>10}"
                                  for k in STAGES)
                device = format_bytes(s.device_peak_bytes) if s.device_peak_bytes is not None else "-"
                lines.append(f"{s.call:>4}  {format_bytes(s.bytes_moved):>10} {s.seconds_moving * 1e3:>10.2f} "
                             f"{format_bytes(s.peak_resident_bytes):>10} {stages} {device:>10}")
        return "\n".join(lines)


def _window(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OffloadkitError(f"trace.{name} is how many entries the trace keeps: a whole number of at least 1, "
                              f"not {value!r}")
    return value
