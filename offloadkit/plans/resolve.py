"""Policy + pipeline description -> Plan. Pure: reads, never mutates.

Errors about names (unknown, absent, not a model) point at the policy's lines.
"""

from __future__ import annotations

from ..device import Device
from ..errors import PolicyError, did_you_mean
from ..policy.loading import located_problem
from ..policy.rules import HOME_DEVICE, ModelRule
from ..policy.schema import Policy
from .component_rules import WILDCARD, choose_rule, plan_precision, weights_label
from ..tensor_bytes import planned_sizes
from .pipeline_spec import PipelineSpec
from .precision import planned_tensor_bytes
from .plan import END_OF_CALL, ComponentPlan, Plan
from .stages import STAGES, strictly_between
from .stream_layout import BlocksNotFound, DeviceRoom, Machine, layout, pinned_bytes

HOST = "cpu"


def resolve(policy: Policy, spec: PipelineSpec, device, machine: Machine | None = None) -> Plan:
    """Resolve `policy` for the pipeline `spec` on `device` (e.g. "cuda:0", or `auto` to check names only).

    `machine`, when known, is what block layouts (`stream`) are chosen for: free device memory and host RAM.
    """
    device = Device.parse(device)
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
        # as diffusers: an exclusion applies only outside the sequence (the Kandinsky priors chain `prior`)
        named = set(policy.sequence) if policy.sequence != "auto" else set()
        excluded = {n for n in spec.exclude if n in models and n not in named}
        exclude_reason = "pipeline's _exclude_from_cpu_offload"
    else:
        excluded = set(policy.exclude)
        exclude_reason = "policy `exclude`"
    rules, reasons, sizes, paths = {}, {}, {}, {}
    # On a device the policy was not written for (a GPU policy in CPU tests), what needs that device runs as
    # its rule's stand-in; on its own kind of device a policy means exactly what it says.
    written_for = Device.parse(policy.device)
    stand_ins = not device.is_auto and not _written_for(written_for, device)
    stood_in = []
    for name, component in models.items():
        choice = choose_rule(policy, name, component, excluded, exclude_reason, problems)
        if choice is None:
            continue
        rule, reason, path = choice
        paths[name] = path
        sizes[name] = component.bytes
        if rule.precision_change:
            rule, outcome = plan_precision(name, component, rule, sizes, policy, path, spec.from_instance,
                                           device.type)
            if isinstance(outcome, str):  # a note: the change is left out for this model
                reason += f" ({outcome})"
            elif outcome:
                problems.append(outcome)
                continue
        if stand_ins:
            rule, change = rule.on_device(device.type)
            if change:
                reason += f"; on {device.type}: {change}"
                stood_in.append(name)
        rules[name], reasons[name] = rule, reason
        problem = rule.device_problem(device.type) if not device.is_auto else None
        if problem:
            problems.append(located_problem(policy, path, f"{name!r}: {problem}"))
    if problems:
        raise PolicyError(problems)

    # The chain.
    if policy.sequence == "auto":
        if spec.offload_seq is None:
            needs_chain = [n for n, r in rules.items() if r.chained]
            if needs_chain:
                raise PolicyError(located_problem(
                    policy, ("sequence",),
                    f"{spec.class_name} declares no model_cpu_offload_seq and no enable_model_cpu_offload of "
                    f"its own that offloadkit can read (diffusers' switch refuses such a class too), so "
                    f"`sequence: auto` has nothing to "
                    f"follow. Write `sequence:` as a list of its models in call order (models: "
                    f"{', '.join(spec.model_names)})"))
            candidates = []
        else:
            candidates = list(dict.fromkeys(spec.offload_seq))
        sequence = [n for n in candidates if n in models and rules[n].chained]
        chains = _chains(spec.offload_chains, sequence, rules)
    else:
        chains = ()
        sequence = list(policy.sequence)
        for i, name in enumerate(sequence):
            if not rules[name].chained:
                problems.append(located_problem(
                    policy, ("sequence", i),
                    f"{name!r} is in `sequence` but resolves to strategy {rules[name].name!r} "
                    f"({reasons[name]}). Remove it from `sequence` or give it `strategy: model`"))
        if problems:
            raise PolicyError(problems)

    position = {name: i for i, name in enumerate(sequence)}
    for name in models:
        if not rules[name].uploads_ahead or position.get(name, 0) > 0:
            continue
        if name in policy.components:
            where = "is first in `sequence`" if name in position else "is not in `sequence`"
            problems.append(located_problem(
                policy, ("components", name, "prefetch"),
                f"{name!r} {where}, so there is no model before it whose work its upload could overlap. "
                "Remove `prefetch`, or put it after another model in `sequence`", key=True))
        else:  # a `*` rule: the models with a predecessor prefetch, the first cannot
            rules[name] = rules[name].model_copy(update={"prefetch": False})
            reasons[name] += " (no model before it in the chain: not prefetched)"
    if problems:
        raise PolicyError(problems)

    layouts = _layouts(policy, models, rules, sizes, paths, device, machine or Machine(), problems)
    if problems:
        raise PolicyError(problems)

    plans = []
    for name, component in models.items():
        rule = rules[name]
        reason = reasons[name]
        if name in layouts:
            reason += f"; {layouts[name].summary()}"
        if rule.chained:
            index = position.get(name)
            if index is None:
                offloaded_by = END_OF_CALL
                reason += "; not in sequence: own hook, offloaded at end of call"
            else:
                offloaded_by = sequence[index + 1] if index + 1 < len(sequence) else END_OF_CALL
                earlier = _later_stage_start(name, offloaded_by, models, rules)
                if earlier is not None:  # OffloadHandle._stage_entered: it leaves when that one starts
                    offloaded_by = f"{earlier} starts (a later stage)"
            home, runs_on = HOST, device
            if rule.uploads_ahead:
                reason += f"; prefetched while {sequence[index - 1]} runs"
            if getattr(rule, "keep_on_device", False):
                offloaded_by = "never (kept after first use)"
                reason = reason.replace("; not in sequence: own hook, offloaded at end of call", "")
        else:
            index, offloaded_by = None, rule.offloaded_by
            home = device if rule.home == HOME_DEVICE else rule.home
            runs_on = device if rule.runs_on_device else None
        plans.append(ComponentPlan(
            name=name,
            type_name=component.type_name,
            rule=rule,
            home=home,
            runs_on=runs_on,
            offloaded_by=offloaded_by,
            chain_index=index,
            bytes=sizes[name],
            reason=reason,
            weights=weights_label(component, rule),
            stage=component.stage,
            stream=layouts.get(name),
        ))
    # Chain members in chain order first, then the others in the pipeline's order.
    plans.sort(key=lambda c: (c.chain_index is None, c.chain_index or 0))
    notes = ()
    if stood_in:
        written = "an accelerator" if written_for.is_auto else repr(policy.device)
        notes = (f"the policy is written for {written}; on {device}, {', '.join(stood_in)} "
                 f"{'runs' if len(stood_in) == 1 else 'run'} with stand-ins for the options that need it (see "
                 "the reasons): the same outputs, not the same timings",)
    return Plan(
        pipeline=spec.class_name,
        policy=policy.display_name,
        device=device,
        sequence=tuple(sequence),
        components=tuple(plans),
        chains=chains,
        notes=notes,
    )


