"""Writing the policy predicted fastest among those that fit a memory limit.

The search tries, for every model of the pipeline, every strategy whose rule
class has a `synthesis_rank` (`resident`, `model` with pinned transfers on
accelerators and copy-free on the CPU, `group` with a prefetching stream on
CUDA, `sequential`), in the form its `fastest()` gives; every combination is
predicted (`predict.py`) and the fastest one whose peak device memory fits is
written out. With up to six models that is at most 4^6 predictions; beyond
that the largest models are searched and the rest take `model`.

"Fastest" is the predicted time a call spends on offloading, compute left out:
every copy at its full length (copies that could overlap compute, such as group
offloading's prefetch, included: the compute they would hide behind is not
modelled yet), plus an assumed cost per hook invocation (`HOOK_SECONDS`; a
layer-level strategy runs thousands a step). Without a hardware profile the
copies are timed at the nominal rates of a PCIe 4.0 x16 card (the built-in
`rtx-4090-24gb` profile). Ties go to fewer hooks: resident, model, group,
sequential, in that order (their `synthesis_rank`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import OffloadkitError, SynthesisError
from ..plans.library_gates import limit_for
from ..plans.resolve import resolve
from ..policy.loading import load
from ..policy.rules import RULES, ModelRule, StrategyRule
from ..units import format_bytes, parse_bytes
from .replay import prediction_context

_SEARCHED = 6  # models searched exhaustively (4^6 = 4096 predictions at most)
# Host-side cost of one offload hook invocation (an assumption, not a measurement of any GPU machine:
# Accelerate's layer hooks look up and place each tensor in Python; 0.1 ms is the order seen per call).
HOOK_SECONDS = 1e-4
NOMINAL_HARDWARE = "rtx-4090-24gb"  # transfer rates used when no profile is given


def _candidates() -> tuple[type[StrategyRule], ...]:
    """The searched strategies' rule classes, cheapest to run first (the tie-break order)."""
    ranked = [rule for rule in RULES.values() if rule.synthesis_rank is not None]
    return tuple(sorted(ranked, key=lambda rule: rule.synthesis_rank))


@dataclass(frozen=True)
class Synthesis:
    """The chosen policy, its prediction, why each model got its strategy, and the YAML text to save."""

    policy: object  # Policy
    prediction: object  # Prediction
    reasons: dict
    limit_bytes: int
    candidates: int  # policies predicted
    fitting: int  # of which fit
    text: str

    def write(self, path, *, overwrite: bool = False) -> None:
        """Save the YAML; an existing file is kept unless `overwrite`."""
        from pathlib import Path

        path = Path(path)
        if path.exists() and not overwrite:
            raise SynthesisError(f"{path} exists; it was left as it is. Choose another file or allow overwriting "
                                 "(--force)")
        try:
            path.write_text(self.text, encoding="utf-8")
        except OSError as exc:
            raise SynthesisError(f"cannot write {path} ({exc.strerror or exc}). Choose another file") from None


def _rule(strategy: type[StrategyRule], device_type: str, component=None) -> dict | None:
    """The fastest form of `strategy` for the device (as the YAML writes it); for a quantized component one its
    backend can run, or None."""
    rule = strategy.fastest(device_type)
    backend = getattr(component, "quantization", None)
    limit = limit_for(backend, rule)
    if limit is not None and limit.options:  # e.g. no data-swapping transfer for torchao: the plain one
        written = {k: v for k, v in rule.set_options().items() if k not in limit.options}
        rule = strategy.model_validate(written)
        limit = limit_for(backend, rule)
    return None if limit is not None else rule.set_options()


def synthesize(source, *, hardware=None, budget=None, settings=None, device=None, name: str | None = None) -> Synthesis:
    """The policy predicted fastest whose peak device memory fits `budget` (or the hardware's memory).

    `source` is a built-in architecture, a model folder or a loaded pipeline. `budget` is a size
    (`8GiB`, bytes) for the device memory the call may use; without it, the hardware profile's
    memory less the runtime's overhead.

    Example::

        result = offloadkit.synthesize("sdxl", hardware="rtx-4060-8gb")
        result.write("sdxl-8gb.yaml")
    """
    nominal = hardware is None
    context = prediction_context(source, hardware=hardware or NOMINAL_HARDWARE, settings=settings, device=device)
    if budget is not None:
        try:
            limit = parse_bytes(budget)
        except ValueError as exc:
            raise SynthesisError(f"budget: {exc}") from None
        limit_source = f"budget {format_bytes(limit)}"
    elif not nominal:
        limit = context.hardware.device_memory - context.overhead
        limit_source = (f"{context.hardware.name}'s {format_bytes(context.hardware.device_memory)} less "
                        f"{format_bytes(context.overhead)} runtime overhead")
    else:
        raise SynthesisError("a policy is synthesised for a memory limit: pass a budget (e.g. '8GiB') or a hardware "
                             "profile")
    device_type = context.device.type
    order = _candidates()
    models = [c for c in context.spec.components if c.is_model and c.present]
    models.sort(key=lambda c: -(c.bytes or 0))
    searched, fixed = models[:_SEARCHED], models[_SEARCHED:]
    host_limit = getattr(context.hardware, "host_memory", None)

    best = None
    candidates = fitting = 0
    for choice in itertools.product(order, repeat=len(searched)):
        rules = {c.name: _rule(s, device_type, c) for c, s in zip(searched, choice)}
        rules.update({c.name: _rule(ModelRule, device_type, c) for c in fixed})
        if None in rules.values():
            continue  # a strategy a quantized model's backend cannot run
        policy = load({"version": 1, "device": context.device, "components": rules})
        try:
            plan = resolve(policy, context.spec, context.device, machine=context.machine)
        except OffloadkitError:
            continue  # e.g. a rule the device cannot run
        prediction = context.predict(plan)
        candidates += 1
        if prediction.device_peak_bytes > limit:
            continue
        host = max((s.host_bytes for s in prediction.stages), default=0)
        if host_limit is not None and host > host_limit:
            continue
        fitting += 1
        cost = (_offload_seconds(prediction), sum(order.index(s) for s in choice), host)
        if best is None or cost < best[0]:
            best = (cost, choice, rules, prediction)
    if best is None:
        smallest = _smallest_peak(context, models, device_type, order)
        raise SynthesisError(
            f"no policy fits {limit_source}: the least device memory any searched policy needs is "
            f"{format_bytes(smallest)}. Lower the resolution or batch, quantize the largest model, or use a larger "
            "device")
    _, choice, rules, prediction = best
    reasons = _reasons(context, searched, choice, rules, limit, order)
    for c in fixed:
        reasons[c.name] = "not searched (only the largest models are); whole-model offload"
    if name is None:
        label = source if isinstance(source, str) and "/" not in source else context.spec.class_name
        name = f"{label}-within-{format_bytes(limit).replace(' ', '')}"
    text = _yaml(name, context, rules, reasons, prediction, limit_source, candidates, fitting, nominal)
    policy = load(_load_text(text))
    prediction = context.predict(resolve(policy, context.spec, context.device, machine=context.machine))  # the same, under its name
    return Synthesis(policy, prediction, reasons, limit, candidates, fitting, text)


