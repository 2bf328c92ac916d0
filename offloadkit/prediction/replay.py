"""Predicting a pipeline call under a policy before anything is loaded: memory per stage, bytes moved, time.

A plan (policy resolved against a pipeline) is replayed against the call's
schedule (`schedule.py`: which models run, in what order) with the same rules
the runtime hooks follow, so the weight bytes it predicts per stage are the
bytes `handle.trace` records (checked exactly in the tests). On top of the
weights it adds each stage's working memory (`activations.py`) and, with a
hardware profile, the time the transfers take.

What is predicted, per stage (encode, denoise, decode):
- weights on the device at the stage's peak, and the tiers of the rest (host RAM, disk);
- the peak device memory: weights at each forward plus that forward's working memory;
- the bytes moved (onloads, offloads, prefetches, streamed pieces) and their seconds.

Transfer times are bytes over the profile's bandwidths: pageable or pinned
host-to-device by the strategy's transfer, device-to-host for `standard`
offloads (copy-free ones drop the device copy), disk reads for the disk tier.
Copies that overlap compute (prefetches, group offloading with streams) are
reported apart, as overlapped: without a compute model they are not on the
critical path only when the work they overlap is longer than they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from ..device import Device
from ..errors import UnknownComponentError
from ..plans import precision
from ..plans.component_rules import planned_module_bytes
from ..plans.plan import Plan
from ..plans.stages import STAGES
from ..policy.rules import DISK, HOME_DEVICE, HOST
from ..tensor_bytes import module_bytes, planned_sizes
from ..units import format_bytes, torch_dtype_name
from .schedule import CallSchedule, CallSettings
from ..plans.stream_layout import pinned_bytes, resized
from .stream_profiles import StreamProfile, stream_note, stream_profile


@dataclass(frozen=True)
class PredictedEvent:
    """One predicted move, as `handle.trace` would record it (call 1 is the first call after apply)."""

    call: int
    component: str
    action: str  # onload, offload, prefetch, stream
    bytes: int
    stage: str
    seconds: float | None  # None without a hardware profile
    overlapped: bool = False


@dataclass(frozen=True)
class StagePrediction:
    stage: str
    weights_bytes: int  # the most component weights on the device at once during the stage
    # the same as `handle.trace` counts it: at hooked components' moves and forwards (None: no hooked
    # component runs in the stage, e.g. a resident VAE's decode, so the trace records no peak for it)
    traced_weights_bytes: int | None
    working_bytes: int | None  # working memory of the forward at that peak (None: not estimated)
    device_peak_bytes: int  # max over the stage's forwards of weights + working memory
    host_bytes: int  # weights held in host RAM at that moment
    disk_bytes: int  # weights held on disk
    bytes_moved: int
    transfer_seconds: float | None
    overlapped_seconds: float | None
    compute_seconds: float | None = None  # the stage's forwards at the profile's compute rate (None: no estimate)

    @property
    def exposed_seconds(self) -> float | None:
        """Transfer time the stage's compute does not hide: every blocking copy, and overlappable copies beyond
        the stage's compute."""
        if self.transfer_seconds is None or self.compute_seconds is None:
            return None
        return self.transfer_seconds + max(0.0, (self.overlapped_seconds or 0.0) - self.compute_seconds)


