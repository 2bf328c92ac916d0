"""Writing the policy predicted fastest among those that fit every limit of a machine.

Every model of the pipeline has a list of options, fastest first: each strategy whose rule class
has a `synthesis_rank` (`resident`; `model` with pinned transfers on accelerators, copy-free on the
CPU; `stream` with `resident: auto`; `group` with a prefetching stream on CUDA; `sequential`;
`disk` by blocks), in the form its `fastest()` gives and only where the model's quantization
backend can run it; then the same with `storage_dtype: float8_e4m3fn` (half the bytes of 16-bit
weights), and, only with `allow_quantize` (it changes numerics more), with `quantize: int8`.

The limits are those of `offloadkit.prediction.limits` (device memory, host RAM, pinned host RAM,
disk, each less its headroom); `budget` replaces the device's. The search starts with every model
at its first option and, while some limit is over, makes the one change of one model's option that
fits, or else the one that takes the most bytes off the limits per second it adds; once all fit it
keeps making changes that lower the predicted cost and still fit. The cost is a precision change
first (a policy that keeps the weights as they are wins when one fits), then the predicted call
time: compute (`compute.py`, where every model's FLOPs can be counted and the profile has a
compute rate) plus the transfers it does not hide (blocking copies, and overlappable ones beyond
their stage's compute), plus an assumed cost per hook invocation (`HOOK_SECONDS`). Without a
compute estimate, every copy counts at its full length. Without a hardware
profile the copies are timed at the nominal rates of the built-in `rtx-4090-24gb` profile and only
the device memory limit is checked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from .. import progress
from ..errors import OffloadkitError, SynthesisError
from ..plans.library_gates import limit_for
from ..plans.resolve import resolve
from ..policy.loading import load
from ..policy.rules import DISK, HOME_DEVICE, RULES, StrategyRule
from ..units import format_bytes, parse_bytes
from .limits import DEVICE, DISK_SPACE, HOST_RAM, PINNED, LimitCheck, binding, check_limits
from .replay import prediction_context

# Host-side cost of one offload hook invocation (an assumption, not a measurement of any GPU machine:
# Accelerate's layer hooks look up and place each tensor in Python; 0.1 ms is the order seen per call).
HOOK_SECONDS = 1e-4
NOMINAL_HARDWARE = "rtx-4090-24gb"  # transfer rates used when no profile is given
_STORAGE = {"storage_dtype": "float8_e4m3fn"}
_QUANTIZE = {"quantize": "int8"}
_STEPS = 64  # changes the search makes at most before it gives up
_PAIRED = 2  # the largest models whose options are also changed two at a time


def _candidates() -> tuple[type[StrategyRule], ...]:
    """The searched strategies' rule classes, cheapest to run first."""
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
        """Save the YAML, its `$schema` line pointing at the installed schema; an existing file is kept unless
        `overwrite`."""
        from pathlib import Path

        from ..policy.schema import with_schema_comment

        path = Path(path)
        if path.exists() and not overwrite:
            raise SynthesisError(f"{path} exists; it was left as it is. Choose another file or allow overwriting "
                                 "(--force)")
        try:
            path.write_text(with_schema_comment(self.text, path), encoding="utf-8")
        except OSError as exc:
            raise SynthesisError(f"cannot write {path} ({exc.strerror or exc}). Choose another file") from None


def _rule(strategy: type[StrategyRule], device_type: str, component=None, extra=None, form=None) -> dict | None:
    """A form of `strategy` for the device (its fastest by default; as the YAML writes it), with `extra` options;
    None when the component's quantization backend cannot run it."""
    form = form if form is not None else strategy.fastest(device_type)
    rule = strategy.model_validate({**form.set_options(), **(extra or {})})
    backend = getattr(component, "quantization", None)
    limit = limit_for(backend, rule)
    if limit is not None and limit.options:  # an option the backend cannot run: the rule without it
        written = {k: v for k, v in rule.set_options().items() if k not in limit.options}
        rule = strategy.model_validate(written)
        limit = limit_for(backend, rule)
    return None if limit is not None else rule.set_options()


def _options(component, device_type: str, allow_quantize: bool) -> list[tuple[int, dict]]:
    """(precision penalty, rule) for one model, fastest first within each penalty."""
    tiers = [(0, None)]
    if component.quantization is None:  # precision changes are for float weights
        tiers.append((1, _STORAGE))
        if allow_quantize:
            tiers.append((2, _QUANTIZE))
    options = []
    for penalty, extra in tiers:
        for strategy in _candidates():
            for form in strategy.search_forms(device_type):
                try:
                    rule = _rule(strategy, device_type, component, extra, form)
                except ValueError:  # e.g. a precision option the rule class does not take
                    continue
                if rule is not None and (penalty, rule) not in options:
                    options.append((penalty, rule))
    return options


