"""Which rule each model of a pipeline gets, and whether its weights can run it.

Precedence, the quantization settings of the policy, the capability table
(`offloadkit.policy.capabilities`, gated by `library_gates`) and the precision a rule declares (`storage_dtype`, `quantize`):
everything about one model's rule that `resolve` needs before it builds the chain.
"""

from __future__ import annotations

import weakref

from ..policy.backends import BACKENDS
from ..policy.loading import located_problem
from ..policy.rules import ModelRule, ResidentRule, SkipRule, StrategyRule
from ..tensor_bytes import module_bytes, planned_sizes
from . import precision
from .library_gates import limit_for
from .module_paths import block_modules_problem

WILDCARD = "*"  # `components: {"*": {...}}` is the rule for every model without one of its own


def _backend(component, rule) -> str | None:
    """The component's quantization backend, or None when the rule's own precision change produced it."""
    backend = component.quantization
    if backend and precision.produced_by(rule, backend, component.quantization_detail):
        return None  # quantized or cast by this very rule when the policy was applied before
    return backend


def _label(component) -> str:
    label = BACKENDS[component.quantization]
    return f"{label} ({component.quantization_detail})" if component.quantization_detail else label


def choose_rule(policy, name, component, excluded, exclude_reason, problems):
    """(rule, reason, where in the policy it came from) for one model, or None after adding a problem.

    Precedence: the model's own `components` rule; then `quantization: refuse`; then `exclude`; then the
    `quantization` setting of its backend; then `components.*`; then `model`.
    """
    rule = policy.components.get(name)
    if rule is not None:
        return _checked(policy, name, component, rule, "policy `components` rule", ("components", name), False,
                        problems)
    wildcard = policy.components.get(WILDCARD)
    rule, reason = (wildcard, "policy `components.*` rule") if wildcard else (ModelRule.default(), "default")
    path = ("components", WILDCARD)
    backend = _backend(component, rule)
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
        return ResidentRule.default(), exclude_reason, ("exclude",)
    if not backend:
        return _checked(policy, name, component, rule, reason, path, False, problems)
    if isinstance(setting, StrategyRule):
        return _checked(policy, name, component, setting, f"{label}: policy `quantization.{key}` rule",
                        ("quantization", key), False, problems)
    if setting == "keep-on-device":
        return SkipRule.default(), f"{label}: kept where it was loaded", ("quantization", key)
    if setting == "offload":  # the error, if any, belongs to the line that asked for it
        return _checked(policy, name, component, rule, f"{label}: `{key}: offload` gives it the {reason}",
                        ("quantization", key), False, problems)
    return _checked(policy, name, component, rule, f"{label}: {reason}", path, True, problems)


def _checked(policy, name, component, rule, reason, path, auto, problems):
    """The rule if the component's backend can run it; under `auto` a strategy it can run; else a problem."""
    backend = _backend(component, rule)
    limit = limit_for(backend, rule)
    if limit is None:
        problem, note = block_modules_problem(name, component.module, rule)
        if problem:
            own_key = path[0] == "components" and "block_modules" in rule.model_fields_set
            problems.append(located_problem(policy, path + ("block_modules",) if own_key else path, problem))
            return None
        return rule, f"{reason} ({note})" if note else reason, path
    label = _label(component)
    if not auto:
        problems.append(located_problem(policy, path, _refusal(f"{name!r} is {label} and", limit)))
        return None
    candidates = []
    if limit.options:  # the same strategy with its default transfer
        candidates.append((rule.with_defaults(*limit.options, "prefetch"),
                           "`transfer` and `prefetch` left at their defaults"))
    candidates += [(s.default(), f"{s.name!r} instead") for s in limit.instead if not limit.options]
    candidates.append((SkipRule.default(), "kept where it was loaded"))
    for fallback, change in candidates:
        if limit_for(backend, fallback) is None:
            return fallback, f"{reason} ({label} cannot run {limit.what}: {change})", path
    raise AssertionError("`skip` is always allowed")


def _refusal(subject, limit) -> str:
    gate = f" With {limit.gate}," if limit.gate else ""
    return (f"{subject} cannot use strategy {limit.what}:{gate} {limit.reason}. Use {limit.alternative} for it "
            f"(source: {limit.seen})")


def _state(component) -> str:
    if component.quantization == "layerwise_casting":
        return f"already {component.quantization_detail or 'cast'} (layerwise casting)"
    return f"already quantized ({_label(component)})"