@dataclass(frozen=True)
class Prediction:
    """What one call of a pipeline under a plan is predicted to do. `str()` is a report; `to_dict()` is stable."""

    pipeline: str
    policy: str
    device: str
    hardware: str | None
    settings: dict
    schedule: str  # e.g. "text_encoder x2, unet x30, vae x1"
    schedule_assumed: bool
    stages: tuple[StagePrediction, ...]
    bytes_moved: int
    transfer_seconds: float | None
    overlapped_seconds: float | None
    weights_peak_bytes: int  # the most component weights on the device at once
    traced_peak_bytes: int  # the call's peak as `handle.trace` counts it (calls_summary().peak_resident_bytes)
    device_peak_bytes: int
    runtime_overhead_bytes: int  # CUDA context and library workspaces: added when checking a card's memory
    hook_calls: int  # offload hook invocations per call (one per model forward, one per streamed piece)
    first_call_bytes_moved: int
    notes: tuple[str, ...] = ()
    pinned_host_bytes: int = 0  # page-locked host RAM the policy takes (pinned transfers, pinned streamed blocks)
    host_peak_bytes: int = 0  # the most weights in host RAM at any forward of the call
    disk_peak_bytes: int = 0  # the most weights in disk files
    limits: tuple = ()  # limits.LimitCheck per limit of the hardware profile (empty without one)
    compute_seconds: float | None = None  # the call's forwards at the profile's compute rate (all resident)
    call_seconds: float | None = None  # compute plus the transfer time it does not hide, per stage
    events: tuple[PredictedEvent, ...] = field(default=(), repr=False, compare=False)

    @property
    def required_device_bytes(self) -> int:
        """What the card must have free: the peak plus the runtime's own overhead."""
        return self.device_peak_bytes + self.runtime_overhead_bytes

    def stage(self, name: str) -> StagePrediction:
        for stage in self.stages:
            if stage.stage == name:
                return stage
        raise UnknownComponentError(f"the prediction has no stage {name!r} (no model runs in it). Stages: "
                                    + ", ".join(repr(s.stage) for s in self.stages))

    @property
    def fits(self) -> bool | None:
        """Whether every limit of the hardware profile holds (None without a profile)."""
        return all(c.fits for c in self.limits) if self.limits else None

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("events")
        data["required_device_bytes"] = self.required_device_bytes
        data["limits"] = [c.to_dict() for c in self.limits]
        data["fits"] = self.fits
        return data

    def __str__(self) -> str:
        hardware = f" with hardware {self.hardware!r}" if self.hardware else ""
        s = self.settings
        size = f"{s['height']}x{s['width']}" + (f"x{s['num_frames']} frames" if s.get("num_frames") else "")
        lines = [f"{self.pipeline} under policy {self.policy!r} on {self.device}{hardware}",
                 f"call: {size}, {s['steps']} steps, batch {s['batch']}, guidance {'on' if s['guidance'] else 'off'}, "
                 f"weights {s['dtype'] or 'as loaded'}"
                 f"; forwards: {self.schedule}" + (" (assumed)" if self.schedule_assumed else ""), ""]
        rows = [("stage", "weights on dev", "working mem", "device peak", "host RAM", "disk", "moved", "transfer s",
                 "overlapped s")]
        for st in self.stages:
            rows.append((st.stage, format_bytes(st.weights_bytes), format_bytes(st.working_bytes),
                         format_bytes(st.device_peak_bytes), format_bytes(st.host_bytes), format_bytes(st.disk_bytes),
                         format_bytes(st.bytes_moved), _seconds(st.transfer_seconds), _seconds(st.overlapped_seconds)))
        rows.append(("call", format_bytes(self.weights_peak_bytes), "", format_bytes(self.device_peak_bytes), "", "",
                     format_bytes(self.bytes_moved), _seconds(self.transfer_seconds),
                     _seconds(self.overlapped_seconds)))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        lines.append("")
        lines.append(f"peak device memory {format_bytes(self.device_peak_bytes)} + runtime overhead "
                     f"{format_bytes(self.runtime_overhead_bytes)} = {format_bytes(self.required_device_bytes)} needed")
        if self.call_seconds is not None:
            lines.append(f"predicted call time {self.call_seconds:.2f} s: compute {self.compute_seconds:.2f} s + "
                         f"{self.call_seconds - self.compute_seconds:.2f} s of transfers it does not hide "
                         f"(all resident: {self.compute_seconds:.2f} s)")
        if self.pinned_host_bytes:
            lines.append(f"pinned host RAM {format_bytes(self.pinned_host_bytes)} (in the host RAM figures above)")
        if self.first_call_bytes_moved != self.bytes_moved:
            lines.append(f"first call moves {format_bytes(self.first_call_bytes_moved)} (later calls: the figures above)")
        if self.limits:
            verdict = "fits every limit" if self.fits else "does NOT fit"
            lines.append(f"limits of {self.hardware}: {verdict}")
            lines.extend(f"  {c.line()}" for c in self.limits)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------------------