class _Search:
    """Predictions of policies given as one option index per model, cached; their limits and cost."""

    def __init__(self, context, models, options, budget, check_host):
        self.context = context
        self.models = models
        self.options = options
        self.budget = budget
        self.check_host = check_host
        self.cache: dict = {}
        self.fitting = 0
        self.progress = None  # a progress bar, counting the policies predicted

    def rules(self, state) -> dict:
        return {c.name: self.options[c.name][i][1] for c, i in zip(self.models, state)}

    def evaluate(self, state):
        """(prediction, limit checks, cost) or None when the policy cannot be resolved."""
        if state in self.cache:
            return self.cache[state]
        try:
            prediction = self.context.predict(self.plan(state))
        except OffloadkitError:  # a rule this pipeline or device cannot run (e.g. a model without blocks)
            result = None
        else:
            checks = self.limits(prediction)
            penalty = sum(self.options[c.name][i][0] for c, i in zip(self.models, state))
            result = (prediction, checks, (penalty, _call_cost(prediction)))
            self.fitting += not binding(checks)
        self.cache[state] = result
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix_str(f"{self.fitting} fit")
        return result

    def plan(self, state):
        """The plan of the policy a state gives, on the context's machine."""
        policy = load({"version": 1, "device": self.context.device, "components": self.rules(state)})
        return resolve(policy, self.context.spec, self.context.device, machine=self.context.machine)

    def limits(self, prediction) -> tuple[LimitCheck, ...]:
        checks = [c for c in prediction.limits if self.check_host or c.limit == DEVICE]
        if self.budget is not None:
            checks = [c for c in checks if c.limit != DEVICE]
            checks.insert(0, LimitCheck(DEVICE, prediction.device_peak_bytes, self.budget, 0,
                                        "the predicted peak", within="a budget of"))
        return tuple(checks)

    def neighbours(self, state):
        """States one model's option away."""
        for k, component in enumerate(self.models):
            for i in range(len(self.options[component.name])):
                if i != state[k]:
                    yield state[:k] + (i,) + state[k + 1:]

    def pairs(self, state):
        """States two models' options away, for the largest models (a trade one change alone cannot make:
        the text encoder to disk *and* the denoiser to `stream`)."""
        largest = range(min(_PAIRED, len(self.models)))
        for a in largest:
            for b in largest:
                if b <= a:
                    continue
                for i in range(len(self.options[self.models[a].name])):
                    for j in range(len(self.options[self.models[b].name])):
                        if i != state[a] and j != state[b]:
                            trial = list(state)
                            trial[a], trial[b] = i, j
                            yield tuple(trial)


def _over(checks) -> int:
    return sum(c.over for c in checks)


def _descend(search: _Search, start):
    """Change one model's option at a time (or two of the largest models' at once, where one change does not do)
    until every limit fits, then while the cost falls; the best state reached."""
    state, current = start, search.evaluate(start)
    for _ in range(_STEPS):
        if current is None:
            break
        over = _over(current[1])
        singles = _evaluated(search, search.neighbours(state))
        if over:
            chosen = _cheapest_fitting(singles) or _cheapest_fitting(_evaluated(search, search.pairs(state)))
            if chosen is None:  # nothing fits yet: the change that takes most bytes off per second it adds
                gains = [((over - _over(r[1])) / max(_cost_value(r[2]) - _cost_value(current[2]), 1e-6), t, r)
                         for t, r in singles if _over(r[1]) < over]
                chosen = max(gains, key=lambda x: x[0])[1:] if gains else None
        else:  # the steepest step among one and two changes: a single change first can block a better pair
            chosen = _cheapest_fitting(singles + _evaluated(search, search.pairs(state)), below=current[2])
        if chosen is None:
            break
        state, current = chosen
    return state, current


def _evaluated(search, states) -> list:
    return [(t, r) for t, r in ((t, search.evaluate(t)) for t in states) if r is not None]


def _cheapest_fitting(trials, below=None):
    """(state, result) of the cheapest trial that fits every limit (and costs less than `below`), or None."""
    fitting = [(r[2], t, r) for t, r in trials if not binding(r[1]) and (below is None or r[2] < below)]
    return min(fitting, key=lambda x: x[0])[1:] if fitting else None


def _starts(models, options) -> list[tuple]:
    """Where descents start: every model at its fastest option, and every model offloaded whole (`model`, the
    chain diffusers uses), from which one change of the largest model (to `stream`) often fits."""
    first = tuple(0 for _ in models)
    chained = tuple(next((i for i, (penalty, rule) in enumerate(options[c.name]) if not penalty
                          and RULES[rule["strategy"]].chained), 0) for c in models)
    return list(dict.fromkeys([first, chained]))


