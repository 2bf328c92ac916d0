"""Policy + pipeline description -> Plan. Pure: reads, never mutates.

Errors about names (unknown, absent, not a model) point at the policy's lines.
"""

from __future__ import annotations

from . import precision
from .compatibility import limit_for
from .errors import PolicyError, did_you_mean
from .loading import located_problem
from .pipeline_spec import PipelineSpec
from .plans import END_OF_CALL, ComponentPlan, Plan
from .schema import Policy
from .quantization import BACKENDS
from .strategies import STRATEGIES, StrategyRule
from .strategies.base import PRECISION_KEYS

HOST = "cpu"
WILDCARD = "*"  # `components: {"*": {...}}` is the rule for every model without one of its own


def _rule(strategy: str):
    return STRATEGIES[strategy].rule(strategy=strategy)

def resolve(policy: Policy, spec: PipelineSpec, device: str) -> Plan:
    """Resolve `policy` for the pipeline `spec` on `device` (already resolved, e.g. "cuda:0")."""
    problems = []
    models = {c.name: c for c in spec.components if c.is_model and c.present}

    def check_name(path, name, what):
        component = spec.get(name)
        if component is None:
            problems.append(located_problem(policy, path, f"{spec.class_name} has no component {name!r}. "
                                            + did_you_mean(name, spec.model_names, "model components"),
                                            key=path[0] == "components"))
        elif not component.is_model:
            problems.append(located_problem(policy, path, f"{name!r} is a {component.type_name}, not a model; "
                                            f"only models can be {what}. Remove it. Models: "
                                            + ", ".join(spec.model_names), key=path[0] == "components"))
        elif not component.present:
            problems.append(located_problem(policy, path, f"{name!r} is not loaded in this pipeline (it is None). "
                                            "Remove it from the policy or load the component",
                                            key=path[0] == "components"))

    for name in policy.components:
        if name != WILDCARD:
            check_name(("components", name), name, "given a rule")
    for key, what in (("sequence", "offloaded in a chain"), ("exclude", "excluded")):
        names = getattr(policy, key)
        if names != "auto":
            for i, name in enumerate(names):
                check_name((key, i), name, what)
    if problems:
        raise PolicyError(problems)

    # Strategy per model component, with the reason shown in the plan.
    if policy.exclude == "auto":
        excluded = {n for n in spec.exclude if n in models}
        exclude_reason = "pipeline's _exclude_from_cpu_offload"
    else:
        excluded = set(policy.exclude)
        exclude_reason = "policy `exclude`"
    wildcard = policy.components.get(WILDCARD)
    strategies, reasons, options, sizes = {}, {}, {}, {}
    for name, component in models.items():
        choice = _choose(policy, name, component, excluded, exclude_reason, wildcard, problems)
        if choice is None:
            continue
        rule, reason, path = choice
        strategies[name], reasons[name] = rule.strategy, reason
        options[name] = {k: v for k, v in rule.model_dump(exclude={"strategy"}, mode="json").items()
                         if not (k in PRECISION_KEYS and v in (None, "auto"))}
        sizes[name] = component.bytes
        if precision.wants_change(options[name]):
            problem = _plan_precision(name, component, rule, options[name], sizes, policy, path, spec.from_instance)
            if isinstance(problem, str):  # a note: the change is left out for this model
                reasons[name] += f" ({problem})"
            elif problem:
                problems.append(problem)
                continue
        check = STRATEGIES[rule.strategy].check
        problem = check(rule, device.split(":")[0]) if check is not None and device != "auto" else None
        if problem:
            problems.append(located_problem(policy, path, f"{name!r}: {problem}"))
    if problems:
        raise PolicyError(problems)

    # The chain.
    if policy.sequence == "auto":
        if spec.offload_seq is None:
            needs_chain = [n for n, s in strategies.items() if STRATEGIES[s].chained]
            if needs_chain:
                raise PolicyError(located_problem(
                    policy, ("sequence",),
                    f"{spec.class_name} declares no model_cpu_offload_seq, so `sequence: auto` has nothing to "
                    f"follow. Write `sequence:` as a list of its models in call order (models: "
                    f"{', '.join(spec.model_names)})"))
            candidates = []
        else:
            candidates = list(dict.fromkeys(spec.offload_seq))
        sequence = [n for n in candidates if n in models and STRATEGIES[strategies[n]].chained]
    else:
        sequence = list(policy.sequence)
        for i, name in enumerate(sequence):
            if not STRATEGIES[strategies[name]].chained:
                problems.append(located_problem(
                    policy, ("sequence", i),
                    f"{name!r} is in `sequence` but resolves to strategy {strategies[name]!r} "
                    f"({reasons[name]}). Remove it from `sequence` or give it `strategy: model`"))
        if problems:
            raise PolicyError(problems)

    position = {name: i for i, name in enumerate(sequence)}
    for name in models:
        if not options[name].get("prefetch") or position.get(name, 0) > 0:
            continue
        if name in policy.components:
            where = "is first in `sequence`" if name in position else "is not in `sequence`"
            problems.append(located_problem(
                policy, ("components", name, "prefetch"),
                f"{name!r} {where}, so there is no model before it whose work its upload could overlap. "
                "Remove `prefetch`, or put it after another model in `sequence`", key=True))
        else:  # a `*` rule: the models with a predecessor prefetch, the first cannot
            options[name] = {**options[name], "prefetch": False}
            reasons[name] += " (no model before it in the chain: not prefetched)"
    if problems:
        raise PolicyError(problems)

    plans = []
    for name, component in models.items():
        strategy = STRATEGIES[strategies[name]]
        reason = reasons[name]
        if strategy.chained:
            index = position.get(name)
            if index is None:
                offloaded_by = END_OF_CALL
                reason += "; not in sequence: own hook, offloaded at end of call"
            else:
                offloaded_by = sequence[index + 1] if index + 1 < len(sequence) else END_OF_CALL
            home, runs_on = HOST, device
            if options[name].get("prefetch"):
                reason += f"; prefetched while {sequence[index - 1]} runs"
            if options[name].get("keep_on_device"):
                offloaded_by = "never (kept after first use)"
                reason = reason.replace("; not in sequence: own hook, offloaded at end of call", "")
        else:
            index, offloaded_by = None, strategy.offloaded_by
            if options[name].get("granularity") == "block":
                offloaded_by = "after each block"
            home = device if strategy.home == "device" else strategy.home
            runs_on = device if strategy.runs_on_device else None
        plans.append(ComponentPlan(
            name=name,
            type_name=component.type_name,
            strategy=strategy.name,
            home=home,
            runs_on=runs_on,
            offloaded_by=offloaded_by,
            chain_index=index,
            options=options[name],
            bytes=sizes[name],
            reason=reason,
            weights=_weights(component, options[name]),
        ))
    # Chain members in chain order first, then the others in the pipeline's order.
    plans.sort(key=lambda c: (c.chain_index is None, c.chain_index or 0))
    return Plan(
        pipeline=spec.class_name,
        policy=policy.display_name,
        device=device,
        sequence=tuple(sequence),
        components=tuple(plans),
    )


