"""How many bytes each component and each offload group of a pipeline takes, without its weights.

The models are built on the ``meta`` device from their configs (nothing is allocated,
nothing is downloaded) and measured with Accelerate's ``compute_module_sizes``. Sources:

* a built-in architecture name (``architecture_names()``: ``"sdxl"``, ``"flux1-dev"``, ...),
  whose configs ship in ``offloadkit/prediction/architectures/<name>/``;
* a local model folder laid out as diffusers downloads one (``model_index.json`` plus
  ``<component>/config.json``; weights are not needed);
* a loaded pipeline (its real modules are measured as they are).

>>> sizes = pipeline_sizes("sdxl", dtype="fp16")
>>> sizes["unet"].parameters
2567463684
>>> spec = spec_from_folder("sdxl", dtype="fp16")   # a PipelineSpec with bytes, for resolve()
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelSourceError, did_you_mean
from ..units import dtype_name

ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"
MODEL_INDEX = "model_index.json"
CONFIG = "config.json"

@dataclass(frozen=True)
class GroupSize:
    """One offload group as diffusers' block-level group offloading forms it (num_blocks_per_group=1)."""

    name: str  # diffusers' group_id, e.g. "down_blocks_0_0" or "UNet2DConditionModel_unmatched_group"
    bytes: int


@dataclass(frozen=True)
class ComponentSize:
    """Sizes of one model component."""

    name: str
    class_name: str
    dtype: str | None  # the dtype most of its floating-point weights have, e.g. "float16"
    parameters: int  # unique parameters (tied weights counted once); buffers not included
    bytes: int  # parameters and buffers as stored
    groups: tuple[GroupSize, ...]
    largest_layer: str  # the module whose own tensors are the largest: what sequential offload moves at once
    largest_layer_bytes: int


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


def architecture_names() -> list[str]:
    """Names of the built-in architectures.

    >>> "sdxl" in architecture_names()
    True
    """
    return sorted(p.name for p in ARCHITECTURES_DIR.iterdir() if (p / MODEL_INDEX).is_file())


SHIPPED = "offloadkit.json"  # in a built-in architecture's folder: {"dtype": ..., "why": ...}


def shipped_dtype(source) -> str:
    """The dtype a model folder's pipeline is run in unless told otherwise (`fp16`, `bf16`, `fp32`).

    Built-in architectures say it in their `offloadkit.json` (bf16 for FLUX, SD3.5 and Wan; fp16 for
    SD 1.5 and SDXL); a folder without one: fp16.

    >>> shipped_dtype("flux1-dev"), shipped_dtype("sdxl")
    ('bf16', 'fp16')
    """
    return shipped(source).get("dtype", "fp16")


def shipped(source) -> dict:
    """A model folder's `offloadkit.json` (what offloadkit knows of how it is run), or {} without one."""
    path = model_folder(source) / SHIPPED
    return json.loads(path.read_text()) if path.is_file() else {}


def model_folder(source: str | os.PathLike) -> Path:
    """The model folder of a built-in architecture name or a local folder path.

    A bare built-in name wins over a local folder of the same name: pass ``./sdxl`` for the folder.

    >>> model_folder("sd15").name
    'sd15'
    """
    text = os.fspath(source)
    if isinstance(source, str) and (ARCHITECTURES_DIR / text / MODEL_INDEX).is_file() and "/" not in text:
        return ARCHITECTURES_DIR / text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise ModelSourceError(
                f"{path / MODEL_INDEX} not found: {str(path)!r} is not a diffusers model folder. Pass a folder "
                f"with model_index.json and one config.json per component (as a downloaded model has), "
                f"or a built-in architecture: {', '.join(architecture_names())}")
        return path
    if path.is_file() and path.name == MODEL_INDEX:
        return path.parent
    raise ModelSourceError(
        f"{text!r} is neither a built-in architecture nor a folder. "
        + did_you_mean(text, architecture_names(), "built-in architectures"))


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelSourceError(f"{path} not found. Add the component's config.json (as a downloaded model has) "
                            f"or mark the component [null, null] in {MODEL_INDEX}") from None
    except OSError as exc:
        raise ModelSourceError(f"{path}: cannot be read ({exc.strerror}). Check the file's permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}). "
                            "Fix the file or download it again") from None
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path}: expected a JSON object, found {type(data).__name__}. "
                            "Fix the file or download it again")
    return data