# Replaying the runtime's rules
# --------------------------------------------------------------------------------------------------

class _StagePeak:
    """Within one stage of one call: the trace's weights peak, and the device peak with its moment."""

    def __init__(self):
        self.traced = None  # weights as the trace counts them (None: no hooked component ran in the stage)
        self.weights = 0  # weights on the device, the most at once
        self.device = 0  # weights + working memory, the most at any forward
        self.working = None
        self.tiers = (0, 0)  # (host, disk) bytes of weights at that forward


class _Replay:
    """The trace's bookkeeping, driven by the schedule instead of hooks (see runtime/strategies/model.py, trace.py)."""

    def __init__(self, plan: Plan, streams: dict, working: dict, cost):
        self.plan = plan
        self.streams = streams  # component -> StreamProfile
        self.working = working  # component -> working memory of one forward
        self.cost = cost  # (component, action, bytes) -> (seconds or None, overlapped)
        self.components = {c.name: c for c in plan.components}
        self.chained = [c.name for c in plan.components if c.rule.chained]
        self.resident = {c.name: c.bytes or 0 for c in plan.components if c.rule.home == HOME_DEVICE}
        self.moved = {}  # chained component on the device -> the bytes its onload moved (what offload moves)
        self.events: list = []
        self.host_peak = self.disk_peak = 0
        self.call = 0
        self.hook_calls = 0  # of the current call

    def _record(self, component, action, nbytes, stage=None):
        seconds, overlapped = self.cost(component, action, nbytes)
        self.events.append(PredictedEvent(self.call, component, action, nbytes,
                                          stage or self.components[component].stage, seconds, overlapped))

    def _traced(self, stage, weights):
        peak = self.stages.setdefault(stage, _StagePeak())
        peak.traced = max(peak.traced or 0, weights)
        peak.weights = max(peak.weights, weights)
        self.call_peak = max(self.call_peak, weights)

    def _device(self, stage, weights, working):
        host, disk = self._tiers()
        self.host_peak, self.disk_peak = max(self.host_peak, host), max(self.disk_peak, disk)
        peak = self.stages.setdefault(stage, _StagePeak())
        device = weights + (working or 0)
        peak.weights = max(peak.weights, weights)
        self.device_weights = max(self.device_weights, weights)
        if device > peak.device:
            peak.device, peak.working, peak.tiers = device, working, (host, disk)

    def _tiers(self):
        """(host, disk) bytes of weights now."""
        host = disk = 0
        for c in self.plan.components:
            size = c.bytes or 0
            on_disk = self.streams[c.name].disk_bytes if c.name in self.streams else 0
            if on_disk:  # a chained component streaming from disk: the rest of it is in host RAM
                disk += on_disk
                host += size - on_disk
            elif c.rule.weights_tier == DISK:
                disk += size
            elif c.rule.weights_tier == HOST and (not c.rule.chained or c.rule.host_copy_while_on_device
                                                    or c.name not in self.resident):
                host += size
        return host, disk

    def _enter(self, stage):
        """OffloadHandle._stage_entered: chained models of earlier stages leave when a hooked model of `stage` starts."""
        if stage == self.stage_now:
            return
        self.stage_now = stage
        for name in self.plan.leaving_at(stage):
            if not getattr(self.components[name].rule, "keep_on_device", False) and name in self.resident:
                self._offload(name)

    def _offload(self, name):
        held = self.resident.pop(name)
        self._record(name, "offload", self.moved.pop(name, held))

    def _onload(self, name, action, stage=None):
        """A chained component comes to the device: (moved, held) are the profile's for `stream`."""
        c = self.components[name]
        profile = self.streams.get(name)
        moved = c.bytes or 0
        if profile is not None and profile.chained_bytes is not None:
            moved = profile.chained_bytes
        self.resident[name] = profile.device_bytes if profile is not None and profile.device_bytes is not None \
            else moved
        self.moved[name] = moved
        self._record(name, action, moved, stage=stage)

    def run_call(self, forwards) -> None:
        self.call += 1
        self.stages: dict = {}  # stage -> _StagePeak
        self.call_peak = sum(self.resident.values())
        self.device_weights = self.call_peak
        self.hook_calls = 0
        self.stage_now = None
        streamed: dict = {}
        sequence = self.plan.sequence
        for name in forwards:
            c = self.components.get(name)
            if c is None or not c.rule.managed:
                continue
            stage = c.stage
            if c.rule.chained:  # ChainOffloadHook.pre_forward
                self.hook_calls += 1
                index = c.chain_index
                if index:
                    previous = self.components[sequence[index - 1]]
                    if not getattr(previous.rule, "keep_on_device", False) and previous.name in self.resident:
                        self._offload(previous.name)
                self._enter(stage)
                if name not in self.resident:
                    self._onload(name, "onload")
                self._traced(stage, sum(self.resident.values()))  # the onload, then the forward's start
                following = sequence[index + 1] if index is not None and index + 1 < len(sequence) else None
                if following and self.components[following].rule.uploads_ahead \
                        and following not in self.resident:
                    self._onload(following, "prefetch", stage=stage)
                    self._traced(stage, sum(self.resident.values()))
                weights = sum(self.resident.values())
                if name in self.streams:  # and its streamed blocks, through the pool it holds
                    profile = self.streams[name]
                    streamed[name] = streamed.get(name, 0) + profile.per_forward
                    self.hook_calls += profile.pieces
            elif name in self.streams:  # pieces loaded and dropped inside the forward
                profile: StreamProfile = self.streams[name]
                if profile.pieces:
                    self._enter(stage)
                streamed[name] = streamed.get(name, 0) + profile.per_forward
                self.hook_calls += profile.pieces
                weights = sum(self.resident.values()) + profile.peak
                self._traced(stage, weights)
            else:  # resident: no hook, so the trace sees nothing; the device does
                weights = sum(self.resident.values())
            self._device(stage, weights, self.working.get(name))
        for name in self.chained:  # OffloadHandle.end_call
            if not getattr(self.components[name].rule, "keep_on_device", False) and name in self.resident:
                self._offload(name)
        for c in self.plan.components:
            if streamed.get(c.name):
                self._record(c.name, "stream", streamed[c.name])


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def predict_plan(plan: Plan, modules: dict, schedule: CallSchedule, settings: CallSettings, *, hardware=None,
                 working_memory=None, runtime_overhead: int = 0, calls: int = 2, profiles=None,
                 flops=None) -> Prediction:
    """Replay `plan` for `calls` calls of `schedule`; the figures are those of the last call.

    `modules` are the pipeline's models (built on `meta` or loaded) by name; `working_memory`,
    if given, maps a component name to the working memory of one of its forwards. `profiles`
    caches stream profiles across predictions: a dict filled as (component, rule) pairs are met.
    """
    profiles = {} if profiles is None else profiles
    streams = {}
    for c in plan.components:
        key = (c.name, repr(c.rule), repr(c.stream))
        if key not in profiles:
            profiles[key] = stream_profile(modules[c.name], c.rule, c.stream) if c.name in modules else None
        if profiles[key] is not None:
            streams[c.name] = profiles[key]
    working = dict(working_memory or {})
    replay = _Replay(plan, streams, working, _bandwidths(plan, streams, hardware))
    for _ in range(calls):
        replay.run_call(schedule.forwards)
    last = replay.call
    events = [e for e in replay.events if e.call == last]
    first = [e for e in replay.events if e.call == 1]
    stages = []
    timed = hardware is not None
    compute = _compute_seconds(plan, schedule, hardware, flops)
    for stage in STAGES:
        peak = replay.stages.get(stage)
        stage_events = [e for e in events if e.stage == stage]
        if peak is None and not stage_events:
            continue
        peak = peak or _StagePeak()
        stages.append(StagePrediction(
            stage=stage,
            weights_bytes=peak.weights,
            traced_weights_bytes=peak.traced,
            working_bytes=peak.working,
            device_peak_bytes=peak.device,
            host_bytes=peak.tiers[0],
            disk_bytes=peak.tiers[1],
            bytes_moved=sum(e.bytes for e in stage_events),
            transfer_seconds=sum(e.seconds for e in stage_events if not e.overlapped) if timed else None,
            overlapped_seconds=sum(e.seconds for e in stage_events if e.overlapped) if timed else None,
            compute_seconds=compute.get(stage, 0.0) if compute is not None else None,
        ))
    counts = Counter(schedule.forwards)
    notes = []
    if working_memory is None:
        notes.append("working memory not estimated: the device peak counts weights only")
    for c in plan.components:
        if not c.rule.managed:
            notes.append(f"{c.name!r} is skipped: offloadkit does not manage it, so its weights are not counted")
    pinned = 0
    for c in plan.components:
        if c.stream is not None:
            layout = resized(c.stream, modules[c.name], c.rule) if c.name in modules else c.stream
            notes.append(f"{c.name}: {layout.summary()}")
            pinned += pinned_bytes(layout)
        elif c.rule.pins_host_copy and plan.device.type == "cuda":
            pinned += c.bytes or 0
    for note in dict.fromkeys(stream_note(c.rule) for c in plan.components):
        if note:
            notes.append(note)
    return Prediction(
        pipeline=plan.pipeline,
        policy=plan.policy,
        device=plan.device,
        hardware=getattr(hardware, "name", None),
        settings=asdict(settings),
        schedule=", ".join(f"{n} x{k}" for n, k in counts.items()),
        schedule_assumed=schedule.assumed,
        stages=tuple(stages),
        bytes_moved=sum(e.bytes for e in events),
        transfer_seconds=sum(e.seconds for e in events if not e.overlapped) if timed else None,
        overlapped_seconds=sum(e.seconds for e in events if e.overlapped) if timed else None,
        weights_peak_bytes=max(replay.device_weights, replay.call_peak),
        traced_peak_bytes=replay.call_peak,
        device_peak_bytes=max((s.device_peak_bytes for s in stages), default=0),
        runtime_overhead_bytes=runtime_overhead,
        hook_calls=replay.hook_calls,
        first_call_bytes_moved=sum(e.bytes for e in first),
        notes=tuple(notes),
        pinned_host_bytes=pinned,
        compute_seconds=sum(compute.values()) if compute is not None else None,
        call_seconds=sum(s.compute_seconds + s.exposed_seconds for s in stages) if compute is not None else None,
        host_peak_bytes=replay.host_peak,
        disk_peak_bytes=replay.disk_peak,
        events=tuple(replay.events),
    )