def _written_for(written: Device, device: Device) -> bool:
    """Whether `device` is of the kind a policy's `device:` names (`auto`: any accelerator)."""
    return device.type != HOST if written.is_auto else written.type == device.type


def _chains(declared, sequence, rules) -> tuple[tuple[str, ...], ...]:
    """The pipeline's own hook chains (`PipelineSpec.offload_chains`) over the models this policy chains.

    A submodule link stays while its component is offloaded whole by the `model` strategy; empty chains go.
    Empty when the chains are one chain over `sequence` (the runtime's default).
    """
    kept = set(sequence)
    rules = {n: r for n, r in rules.items() if n in kept}
    chains = []
    for chain in declared:
        links = tuple(link for link in chain if link in kept or (
            "." in link and _whole_moves(rules.get(link.partition(".")[0]))))
        if links:
            chains.append(links)
    return tuple(chains) if chains != [tuple(sequence)] else ()


def _whole_moves(rule) -> bool:
    """Whether a component's rule moves it whole with `.to()` (what a submodule's own hook also does)."""
    return isinstance(rule, ModelRule) and rule.transfer == "standard"


def _layouts(policy, models, rules, sizes, paths, device, machine: Machine, problems) -> dict:
    """The block layout of every component whose rule has one and whose module is at hand."""
    kept = {n: sizes[n] or 0 for n, r in rules.items()
            if r.home == HOME_DEVICE or (r.chained and getattr(r, "keep_on_device", False))}
    pinned_left = machine.pinned_cap(policy.pinned_memory, device.type)
    layouts = {}
    for name, rule in rules.items():
        module = models[name].module
        if not rule.block_layout or module is None:
            continue
        room = DeviceRoom(budget=policy.budget.device_memory if policy.budget is not None else None,
                          free=machine.device_free, total=machine.device_total,
                          others=sum(v for n, v in kept.items() if n != name), device_type=device.type,
                          working=machine.working_beside_resident())
        # sized as the weights will be once the rule's precision change is applied
        planned = planned_tensor_bytes(module, rule) if rule.precision_change else {}
        try:
            with planned_sizes(planned):
                found = layout(module, rule, room, pinned_left, whole=paths[name][-1] == WILDCARD)
        except BlocksNotFound as exc:
            where = (*paths[name], "blocks") if rule.blocks is not None else paths[name]
            problems.append(located_problem(policy, where, f"{name!r}: {exc}"))
            continue
        config = getattr(module, "config", None) or {}
        if found.streamed and hasattr(config, "get") and config.get("force_upcast") \
                and models[name].dtype == "float16":
            problems.append(located_problem(
                policy, paths[name], f"{name!r} is a VAE with `force_upcast` in a float16 pipeline: the pipeline "
                "casts it to float32 for the decode, which its streamed blocks' packed float16 copies cannot "
                "follow. Give this VAE `strategy: model` (it is small), or stream none of its blocks "
                f"(`resident: {len(found.blocks)}`)"))
            continue
        pinned_left -= pinned_bytes(found)
        layouts[name] = found
    return layouts


def _later_stage_start(name, successor, models, rules) -> str | None:
    """The first streamed (hooked, unchained) model of a stage after `name`'s and before its chain successor's:
    the runtime offloads `name` when that model starts, before the successor would."""
    if successor not in models:  # the end of the call offloads it, as diffusers does
        return None
    found = [(STAGES.index(models[n].stage), n) for n, r in rules.items()
             if not r.chained and r.managed and r.runs_on_device and r.home != HOME_DEVICE
             and strictly_between(models[name].stage, models[n].stage, models[successor].stage)]
    return min(found)[1] if found else None