def read_model_index(source: str | os.PathLike) -> tuple[str, dict[str, tuple[str, str] | None]]:
    """The pipeline class name and each component's ``(library, class_name)`` (None where ``[null, null]``).

    >>> read_model_index("flux1-dev")[1]["transformer"]
    ('diffusers', 'FluxTransformer2DModel')
    """
    path = model_folder(source) / MODEL_INDEX
    index = _read_json(path)
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        raise ModelSourceError(f"{path}: no '_class_name' naming the pipeline class. Add it, e.g. "
                            "\"_class_name\": \"StableDiffusionXLPipeline\"")
    components: dict[str, tuple[str, str] | None] = {}
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, list):
            continue  # settings such as "force_zeros_for_empty_prompt"
        if len(value) != 2:
            raise ModelSourceError(f"{path}: {key!r} must be a [library, class_name] pair, found {value!r}")
        library, name = value
        components[key] = None if library is None or name is None else (str(library), str(name))
    return class_name, components


def pipeline_settings(source: str | os.PathLike) -> dict:
    """The pipeline's own settings in ``model_index.json`` (e.g. ``force_zeros_for_empty_prompt``).

    >>> pipeline_settings("sdxl")["force_zeros_for_empty_prompt"]
    True
    """
    index = _read_json(model_folder(source) / MODEL_INDEX)
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}


def _resolve_class(library: str, class_name: str, *, where: Path, component: str):
    # diffusers writes a pipeline module name as the library for pipeline-specific
    # classes (["stable_diffusion", "StableDiffusionSafetyChecker"]).
    candidates = [library] if library in ("diffusers", "transformers") else [f"diffusers.pipelines.{library}", library]
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        with _quiet_libraries():  # lazy imports warn about optional backends (torchvision, ...)
            try:
                cls = getattr(module, class_name, None)
            except Exception:  # a lazy module whose backend is missing
                cls = None
        if isinstance(cls, type):
            return cls
    names = []
    with contextlib.suppress(ImportError):
        names = dir(importlib.import_module(candidates[0]))
    raise ModelSourceError(
        f"{where}: component {component!r} names class {class_name!r} of {library!r}, which the installed "
        f"packages do not have. Fix the name or install the package that provides it. "
        + did_you_mean(class_name, [n for n in names if n[:1].isupper()], "classes"))


def _is_model_class(cls) -> bool:
    import torch

    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


# --------------------------------------------------------------------------
# Building on meta
# --------------------------------------------------------------------------


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    return getattr(torch, dtype_name(name))