def _label(component) -> str:
    label = BACKENDS[component.quantization]
    return f"{label} ({component.quantization_detail})" if component.quantization_detail else label


def _choose(policy, name, component, excluded, exclude_reason, wildcard, problems):
    """(rule, reason, where in the policy it came from) for one model, or None after adding a problem.

    Precedence: the model's own `components` rule; then `quantization: refuse`; then `exclude`; then the
    `quantization` setting of its backend; then `components.*`; then `model`.
    """
    rule = policy.components.get(name)
    if rule is not None:
        return _checked(policy, name, component, rule, "policy `components` rule", ("components", name), False,
                        problems)
    rule, reason = (wildcard, "policy `components.*` rule") if wildcard else (_rule("model"), "default")
    path = ("components", WILDCARD)
    backend = component.quantization
    if backend and precision.produced_by(rule.model_dump(exclude={"strategy"}), backend,
                                         component.quantization_detail):
        backend = None  # quantized or cast by this very rule when the policy was applied before
    if backend:
        key, setting = policy.quantization.setting(backend)
        label = _label(component)
        if setting == "refuse":
            problems.append(located_problem(
                policy, ("quantization", key),
                f"{name!r} is {label} and the policy says `{key}: refuse`. Choose 'keep-on-device', 'offload' or "
                f"a strategy rule, or give the component a rule in `components`"))
            return None
    if name in excluded:
        return _rule("resident"), exclude_reason, ("exclude",)
    if not backend:
        return _checked(policy, name, component, rule, reason, path, False, problems)
    if isinstance(setting, StrategyRule):
        return _checked(policy, name, component, setting, f"{label}: policy `quantization.{key}` rule",
                        ("quantization", key), False, problems)
    if setting == "keep-on-device":
        return _rule("skip"), f"{label}: kept where it was loaded", ("quantization", key)
    if setting == "offload":  # the error, if any, belongs to the line that asked for it
        return _checked(policy, name, component, rule, f"{label}: `{key}: offload` gives it the {reason}",
                        ("quantization", key), False, problems)
    return _checked(policy, name, component, rule, f"{label}: {reason}", path, True, problems)