def _compute_seconds(plan: Plan, schedule: CallSchedule, hardware, flops) -> dict | None:
    """{stage: seconds of the call's forwards at the profile's compute rate}, or None without an estimate for
    every model that runs (a partial sum would look like a prediction and be wrong)."""
    if hardware is None or not getattr(hardware, "compute", None) or not flops:
        return None
    stages = {c.name: c.stage for c in plan.components}
    if any(name in stages and name not in flops for name in schedule.forwards):
        return None
    rate = hardware.compute * hardware.compute_efficiency
    seconds: dict = {}
    for name in schedule.forwards:
        if name in stages:
            seconds[stages[name]] = seconds.get(stages[name], 0.0) + flops[name] / rate
    return seconds


def _bandwidths(plan: Plan, streams: dict, hardware):
    """(component, action, bytes) -> (seconds or None, overlapped) under the hardware profile."""
    components = {c.name: c for c in plan.components}

    def cost(name, action, nbytes):
        if hardware is None:
            return None, action == "prefetch"
        rule = components[name].rule
        pinned, pageable = hardware.h2d_pinned, hardware.h2d_pageable
        d2h = getattr(hardware, "d2h", None) or pageable
        if action in ("onload", "prefetch"):
            rate = pinned if rule.onload_pinned else pageable
            return nbytes / rate, action == "prefetch"
        if action == "offload":
            return (nbytes / d2h if rule.offload_copies_back else 0.0), False
        profile = streams[name]  # a `stream` event
        if profile.source == DISK:
            return nbytes / hardware.disk_read + nbytes / pageable, False
        share = profile.pinned_share
        return nbytes * share / pinned + nbytes * (1 - share) / pageable, profile.overlapped

    return cost