@contextlib.contextmanager
def _quiet_libraries():
    # from_config warns about keys a class does not read (e.g. "_diffusers_version"); not the user's concern here.
    import diffusers
    import transformers

    levels = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _keep_in_fp32(module, dtype) -> list[str]:
    """Module names the library would keep in float32 when loading in `dtype`."""
    import torch

    names = list(getattr(module, "_keep_in_fp32_modules", None) or ())
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        # transformers upcasts these only for fp16; its *_strict list for fp16 and bf16
        names = names if dtype == torch.float16 else []
        if dtype in (torch.float16, torch.bfloat16):
            names += list(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return names


def _cast(module, dtype) -> None:
    import torch

    module.to(dtype)
    keep = _keep_in_fp32(module, dtype)
    if not keep or dtype == torch.float32:
        return
    for name, sub in module.named_modules():
        if any(k in name.split(".") for k in keep):
            sub.to(torch.float32)


def _no_init_weights():
    # transformers runs its weight initialisers in __init__; on meta they only cost time
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _instantiate(cls, config: dict, *, on_meta_device: bool):
    import torch
    from accelerate import init_empty_weights

    with contextlib.ExitStack() as stack:
        stack.enter_context(init_empty_weights(include_buffers=on_meta_device))
        if on_meta_device:  # buffers computed in __init__ (sin-cos tables, ...) cost nothing either
            stack.enter_context(torch.device("meta"))
        stack.enter_context(_no_init_weights())
        if hasattr(cls, "from_config") and hasattr(cls, "config_name"):  # diffusers ModelMixin
            return cls.from_config(config)
        # transformers PreTrainedModel: its own config class reads the file's keys
        module = cls(cls.config_class.from_dict(config))
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # from_pretrained ties shared embeddings; the bare constructor does not
    return module


def build_component(source: str | os.PathLike, name: str, *, dtype: str | None = None):
    """Build one model component of a model folder on the ``meta`` device, in `dtype`.

    `dtype` (``"fp16"``, ``"bf16"``, ``"fp32"``, ...) defaults to the config's ``torch_dtype``,
    else float32; modules the library keeps in float32 (``_keep_in_fp32_modules``) stay so.

    >>> unet = build_component("sd15", "unet")
    >>> next(unet.parameters()).device.type
    'meta'
    """
    folder = model_folder(source)
    _, components = read_model_index(folder)
    if name not in components:
        raise ModelSourceError(f"{folder / MODEL_INDEX} has no component {name!r}. "
                            + did_you_mean(name, list(components), "components"))
    entry = components[name]
    if entry is None:
        raise ModelSourceError(f"{folder / MODEL_INDEX}: component {name!r} is [null, null] (not part of this model)")
    cls = _resolve_class(*entry, where=folder / MODEL_INDEX, component=name)
    if not _is_model_class(cls):
        raise ModelSourceError(f"{folder / MODEL_INDEX}: component {name!r} ({cls.__name__}) is not a model; "
                            "only models have sizes")
    config_path = folder / name / CONFIG
    config = _read_json(config_path)
    target = _torch_dtype(dtype or config.get("torch_dtype") or config.get("dtype") or "float32")
    try:
        with _quiet_libraries():
            try:
                module = _instantiate(cls, config, on_meta_device=True)
            except (NotImplementedError, RuntimeError):
                # some __init__ reads a value (.item(), numpy) that meta tensors do not have:
                # build with buffers computed on the CPU (parameters stay on meta)
                module = _instantiate(cls, config, on_meta_device=False)
            _cast(module, target)
    except ModelSourceError:
        raise
    except Exception as exc:  # a config the class rejects: say which file
        raise ModelSourceError(f"{config_path}: {cls.__name__} cannot be built from this config "
                            f"({type(exc).__name__}: {exc}). Check the file against the model's published "
                            "config.json") from None
    return module.eval()


_BUILT: dict = {}  # (folder, dtype) -> models on meta, built once per process


def build_components(source: str | os.PathLike, *, dtype: str | None = None) -> dict:
    """Every model component of a model folder, built on ``meta`` (non-model entries skipped).

    Built once per process for a folder and dtype and shared afterwards: treat them as read-only.

    >>> sorted(build_components("sdxl"))
    ['text_encoder', 'text_encoder_2', 'unet', 'vae']
    """
    folder = model_folder(source)
    key = (str(folder.resolve()), dtype)
    if key not in _BUILT:
        _BUILT[key] = _build_components(folder, dtype)
    return dict(_BUILT[key])


def _build_components(folder: Path, dtype: str | None) -> dict:
    _, components = read_model_index(folder)
    built = {}
    for name, entry in components.items():
        if entry is None:
            continue
        if not _is_model_class(_resolve_class(*entry, where=folder / MODEL_INDEX, component=name)):
            continue  # tokenizers, schedulers, feature extractors
        built[name] = build_component(folder, name, dtype=dtype)
    return built


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


def _offload_groups(module, sizes: dict, prefix: str, block_modules: set[str]) -> list[GroupSize]:
    """Mirror of diffusers' `_apply_group_offloading_block_level` with num_blocks_per_group=1."""
    import torch

    groups: list[GroupSize] = []
    grouped = 0
    for child_name, child in module.named_children():
        path = prefix + child_name
        if child_name in block_modules:  # an explicit block module: offloaded by its own groups
            inner = _offload_groups(child, sizes, path + ".", block_modules)
            groups.extend(inner)
            grouped += sizes.get(path, 0)
        elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            for i in range(len(child)):
                # diffusers names groups `<prefix><list>_<first>_<last>`, prefix with dots kept
                groups.append(GroupSize(f"{prefix}{child_name}_{i}_{i}", sizes.get(f"{path}.{i}", 0)))
                grouped += sizes.get(f"{path}.{i}", 0)
    # Everything else (unmatched children and the module's own tensors) is one group.
    rest = sizes.get(prefix.rstrip("."), 0) - grouped
    if _has_rest(module, block_modules):
        groups.append(GroupSize(f"{prefix}{type(module).__name__}_unmatched_group", rest))
    return groups


def _has_rest(module, block_modules: set[str]) -> bool:
    # diffusers makes the unmatched group when there is any unmatched child or own tensor, even an empty one
    import torch

    for child_name, child in module.named_children():
        if child_name not in block_modules and not isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            return True
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def size_module(module, name: str = "", *, block_modules: list[str] | None = None) -> ComponentSize:
    """Sizes of one model (on ``meta`` or loaded): total, offload groups, largest layer.

    `block_modules` defaults to the model's ``_group_offload_block_modules``, as diffusers does.

    >>> import torch
    >>> size_module(torch.nn.Linear(4, 4), "head").bytes
    80
    """
    from ..tensor_bytes import module_sizes

    sizes = module_sizes(module)
    total = sizes.get("", 0)
    if block_modules is None:
        block_modules = getattr(module, "_group_offload_block_modules", None)
    groups = tuple(_offload_groups(module, sizes, "", set(block_modules or ())))

    # A module's own tensors (what Accelerate's sequential hooks move at once) = its size minus its children's.
    largest, largest_bytes = "", 0
    for path, sub in module.named_modules():
        own = sizes.get(path, 0) - sum(sizes.get(f"{path}.{c}" if path else c, 0) for c, _ in sub.named_children())
        if own > largest_bytes:
            largest, largest_bytes = path, own

    from ..plans.pipeline_spec import main_dtype

    params = sum(p.numel() for p in module.parameters())
    dtype = main_dtype(module)
    return ComponentSize(name=name, class_name=type(module).__name__, dtype=dtype, parameters=params,
                         bytes=total, groups=groups, largest_layer=largest, largest_layer_bytes=largest_bytes)


def _is_pipeline(source) -> bool:
    return hasattr(source, "components") and not isinstance(source, (str, os.PathLike))


def pipeline_sizes(source, *, dtype: str | None = None) -> dict[str, ComponentSize]:
    """Sizes of every model component of a built-in architecture, a model folder or a loaded pipeline.

    `dtype` applies to built models (a loaded pipeline is measured as it is).

    >>> sizes = pipeline_sizes("flux1-dev")
    >>> sizes["transformer"].parameters
    11901408320
    >>> sum(g.bytes for g in sizes["transformer"].groups) == sizes["transformer"].bytes
    True
    """
    import torch

    if _is_pipeline(source):
        if dtype is not None:
            raise ModelSourceError("dtype= applies to models built from configs; a loaded pipeline is measured as it "
                                "is. Convert it first (pipe.to(torch.float16)) or drop dtype=")
        return {name: size_module(value, name) for name, value in source.components.items()
                if isinstance(value, torch.nn.Module)}
    return {name: size_module(module, name) for name, module in build_components(source, dtype=dtype).items()}


def spec_from_folder(source, *, dtype: str | None = None):
    """A `PipelineSpec` with `bytes` filled in, from a built-in architecture, a model folder or a loaded pipeline.

    The component list and offload sequence come from the pipeline class (`spec_from_class`);
    models the folder does not have (missing or ``[null, null]``) are marked not present.

    >>> spec = spec_from_folder("sdxl")
    >>> spec.get("unet").bytes > 0, spec.get("image_encoder").present
    (True, False)
    """
    from ..plans.pipeline_spec import spec_from_class, spec_from_pipeline

    if _is_pipeline(source):
        spec = spec_from_pipeline(source)
        sizes = pipeline_sizes(source, dtype=dtype)
        return dataclasses.replace(spec, components=tuple(
            dataclasses.replace(c, bytes=sizes[c.name].bytes) if c.name in sizes else c for c in spec.components))
    folder = model_folder(source)
    class_name, entries = read_model_index(folder)
    spec = spec_from_class(class_name)
    sizes = pipeline_sizes(folder, dtype=dtype)
    built = build_components(folder, dtype=dtype)  # the meta models just sized (cached): for precision planning
    components = []
    for component in spec.components:
        if component.name in sizes:
            size = sizes[component.name]
            component = dataclasses.replace(component, type_name=size.class_name, bytes=size.bytes, present=True,
                                            dtype=size.dtype, module=built.get(component.name))
        elif component.is_model:
            component = dataclasses.replace(component, present=False)
        elif entries.get(component.name) is None:
            component = dataclasses.replace(component, present=False)
        components.append(component)
    return dataclasses.replace(spec, components=tuple(components))