def _transfer_cost(prediction) -> float:
    """Seconds of every copy, overlappable ones included (no compute model to hide them behind yet)."""
    return prediction.transfer_seconds + prediction.overlapped_seconds


def _offload_seconds(prediction) -> float:
    return _transfer_cost(prediction) + prediction.hook_calls * HOOK_SECONDS


def _load_text(text: str):
    import yaml

    return yaml.safe_load(text)


def _smallest_peak(context, models, device_type, order) -> int:
    rules = {}
    for c in models:  # the least memory each can take: the last searched strategy its backend runs
        rules[c.name] = next(r for r in (_rule(s, device_type, c) for s in reversed(order)) if r is not None)
    policy = load({"version": 1, "device": context.device, "components": rules})
    return context.predict(resolve(policy, context.spec, context.device, machine=context.machine)).device_peak_bytes


def _reasons(context, searched, choice, rules, limit, order) -> dict:
    """Why each searched model got its strategy: what the next cheaper choice would have cost."""
    reasons = {}
    for i, (component, strategy) in enumerate(zip(searched, choice)):
        size = format_bytes(component.bytes)
        rank = order.index(strategy)
        if rank == 0:
            reasons[component.name] = f"{size}: fits on the device for the whole call, so it never moves"
            continue
        cheaper = order[rank - 1]
        trial = dict(rules)
        trial[component.name] = _rule(cheaper, context.device.type, component)
        if trial[component.name] is None:
            reasons[component.name] = f"{size}: its quantization backend cannot run `{cheaper.name}`"
            continue
        prediction = context.predict(resolve(load({"version": 1, "device": context.device, "components": trial}),
                                             context.spec, context.device))
        if prediction.device_peak_bytes > limit:
            reasons[component.name] = (f"{size}: `{cheaper.name}` would need "
                                       f"{format_bytes(prediction.device_peak_bytes)} on the device, over the limit "
                                       f"of {format_bytes(limit)}")
        else:
            reasons[component.name] = f"{size}: `{cheaper.name}` fits too but is predicted slower"
    return reasons


def _yaml(name, context, rules, reasons, prediction, limit_source, candidates, fitting, nominal) -> str:
    from ..policy.schema import SCHEMA_ID

    s = prediction.settings
    size = f"{s['height']}x{s['width']}" + (f"x{s['num_frames']}" if s.get("num_frames") else "")
    time = (f"{format_bytes(prediction.bytes_moved)} moved per call in {_transfer_cost(prediction):.2f} s of "
            f"transfers ({prediction.overlapped_seconds:.2f} s of them can overlap compute), "
            f"{prediction.hook_calls} hook calls")
    rates = (f" Times at the nominal rates of {NOMINAL_HARDWARE} (no --hardware given)." if nominal else
             f" Times at {context.hardware.name}'s rates.")
    lines = [
        f"# yaml-language-server: $schema={SCHEMA_ID}",
        f"# Written by `offloadkit synthesize` for {context.spec.class_name}, {size}, {s['steps']} steps, "
        f"batch {s['batch']}, {s['dtype'] or 'weights as loaded'}.",
        f"# Limit: {limit_source}. {candidates} policies predicted, {fitting} fit; this one is predicted fastest.",
        f"# Predicted: peak device memory {format_bytes(prediction.device_peak_bytes)} "
        f"(+ {format_bytes(prediction.runtime_overhead_bytes)} runtime overhead), {time}.{rates}",
        "# Check it with `offloadkit plan` before use; re-run synthesize when the pipeline or card changes.",
        "version: 1",
        _yaml_entry("name", name),
        f"device: {context.device.type if context.device.index == 0 else context.device}",
        "components:",
    ]
    for component, rule in rules.items():
        lines.append(f"  # {reasons[component]}")
        lines.append("  " + _yaml_entry(component, rule))
    return "\n".join(lines) + "\n"


def _yaml_entry(key: str, value) -> str:
    """`key: value` on one line (a mapping in flow style), quoted only where YAML needs it."""
    import yaml

    return yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=1000).strip()[1:-1]
