"""Policy + pipeline description -> Plan. Pure: reads, never mutates.

Errors about names (unknown, absent, not a model) point at the policy's lines.
"""

from __future__ import annotations

from . import precision
from .component_rules import WILDCARD, choose_rule, plan_precision, weights_label
from .errors import PolicyError, did_you_mean
from .loading import located_problem
from .pipeline_spec import PipelineSpec
from .plans import END_OF_CALL, ComponentPlan, Plan
from .schema import Policy
from .strategies import STRATEGIES
from .strategies.base import PRECISION_KEYS

HOST = "cpu"

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
    strategies, reasons, options, sizes = {}, {}, {}, {}
    for name, component in models.items():
        choice = choose_rule(policy, name, component, excluded, exclude_reason, problems)
        if choice is None:
            continue
        rule, reason, path = choice
        strategies[name], reasons[name] = rule.strategy, reason
        options[name] = {k: v for k, v in rule.model_dump(exclude={"strategy"}, mode="json").items()
                         if not (k in PRECISION_KEYS and v in (None, "auto"))}
        sizes[name] = component.bytes
        if precision.wants_change(options[name]):
            problem = plan_precision(name, component, rule, options[name], sizes, policy, path,
                                     spec.from_instance, None if device == "auto" else device.split(":")[0])
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
            weights=weights_label(component, options[name]),
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