def predict(source, policy, *, hardware=None, settings: CallSettings | None = None, device=None,
            headroom=None) -> Prediction:
    """Predict one call of a pipeline under `policy`, before loading any weights.

    `source` is a built-in architecture name (`offloadkit.prediction.sizing.architecture_names()`), a model
    folder (model_index.json + configs), or a loaded pipeline. `hardware` is a profile (name,
    path or `HardwareProfile`) for times and the runtime overhead; `settings` the call's size.

    Example::

        print(offloadkit.predict("sdxl", "diffusers-default", hardware="rtx-4090-24gb"))
    """
    from ..plans.resolve import resolve
    from ..policy.loading import load

    policy = load(policy)
    profile = _hardware(hardware)
    own = None if policy.device == "auto" else policy.device  # `auto`: the hardware profile's device decides
    context = prediction_context(source, hardware=profile, settings=settings, device=device or own,
                                 headroom=headroom)
    plan = resolve(policy, context.spec, context.device, machine=context.machine)
    return context.predict(plan)


@dataclass
class PredictionContext:
    """Everything about one pipeline, call and machine that predictions of several plans share."""

    spec: object  # PipelineSpec with sizes
    modules: dict
    settings: CallSettings
    schedule: CallSchedule
    device: str
    hardware: object
    working: dict | None
    overhead: int
    notes: list
    profiles: dict = field(default_factory=dict)
    headroom: object = None  # a size or share kept free on the device and in host RAM; None: the profile's own
    flops: dict | None = None  # component -> FLOPs of one forward (compute.component_flops), counted when first needed

    @property
    def machine(self):
        """The hardware profile as block layouts (`stream`, `resident: auto`) see a machine; unknown without one."""
        from ..plans.stream_layout import Machine

        if self.hardware is None:
            return Machine()
        from ..units import share_bytes

        memory = self.hardware.device_memory
        # what the limits check keeps free is not for blocks either
        kept = share_bytes(self.headroom or self.hardware.device_headroom, memory)
        return Machine(device_free=memory - self.overhead - kept, device_total=memory,
                       host_ram=self.hardware.host_memory, system="Linux",
                       working=tuple(sorted((self.working or {}).items())))

    def predict(self, plan: Plan) -> Prediction:
        from dataclasses import replace

        # `storage_dtype` / `quantize` are sized as they will be once applied: every size below sees them.
        changed = {c.name: self.modules[c.name] for c in plan.components
                   if c.name in self.modules and c.rule.precision_change}
        sizes = {}
        for c in plan.components:
            if c.name in changed:
                key = ("planned", c.name, c.rule.storage_dtype, c.rule.quantize, c.rule.quantize_with)
                if key not in self.profiles:  # the same change sized once per context (the modules do not change)
                    self.profiles[key] = precision.planned_tensor_bytes(changed[c.name], c.rule)
                sizes.update(self.profiles[key])
        with planned_sizes(sizes):
            if changed:
                plan = replace(plan, components=tuple(
                    replace(c, bytes=planned_module_bytes(changed[c.name], self.spec.get(c.name).bytes, c.rule))
                    if c.name in changed else c
                    for c in plan.components))
            if self.flops is None and self.hardware is not None and self.hardware.compute:
                from .compute import component_flops

                self.flops = component_flops(self.modules, self.settings, self.spec.class_name)
            prediction = predict_plan(plan, self.modules, self.schedule, self.settings, hardware=self.hardware,
                                      working_memory=self.working, runtime_overhead=self.overhead,
                                      profiles=self.profiles, flops=self.flops)
        if self.hardware is not None:
            from .limits import check_limits

            prediction = replace(prediction, limits=check_limits(prediction, self.hardware, self.headroom))
        return _with_notes(prediction, self.notes) if self.notes else prediction


