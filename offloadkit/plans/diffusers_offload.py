"""What diffusers' own `enable_model_cpu_offload` hooks on a pipeline class: its chains and its exclusions.

`DiffusionPipeline.enable_model_cpu_offload` chains the models of `model_cpu_offload_seq` in order
(unknown and repeated names skipped), then moves the `_exclude_from_cpu_offload` models *outside*
that sequence to the device with no hook and gives every other model its own hook. An exclusion of
a model that is in the sequence has no effect there: the Kandinsky priors' `prior` is chained.

A few classes override the switch. Read from their source (no instance needed):

- combined pipelines (Kandinsky 2.2 img2img, Stable Cascade, Wuerstchen) call
  `self.<sub>.enable_model_cpu_offload()` on the sub-pipelines their `__init__` builds: each
  sub-pipeline is one chain, over its own sequence, of the components passed to it
  (`prior=prior_prior`); the sub-pipeline's end of call offloads it before the next one runs;
- AudioLDM2 and MusicLDM chain an explicit list, `model_sequence = [self.text_encoder.text_model,
  ..., self.text_encoder]`, where a link may be a submodule of a component (`text_encoder.text_model`).

`derive(cls)` gives that as an `OffloadOrder`, or None where diffusers' switch itself refuses
(no sequence, no override).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass

from ..errors import PipelineError


@dataclass(frozen=True)
class OffloadOrder:
    """The hook chains diffusers' switch installs, in order, and the models it moves to the device unhooked.

    A link is a component name or `component.submodule` (a submodule hooked as a chain link of its own).
    """

    chains: tuple[tuple[str, ...], ...]
    exclude: tuple[str, ...]
    source: str  # where it was read: "model_cpu_offload_seq" or "AudioLDM2Pipeline.enable_model_cpu_offload"

    @property
    def sequence(self) -> tuple[str, ...]:
        """The components hooked as a whole, in hook order (a component's place is that of its own hook)."""
        return tuple(dict.fromkeys(link for chain in self.chains for link in chain if "." not in link))


def _base_switch():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.enable_model_cpu_offload


def overrides_switch(cls) -> bool:
    """Whether `cls` brings its own `enable_model_cpu_offload` instead of DiffusionPipeline's."""
    return getattr(cls, "enable_model_cpu_offload", None) is not _base_switch()


def derive(cls) -> OffloadOrder | None:
    """The chains and exclusions of `cls`'s own `enable_model_cpu_offload`; None where it refuses to run."""
    if overrides_switch(cls):
        return _from_override(cls)
    seq = getattr(cls, "model_cpu_offload_seq", None)
    if not isinstance(seq, str):
        return None  # diffusers: "no `model_cpu_offload_seq` class attribute is set"
    chain = tuple(dict.fromkeys(n for n in seq.split("->") if n))  # a repeated name is hooked once
    excluded = tuple(n for n in (getattr(cls, "_exclude_from_cpu_offload", ()) or ()) if n not in chain)
    return OffloadOrder((chain,), excluded, "model_cpu_offload_seq")


def _from_override(cls) -> OffloadOrder:
    owner = next(c for c in cls.__mro__ if "enable_model_cpu_offload" in vars(c))
    where = f"{owner.__name__}.enable_model_cpu_offload"
    body = _function(owner, "enable_model_cpu_offload")
    subs = [node.func.value.attr for node in ast.walk(body) if _is_self_call(node, "enable_model_cpu_offload")]
    if subs:
        return _from_sub_pipelines(owner, subs, where)
    links = _model_sequence(body)
    if links:
        return OffloadOrder((links,), (), where)
    raise PipelineError(f"{cls.__name__} overrides enable_model_cpu_offload ({where}) in a way offloadkit cannot "
                        "read (neither sub-pipelines' switches nor a `model_sequence` list). Write `sequence:` as a "
                        "list of its models in call order")


def _from_sub_pipelines(owner, subs: list[str], where: str) -> OffloadOrder:
    """One chain per sub-pipeline switched on, its component names mapped to the combined pipeline's."""
    built = _sub_pipelines(owner)
    chains, excluded = [], []
    for attr in subs:
        if attr not in built:
            raise PipelineError(f"{where} switches on self.{attr}, which {owner.__name__}.__init__ does not build "
                                "from its components; offloadkit cannot tell its models. Write `sequence:` as a "
                                "list of the models in call order")
        sub_cls, names = built[attr]
        order = derive(sub_cls)
        if order is None:
            continue  # diffusers would raise here; the remaining sub-pipelines still say what is chained
        for chain in order.chains:
            mapped = tuple(_rename(link, names) for link in chain if link.partition(".")[0] in names)
            if mapped:
                chains.append(mapped)
        excluded += [names[n] for n in order.exclude if n in names]
    return OffloadOrder(tuple(chains), tuple(dict.fromkeys(excluded)), where)


def _rename(link: str, names: dict) -> str:
    name, dot, path = link.partition(".")
    return names[name] + dot + path


def _sub_pipelines(owner) -> dict:
    """{attribute: (pipeline class, {its component name: ours})} for `self.x = SomePipeline(a=b, ...)` in __init__."""
    from diffusers import DiffusionPipeline

    scope = vars(inspect.getmodule(owner))
    found = {}
    for node in ast.walk(_function(owner, "__init__")):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)):
            continue
        sub_cls = scope.get(node.value.func.id)
        if not (isinstance(sub_cls, type) and issubclass(sub_cls, DiffusionPipeline)):
            continue
        names = {kw.arg: kw.value.id for kw in node.value.keywords if isinstance(kw.value, ast.Name)}
        for target in node.targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                found[target.attr] = (sub_cls, names)
    return found


def _model_sequence(body) -> tuple[str, ...]:
    """The links of a `model_sequence = [self.a, self.b.c, ...]` list, as "a", "b.c"."""
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List) \
                and any(isinstance(t, ast.Name) and t.id == "model_sequence" for t in node.targets):
            links = [_self_path(element) for element in node.value.elts]
            if all(links):
                return tuple(links)
    return ()


def _self_path(node) -> str | None:
    """"a.b" for the expression `self.a.b`, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


def _is_self_call(node, method: str) -> bool:
    """`self.<attr>.<method>(...)`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method
            and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Name)
            and node.func.value.value.id == "self")


def _function(owner, name: str) -> ast.FunctionDef:
    try:
        source = textwrap.dedent(inspect.getsource(vars(owner)[name]))
    except (OSError, TypeError) as exc:
        raise PipelineError(f"offloadkit reads {owner.__name__}.{name} from its source to follow its offload, and "
                            f"the source is not available ({exc}). Write `sequence:` as a list of its models in "
                            "call order") from None
    return ast.parse(source).body[0]