def plan_precision(name, component, rule, sizes, policy, path, from_instance, device_type=None):
    """Check a rule's `storage_dtype`/`quantize` against the component; fill in the backend and planned size.

    Returns (rule, outcome): the rule with its `quantize_with` resolved (or, for a `*` rule whose change is
    left out for a model already quantized or cast otherwise, without its precision change), and a
    problem, a note (a string, for that left-out change) or None.
    """
    backend = component.quantization
    own = backend is not None and precision.produced_by(rule, backend, component.quantization_detail)
    key = "storage_dtype" if rule.storage_dtype else "quantize"
    where = path + (key,) if path[0] == "components" and path[1] in policy.components else path
    if backend and not own:
        if path == ("components", WILDCARD):
            return rule.without_precision(), f"{_state(component)}: the `*` rule's `{key}` is not applied to it"
        wanted = rule.storage_dtype
        if wanted and backend == "layerwise_casting":
            why = f"the rule asks for `storage_dtype: {wanted}`. Reload the component to store it differently"
        else:
            why = f"`{key}` applies to float weights. Remove `{key}` from its rule"
        return rule, located_problem(policy, where, f"{name!r} is {_state(component)}; {why}", key=where != path)
    if key == "storage_dtype":
        effective = "layerwise_casting"
        subject = f"`storage_dtype` would store {name!r} with layerwise casting, which"
        config = getattr(component.module, "config", None) or {}
        half = "float16" in (rule.compute_dtype, component.dtype)
        if hasattr(config, "get") and config.get("force_upcast") and half:
            return rule, located_problem(policy, where, f"{name!r} is a VAE with `force_upcast` in a float16 pipeline: the "
                                   "pipeline casts it to float32 for the decode, which undoes layerwise casting, and "
                                   "without that cast the float16 latents do not match a float32 compute dtype. "
                                   "Leave `storage_dtype` off this VAE (it is small), or load a VAE that does not "
                                   "need the upcast (`force_upcast: false`)", key=where != path)
        if rule.compute_dtype and component.dtype and not own and rule.compute_dtype != component.dtype:
            # The pipeline feeds a component inputs in its weights' dtype; layers cast up to another dtype
            # would meet them in the first matmul ("mat1 and mat2 must have the same dtype").
            return rule, located_problem(
                policy, where[:-1] + ("compute_dtype",) if where != path else path,
                f"{name!r} has {component.dtype} weights, so the pipeline gives it {component.dtype} inputs, but "
                f"`compute_dtype: {rule.compute_dtype}` would run its layers in {rule.compute_dtype}: the first "
                f"call would fail on mismatched dtypes. Remove `compute_dtype` (it defaults to the component's "
                f"dtype), or load the pipeline in {rule.compute_dtype} (torch_dtype=torch.{rule.compute_dtype})",
                key=where != path)
    else:
        choice = rule.quantize_with
        chosen, why = precision.quantize_backend(choice, type(rule), installed=from_instance,
                                                 device_type=device_type)
        if chosen is None:
            hint = ("Use `quantize_with: auto`, or another strategy" if choice != "auto" else
                    "Use another strategy (e.g. 'model' or 'group')")
            return rule, located_problem(policy, where, f"{name!r}: `quantize` cannot be served for strategy "
                                         f"{rule.strategy!r}: {why}. {hint}", key=where != path)
        rule = rule.model_copy(update={"quantize_with": chosen})
        effective = chosen
        subject = f"`quantize: int8` would make {name!r} {BACKENDS[chosen]}, which"
    limit = limit_for(effective, rule)
    if limit is not None:
        return rule, located_problem(policy, path, _refusal(subject, limit))
    module = component.module
    if module is not None and not own:
        sizes[name] = planned_module_bytes(module, component.bytes, rule)
    return rule, None


# module -> {(its bytes as loaded, precision options): its bytes after the change}. Synthesis resolves
# hundreds of policies against one pipeline; walking every tensor of the model for each took most of
# its time. The loaded size is part of the key, so a module changed since is measured again.
_PLANNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def planned_module_bytes(module, loaded_bytes, rule) -> int:
    """The bytes `module` (of `loaded_bytes` as loaded) will have once the rule's precision change is applied."""
    key = (loaded_bytes, rule.storage_dtype, rule.quantize, rule.quantize_with)
    known = _PLANNED.setdefault(module, {})
    if key not in known:
        with planned_sizes(precision.planned_tensor_bytes(module, rule)):
            known[key] = module_bytes(module)
    return known[key]


def weights_label(component, rule) -> str | None:
    """How a component's weights are (or will be, once the policy is applied) stored, for the plan."""
    if component.quantization is None and getattr(rule, "storage_dtype", None):
        return f"{rule.storage_dtype} (layerwise casting, on apply)"
    if component.quantization is None and getattr(rule, "quantize", None):
        return f"{rule.quantize} ({rule.quantize_with}, on apply)"
    if component.quantization:
        return _label(component)
    return component.dtype