def prediction_context(source, *, hardware=None, settings: CallSettings | None = None,
                       device=None, headroom=None) -> PredictionContext:
    """Size the pipeline, its call and the machine once (see `predict`)."""
    from dataclasses import replace

    from .schedule import pipeline_family, schedule

    profile = _hardware(hardware)
    settings = settings or CallSettings()
    built = not (hasattr(source, "components") and not isinstance(source, str))
    if built and settings.dtype is None:  # what the model is run in (its checkpoint's dtype); `--dtype` says otherwise
        from .sizing import shipped_dtype

        settings = replace(settings, dtype=shipped_dtype(source))
    spec, modules, force_zeros = _source(source, settings.dtype if built else None)
    settings = settings.resolved(pipeline_family(spec.class_name))
    notes = []
    target = device or (profile.device if profile is not None else None) or "auto"
    target = Device.parse(target)
    if target.is_auto:
        target = Device.parse("cuda:0")
        notes.append("device `auto` predicted as cuda:0")
    present = [c.name for c in spec.components if c.is_model and c.present]
    extra = _pipeline_extras(source) if built else {}
    call = schedule(spec.class_name, present, settings, offload_seq=spec.offload_seq or (),
                    force_zeros_for_empty_prompt=force_zeros,
                    stages={c.name: c.stage for c in spec.components if c.is_model}, **extra)
    working, overhead = _working_memory(source, spec.class_name, modules, settings, target)
    missing = sorted(set(modules) - set(working or {}))
    if missing:
        notes.append(f"no working-memory estimate for {', '.join(missing)}: weights only for them")
    if headroom is not None:
        from ..errors import CallSettingsError
        from ..units import parse_share

        try:
            parse_share(headroom)
        except ValueError as exc:
            raise CallSettingsError(f"headroom: {exc}") from None
    return PredictionContext(spec, modules, settings, call, target, profile, working, overhead, notes,
                             headroom=headroom)