def _best_descent(search: _Search, models, options):
    """The best end of the descents from every start: fitting first, then the lowest cost."""
    ends = [_descend(search, start) for start in _starts(models, options)]
    ends = [(state, result) for state, result in ends if result is not None]
    if not ends:
        return None, None

    def rank(end):
        state, (prediction, checks, cost) = end
        return (bool(binding(checks)), _over(checks), cost)

    return min(ends, key=rank)


def _cost_value(cost) -> float:
    penalty, seconds = cost
    return penalty * 1e4 + seconds


def synthesize(source, *, hardware=None, budget=None, settings=None, device=None, name: str | None = None,
               allow_quantize: bool = False, headroom=None) -> Synthesis:
    """The policy predicted fastest that fits every limit of the hardware (and `budget`, if given).

    `source` is a built-in architecture, a model folder or a loaded pipeline. `budget` is a size
    (`8GiB`, bytes) for the device memory the call may use, in place of the hardware's; `headroom`
    (a size or a share) replaces the profile's own. `allow_quantize` lets the search use
    `quantize: int8`, which changes numerics.

    Example::

        result = offloadkit.synthesize("sdxl", hardware="rtx-4060-8gb")
        result.write("sdxl-8gb.yaml")
    """
    nominal = hardware is None
    context = prediction_context(source, hardware=hardware or NOMINAL_HARDWARE, settings=settings, device=device,
                                 headroom=headroom)
    if budget is not None:
        try:
            limit = parse_bytes(budget)
        except ValueError as exc:
            raise SynthesisError(f"budget: {exc}") from None
        limit_source = f"budget {format_bytes(limit)}"
        if not nominal:
            limit_source += f" and {context.hardware.name}'s other limits"
    elif not nominal:
        limit = None
        limit_source = f"{context.hardware.name}"
    else:
        raise SynthesisError("a policy is synthesised for a memory limit: pass a budget (e.g. '8GiB') or a hardware "
                             "profile")
    device_type = context.device.type
    models = [c for c in context.spec.components if c.is_model and c.present]
    models.sort(key=lambda c: -(c.bytes or 0))
    options = {c.name: _options(c, device_type, allow_quantize) for c in models}
    search = _Search(context, models, options, limit, check_host=not nominal)
    with progress.bar("searching policies", unit=" policies") as shown:
        search.progress = shown
        state, best = _best_descent(search, models, options)
        search.progress = None
    if best is None or binding(best[1]):
        raise SynthesisError(_nothing_fits(limit_source, best, state, models, search, allow_quantize))
    prediction, checks, _ = best
    rules = search.rules(state)
    reasons = _reasons(search, state, models)
    _pin_resident_counts(rules, reasons, search.plan(state))
    device_limit = next(c for c in checks if c.limit == DEVICE)
    limit_bytes = device_limit.available
    if name is None:
        label = source if isinstance(source, str) and "/" not in source else context.spec.class_name
        name = f"{label}-within-{format_bytes(limit_bytes).replace(' ', '')}"
    text = _yaml(name, context, rules, reasons, prediction, checks, limit_source, len(search.cache),
                 search.fitting, nominal)
    policy = load(_load_text(text))
    prediction = context.predict(resolve(policy, context.spec, context.device, machine=context.machine))
    return Synthesis(policy, prediction, reasons, limit_bytes, len(search.cache), search.fitting, text)


def _pin_resident_counts(rules: dict, reasons: dict, plan) -> None:
    """Write `resident: auto` as the count the plan found, so the policy keeps what was predicted: at apply, `auto`
    would measure the free memory then, and cannot know the working memory of the call's other forwards."""
    for name, rule in rules.items():
        layout = plan.component(name).stream
        if layout is not None and layout.blocks and rule.get("resident", "auto") == "auto":
            rules[name] = {**rule, "resident": len(layout.resident)}  # the search's option stays as it was
            reasons[name] += (f"; {len(layout.resident)} of its {len(layout.blocks)} blocks resident, as many as fit "
                              "beside the call's largest working memory")