def _checked(policy, name, component, rule, reason, path, auto, problems):
    """The rule if the component's backend can run it; under `auto` a strategy it can run; else a problem."""
    backend = component.quantization
    options = rule.model_dump(exclude={"strategy"})
    if backend and precision.produced_by(options, backend, component.quantization_detail):
        backend = None  # the rule's own `quantize`/`storage_dtype`, applied before: checked as planned
    limit = limit_for(backend, rule.strategy, options)
    if limit is None:
        return rule, reason, path
    label = _label(component)
    if not auto:
        problems.append(located_problem(policy, path, _refusal(f"{name!r} is {label}", limit)))
        return None
    candidates = []
    if limit.options:  # the same strategy with its default transfer
        kept = {k: v for k, v in options.items() if k not in limit.options and k != "prefetch"}
        candidates.append((STRATEGIES[rule.strategy].rule(strategy=rule.strategy, **kept),
                           "`transfer` and `prefetch` left at their defaults"))
    candidates += [(_rule(s), f"{s!r} instead") for s in limit.instead if not limit.options]
    candidates.append((_rule("skip"), "kept where it was loaded"))
    for fallback, change in candidates:
        if limit_for(backend, fallback.strategy, fallback.model_dump(exclude={"strategy"})) is None:
            return fallback, f"{reason} ({label} cannot run {limit.what}: {change})", path
    raise AssertionError("`skip` is always allowed")


def _refusal(subject, limit) -> str:
    gate = f" With {limit.gate}," if limit.gate else ""
    return (f"{subject} and cannot use strategy {limit.what}:{gate} {limit.reason}. Use {limit.alternative} for it "
            f"(source: {limit.seen})")


def _state(component) -> str:
    if component.quantization == "layerwise_casting":
        return f"already {component.quantization_detail or 'cast'} (layerwise casting)"
    return f"already quantized ({_label(component)})"


def _plan_precision(name, component, rule, options, sizes, policy, path, from_instance):
    """Check a rule's `storage_dtype`/`quantize` against the component; fill in the backend and planned size.

    Returns a problem, or None. A `*` rule's change is left out, with a note in `options`, for a model
    that is already quantized or cast otherwise.
    """
    from .storage import module_bytes, planned_sizes

    backend = component.quantization
    own = backend is not None and precision.produced_by(options, backend, component.quantization_detail)
    key = "storage_dtype" if options.get("storage_dtype") else "quantize"
    where = path + (key,) if path[0] == "components" and path[1] in policy.components else path
    if backend and not own:
        if path == ("components", WILDCARD):
            for k in PRECISION_KEYS:
                options.pop(k, None)
            return f"{_state(component)}: the `*` rule's `{key}` is not applied to it"
        wanted = options.get("storage_dtype")
        if wanted and backend == "layerwise_casting":
            why = f"the rule asks for `storage_dtype: {wanted}`. Reload the component to store it differently"
        else:
            why = f"`{key}` applies to float weights. Remove `{key}` from its rule"
        return located_problem(policy, where, f"{name!r} is {_state(component)}; {why}", key=where != path)
    if key == "storage_dtype":
        effective = "layerwise_casting"
        subject = f"`storage_dtype` would store {name!r} with layerwise casting, which"
        config = getattr(component.module, "config", None) or {}
        half = "float16" in (options.get("compute_dtype"), component.dtype)
        if hasattr(config, "get") and config.get("force_upcast") and half:
            return located_problem(policy, where, f"{name!r} is a VAE with `force_upcast` in a float16 pipeline: the "
                                   "pipeline casts it to float32 for the decode, which undoes layerwise casting, and "
                                   "without that cast the float16 latents do not match a float32 compute dtype. "
                                   "Leave `storage_dtype` off this VAE (it is small), or load a VAE that does not "
                                   "need the upcast (`force_upcast: false`)", key=where != path)
    else:
        choice = options.get("quantize_with", "auto")
        chosen, why = precision.quantize_backend(choice, rule.strategy, installed=from_instance)
        if chosen is None:
            hint = ("Use `quantize_with: auto`, or another strategy" if choice != "auto" else
                    "Use another strategy (e.g. 'model' or 'group')")
            return located_problem(policy, where, f"{name!r}: `quantize` cannot be served for strategy "
                                   f"{rule.strategy!r}: {why}. {hint}", key=where != path)
        options["quantize_with"] = chosen
        effective = chosen
        subject = f"`quantize: int8` would make {name!r} {BACKENDS[chosen]}, which"
    limit = limit_for(effective, rule.strategy, rule.model_dump(exclude={"strategy"}))
    if limit is not None:
        return located_problem(policy, path, _refusal(subject, limit).replace(f"{subject} and ", f"{subject} "))
    module = component.module
    if module is not None and not own:
        with planned_sizes(precision.planned_tensor_bytes(module, options, options.get("quantize_with"))):
            sizes[name] = module_bytes(module)
    return None


def _weights(component, options) -> str | None:
    """How a component's weights are (or will be, once the policy is applied) stored, for the plan."""
    if component.quantization is None and options.get("storage_dtype"):
        return f"{options['storage_dtype']} (layerwise casting, on apply)"
    if component.quantization is None and options.get("quantize"):
        return f"{options['quantize']} ({options['quantize_with']}, on apply)"
    if component.quantization:
        return _label(component)
    return component.dtype