def _pipeline_extras(source) -> dict:
    """Settings the schedule needs from a model folder: two experts' `boundary_ratio` and the scheduler's shift."""
    from .sizing import pipeline_settings, shipped

    ratio = pipeline_settings(source).get("boundary_ratio")
    if ratio is None:
        return {}
    return {"boundary_ratio": float(ratio), "flow_shift": shipped(source).get("flow_shift")}


def _with_notes(prediction: Prediction, notes) -> Prediction:
    from dataclasses import replace

    return replace(prediction, notes=tuple(notes) + prediction.notes)


def _hardware(hardware):
    if hardware is None:
        return None
    from .hardware import load_hardware

    return load_hardware(hardware)


def _source(source, dtype):
    """(PipelineSpec with sizes, models by name, force_zeros_for_empty_prompt) of a source."""
    from ..plans.pipeline_spec import spec_from_pipeline
    from . import sizing

    if hasattr(source, "components") and not isinstance(source, str):
        spec = spec_from_pipeline(source)
        modules = {c.name: c.module for c in spec.components if c.module is not None}
        config = getattr(source, "config", {}) or {}
        return spec, modules, bool(config.get("force_zeros_for_empty_prompt", True))
    folder = sizing.model_folder(source)
    spec = sizing.spec_from_folder(folder, dtype=dtype)
    modules = sizing.build_components(folder, dtype=dtype)  # built once by spec_from_folder, shared
    return spec, modules, bool(sizing.pipeline_settings(folder).get("force_zeros_for_empty_prompt", True))


def _working_memory(source, class_name: str, modules, settings: CallSettings, device: str):
    """(component -> working memory of one forward, runtime overhead); (None, overhead) without the estimate."""
    try:
        from . import activations
    except ImportError:
        return None, 0
    overhead = activations.CUDA_RUNTIME_OVERHEAD if device.type == "cuda" else 0
    dtype = settings.dtype or _dtype_of(next(iter(modules.values()))) if modules else "fp16"
    working = activations.component_working_memory(
        source, height=settings.height, width=settings.width, batch=settings.batch, dtype=dtype,
        guidance=settings.guidance, num_frames=settings.num_frames)
    vae = modules.get("vae")
    if vae is not None and "vae" in working and activations.decodes_upcast(
            class_name, dict(getattr(vae, "config", {}) or {}), dtype):
        working["vae"] += module_bytes(vae)  # the float32 copy of its weights, beside the fp16 ones counted
    return working, overhead


def _dtype_of(module) -> str:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return torch_dtype_name(tensor.dtype)
    return "float32"