def _nothing_fits(limit_source, best, state, models, search, allow_quantize) -> str:
    if best is None:
        return f"no policy fits {limit_source}: no searched policy could be resolved for this pipeline"
    prediction, checks, _ = best
    over = binding(checks)
    advice = []
    names = {c.limit for c in over}
    if HOST_RAM in names:
        in_ram = [c for c in models if c.name not in _on_disk(search, state)]
        if in_ram:
            advice.append(f"put {in_ram[0].name} on disk (`strategy: disk`) by hand")
        advice.append("use a machine with more RAM")
    if DEVICE in names:
        advice.append("lower the resolution or batch")
    if PINNED in names:
        advice.append("raise the profile's `pinned_memory`")
    if DISK_SPACE in names:
        advice.append("free disk space")
    if not allow_quantize:
        advice.append("pass --allow-quantize (allow_quantize=True) to search `quantize: int8`")
    advice = ", or ".join(advice)
    return (f"no policy fits {limit_source}. The closest searched policy is still over on "
            + "; ".join(c.message() for c in over) + ". " + advice[:1].upper() + advice[1:])


def _on_disk(search, state) -> set:
    """Models a state keeps on disk."""
    rules = search.rules(state)
    return {name for name, rule in rules.items() if RULES[rule["strategy"]].model_validate(rule).weights_tier == DISK}


def _transfer_cost(prediction) -> float:
    """Seconds of every copy, overlappable ones included (no compute model to hide them behind yet)."""
    return prediction.transfer_seconds + prediction.overlapped_seconds


def _call_cost(prediction) -> float:
    """Predicted seconds of a call where compute is estimated (compute + the transfers it does not hide),
    else of its offloading alone; plus the hooks' assumed cost."""
    if prediction.call_seconds is not None:
        return prediction.call_seconds + prediction.hook_calls * HOOK_SECONDS
    return _offload_seconds(prediction)


def _offload_seconds(prediction) -> float:
    return _transfer_cost(prediction) + prediction.hook_calls * HOOK_SECONDS


def _load_text(text: str):
    import yaml

    return yaml.safe_load(text)


def _label(rule: dict) -> str:
    return ", ".join(f"{k}: {v}" if k != "strategy" else str(v) for k, v in rule.items())


def _reasons(search: _Search, state, models) -> dict:
    """Why each model got its option: what the next faster option would have cost."""
    reasons = {}
    chosen = search.evaluate(state)
    for k, component in enumerate(models):
        size = format_bytes(component.bytes)
        index = state[k]
        if index == 0:
            first = search.options[component.name][0][1]
            reasons[component.name] = (f"{size}: fits on the device for the whole call, so it never moves"
                                       if RULES[first["strategy"]].home == HOME_DEVICE
                                       else f"{size}: the fastest option its backend can run")
            continue
        faster = state[:k] + (index - 1,) + state[k + 1:]
        trial = search.evaluate(faster)
        previous = _label(search.options[component.name][index - 1][1])
        if trial is None:
            reasons[component.name] = f"{size}: `{previous}` cannot run for it"
        elif binding(trial[1]):
            reasons[component.name] = f"{size}: `{previous}` would be over on " + "; ".join(
                f"{c.limit} by {format_bytes(c.over)}" for c in binding(trial[1]))
        elif trial[2][0] > chosen[2][0]:
            reasons[component.name] = f"{size}: `{previous}` fits too, with a precision change this one avoids"
        else:
            reasons[component.name] = f"{size}: `{previous}` fits too but is predicted slower"
    return reasons


def _yaml(name, context, rules, reasons, prediction, checks, limit_source, candidates, fitting, nominal) -> str:
    from ..policy.schema import schema_comment

    s = prediction.settings
    size = f"{s['height']}x{s['width']}" + (f"x{s['num_frames']}" if s.get("num_frames") else "")
    time = (f"{format_bytes(prediction.bytes_moved)} moved per call in {_transfer_cost(prediction):.2f} s of "
            f"transfers ({prediction.overlapped_seconds:.2f} s of them can overlap compute), "
            f"{prediction.hook_calls} hook calls")
    if prediction.call_seconds is not None:
        time += (f"; call time {prediction.call_seconds:.1f} s (all resident: {prediction.compute_seconds:.1f} s "
                 "of compute)")
    rates = (f" Times at the nominal rates of {NOMINAL_HARDWARE} (no --hardware given)." if nominal else
             f" Times at {context.hardware.name}'s rates.")
    lines = [
        # where the text will be saved is not known here: `Synthesis.write` callers (the CLI's `-o`) put a
        # `$schema` line relative to the file in its place (`policy.schema.with_schema_comment`)
        schema_comment(None),
        f"# Written by `offloadkit synthesize` for {context.spec.class_name}, {size}, {s['steps']} steps, "
        f"batch {s['batch']}, {s['dtype'] or 'weights as loaded'}.",
        f"# Limits of {limit_source}. {candidates} policies predicted, {fitting} fit; this one is predicted fastest.",
        *(f"#   {c.line()}" for c in checks),
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
