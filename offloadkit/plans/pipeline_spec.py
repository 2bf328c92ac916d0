"""What the planner needs to know about a pipeline: its components, their kinds, its offload sequence.

Built from a loaded pipeline or from a pipeline class alone (constructor signature
and type hints), so `offloadkit explain` works with no weights.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field

from ..errors import PipelineError, did_you_mean
from ..tensor_bytes import module_bytes
from ..units import torch_dtype_name
from .diffusers_offload import derive
from .quantization import detect
from .stages import stage_of

# Constructor parameters with these types are settings, not components.
_SETTING_TYPES = (bool, int, float, str, bytes, list, tuple, dict, type(None))


@dataclass(frozen=True)
class ComponentSpec:
    """One pipeline component as the planner sees it."""

    name: str
    type_name: str
    is_model: bool
    present: bool = True
    quantization: str | None = None  # a backend key of offloadkit.policy.backends.BACKENDS, or None
    quantization_detail: str = ""  # what was seen, e.g. "Int8Tensor" or "stored as float8_e4m3fn"
    dtype: str | None = None  # the most common floating dtype of its parameters ("float16"), when loaded
    bytes: int | None = None
    module: object = field(default=None, compare=False, repr=False)

    @property
    def stage(self) -> str:
        """The stage its forward belongs to (`plans.stages`), from its class, else its name."""
        return stage_of(self.name, self.type_name)


@dataclass(frozen=True)
class PipelineSpec:
    class_name: str
    components: tuple[ComponentSpec, ...]
    offload_seq: tuple[str, ...] | None  # the components diffusers' switch chains, in hook order; None: it refuses
    exclude: tuple[str, ...]  # what it moves to the device unhooked (exclusions outside the sequence)
    from_instance: bool
    # its hook chains when they are not one chain over `offload_seq` (combined pipelines: one per sub-pipeline;
    # AudioLDM2: submodule links such as `text_encoder.text_model`); empty otherwise
    offload_chains: tuple[tuple[str, ...], ...] = ()

    def get(self, name: str) -> ComponentSpec | None:
        for component in self.components:
            if component.name == name:
                return component
        return None

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.is_model)


def _offload_attrs(cls) -> tuple[tuple[str, ...] | None, tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(sequence, exclusions, chains) as the class's own `enable_model_cpu_offload` hooks (`diffusers_offload`)."""
    try:
        order = derive(cls)
    except PipelineError:  # an override offloadkit cannot read: like a class with no sequence
        order = None
    if order is None:
        return None, tuple(getattr(cls, "_exclude_from_cpu_offload", ()) or ()), ()
    chains = order.chains if order.chains != (order.sequence,) else ()
    return order.sequence, order.exclude, chains


def main_dtype(module) -> str | None:
    """The floating dtype most parameters have (by element count), e.g. "float16"."""
    counts: dict = {}
    for tensor in module.parameters():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return torch_dtype_name(max(counts, key=counts.get)) if counts else None


def spec_from_pipeline(pipe) -> PipelineSpec:
    """Describe a loaded pipeline (components as they are, absent optional ones marked absent)."""
    import torch

    cls = type(pipe)
    base = getattr(pipe, "_offloadkit_base_class", cls)
    seq, exclude, chains = _offload_attrs(base)
    declared = None
    components = []
    for name, value in pipe.components.items():
        is_model = isinstance(value, torch.nn.Module)
        type_name = type(value).__name__
        if value is None:  # an optional component not loaded: what would it be?
            declared = declared or {c.name: c for c in spec_from_class(base).components}
            if name in declared:
                is_model, type_name = declared[name].is_model, declared[name].type_name
        found = detect(value) if value is not None and is_model else None
        components.append(ComponentSpec(
            name=name,
            type_name=type_name,
            is_model=is_model,
            present=value is not None,
            quantization=found.backend if found else None,
            quantization_detail=found.detail if found else "",
            dtype=main_dtype(value) if value is not None and is_model else None,
            bytes=module_bytes(value) if value is not None and is_model else None,
            module=value if is_model else None,
        ))
    return PipelineSpec(base.__name__, tuple(components), seq, exclude, from_instance=True, offload_chains=chains)


def resolve_pipeline_class(name: str):
    """A diffusers pipeline class from its name (`StableDiffusionXLPipeline`)."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() and not name.startswith("_") else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline) \
            or cls is diffusers.DiffusionPipeline:
        candidates = [n for n in dir(diffusers) if n.endswith("Pipeline")]
        what = "no pipeline class" if cls is None else "no concrete pipeline class (it must be a subclass of " \
            "DiffusionPipeline with its own components; Auto* classes pick one at load time)"
        raise PipelineError(f"diffusers has {what} {name!r}. " + did_you_mean(name, candidates, "pipeline classes"))
    try:
        getattr(cls, "model_cpu_offload_seq", None)
    except ImportError as exc:
        raise PipelineError(f"{name} needs a package that is not installed: {str(exc).strip()}") from None
    return cls


def spec_from_class(cls) -> PipelineSpec:
    """Describe a pipeline class from its constructor, as if every component were loaded."""
    import torch

    if isinstance(cls, str):
        cls = resolve_pipeline_class(cls)
    seq, exclude, chains = _offload_attrs(cls)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        hints = getattr(cls.__init__, "__annotations__", {})
    components = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        classes = _classes_in(hints.get(name))
        if classes and all(c in _SETTING_TYPES for c in classes):
            continue
        is_model = any(isinstance(c, type) and issubclass(c, torch.nn.Module) for c in classes)
        if not classes:  # no usable annotation: trust the offload sequence
            is_model = bool(seq) and name in seq
        names = dict.fromkeys(c.__name__ for c in classes if c is not type(None))
        type_name = " | ".join(names) or "unknown"
        components.append(ComponentSpec(name=name, type_name=type_name, is_model=is_model))
    return PipelineSpec(cls.__name__, tuple(components), seq, exclude, from_instance=False, offload_chains=chains)


def _classes_in(annotation) -> tuple:
    if annotation is None:
        return ()
    if isinstance(annotation, type):
        return (annotation,)
    args = typing.get_args(annotation)
    if args:
        found = []
        for arg in args:
            found.extend(_classes_in(arg))
        return tuple(found)
    return ()
