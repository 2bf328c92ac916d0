"""Precision a policy declares per component: `storage_dtype` (layerwise casting) and `quantize` (int8 weights).

This module plans them: which layers each selects, the bytes each affected tensor will
have (`planned_tensor_bytes`, from the same layer selection `apply` uses), and which
backend serves `quantize`. `offloadkit.runtime.precision` makes the change when the
policy is applied.
"""

from __future__ import annotations

from ..units import dtype_size
from .library_gates import limit_for
from .quantization import tensor_backend

# diffusers' defaults (hooks.layerwise_casting), restated so the planner needs no diffusers import to read them.
_DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


# What `quantize: int8` leaves on the weights, as offloadkit.quantization.detect describes it.
INT8_DETAIL = {"torchao": "Int8Tensor", "quanto": "qint8"}


def produced_by(rule, backend: str, detail: str) -> bool:
    """Whether `rule` would leave a component in the state detected (backend, detail): applied before."""
    if getattr(rule, "storage_dtype", None):
        return backend == "layerwise_casting" and detail == f"stored as {rule.storage_dtype}"
    if getattr(rule, "quantize", None):
        return INT8_DETAIL.get(backend) == detail and rule.quantize_with in ("auto", backend)
    return False


def _skip_patterns(module) -> tuple[str, ...]:
    try:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN as patterns
    except ImportError:
        patterns = _DEFAULT_SKIP_PATTERNS
    patterns = tuple(patterns)
    # What ModelMixin.enable_layerwise_casting adds: the model's float32 modules and its own skip list.
    for attribute in ("_keep_in_fp32_modules", "_skip_layerwise_casting_patterns"):
        extra = getattr(module, attribute, None)
        if extra:
            patterns += tuple(extra)
    # ... and the layers of LoRA-style adapters (small; peft casts its inputs to their dtype)
    try:
        from peft.tuners.loha.layer import LoHaLayer
        from peft.tuners.lokr.layer import LoKrLayer
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return patterns
    for layer in (LoHaLayer, LoKrLayer, LoraLayer):
        patterns += tuple(layer.adapter_layer_names)
    return patterns


def _castable_types():
    import torch

    try:
        from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS as types
    except ImportError:
        types = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d, torch.nn.Linear, torch.nn.Embedding)
    return tuple(types)


def castable_layers(module) -> list[tuple[str, object]]:
    """The layers `storage_dtype` casts, as diffusers' `enable_layerwise_casting` picks them.

    For models that are not diffusers models (transformers text encoders), embeddings
    are kept too: those models report their dtype from their first parameter, which
    pipelines use to cast prompt embeddings, so it must stay in the compute dtype.
    """
    import re

    import torch

    patterns = _skip_patterns(module)
    skip = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None  # one search per module
    types = _castable_types()
    is_diffusers = any(c.__module__.startswith("diffusers") for c in type(module).__mro__)
    skip_types = () if is_diffusers else (torch.nn.Embedding,)
    found = []

    def walk(sub, prefix):
        if prefix and skip is not None and skip.search(prefix):
            return
        if isinstance(sub, skip_types):
            return
        if isinstance(sub, types):
            found.append((prefix, sub))
            return
        for name, child in sub.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    if not is_diffusers:
        first = next((n for n, p in module.named_parameters() if p.is_floating_point()), None)
        if first is not None:
            found = [(n, layer) for n, layer in found if not (first == n or first.startswith(n + "."))]
    return found


def quantizable_layers(module) -> list[tuple[str, object]]:
    """The layers `quantize: int8` quantizes: every Linear with plain floating weights."""
    import torch

    layers = []
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, torch.nn.Linear) and weight is not None and tensor_backend(weight) is None \
                and weight.is_floating_point() and type(weight) in (torch.Tensor, torch.nn.Parameter):
            layers.append((name, sub))
    return layers


def _int8_bytes(weight, backend: str) -> int:
    rows = weight.shape[0]
    if backend == "torchao":  # Int8Tensor: int8 data, a float32 scale and an int8 zero point per row
        return weight.numel() + rows * 4 + rows
    # quanto's WeightQBytesTensor: int8 data and a scale per row in the weight's dtype; its QLinear adds two
    # scalar buffers (input and output scale) in that dtype, counted here with the weight they come with
    return weight.numel() + rows * weight.element_size() + 2 * weight.element_size()


def planned_tensor_bytes(module, rule) -> dict[int, int]:
    """{id(tensor): bytes} for the tensors the rule's precision change affects, as they will be stored afterwards."""
    sizes = {}
    storage = getattr(rule, "storage_dtype", None)
    if storage:
        per_element = dtype_size(storage)
        for _, layer in castable_layers(module):
            for tensor in (*layer.parameters(), *layer.buffers()):
                if tensor.is_floating_point():
                    sizes[id(tensor)] = tensor.numel() * per_element
    elif getattr(rule, "quantize", None):
        for _, layer in quantizable_layers(module):
            sizes[id(layer.weight)] = _int8_bytes(layer.weight, rule.quantize_with)
    return sizes


# Devices a backend's int8 weight-only layers do not run on, with the reason.
_NOT_ON_DEVICE = {
    ("quanto", "mps"): "quanto's int8 matmul (`qbytes_mm`) has no MPS kernel and falls back to the CPU in the middle "
                       "of the graph (reported in deepbeepmeep/Wan2GP#1777)",
}


def quantize_backend(choice: str, rule_class, *, installed: bool = True,
                     device_type: str | None = None) -> tuple[str | None, str | None]:
    """(backend, None) for `quantize_with: choice` under a strategy (its rule class) on `device_type`, or (None, why).

    `auto` takes torchao, else optimum-quanto: the first that is installed, runs on the device and
    that the strategy can run with. `installed=False` (validating or planning without a loaded
    pipeline) does not look for the packages: they are needed where the policy is applied.
    """
    candidates = ("torchao", "quanto") if choice == "auto" else (choice,)
    reasons = []
    for backend in candidates:
        if installed and not _installed(backend):
            reasons.append(f"{_PACKAGES[backend]} is not installed (pip install {_PACKAGES[backend]})")
            continue
        if (backend, device_type) in _NOT_ON_DEVICE:
            reasons.append(f"{backend} does not run on {device_type}: {_NOT_ON_DEVICE[(backend, device_type)]}")
            continue
        limit = limit_for(backend, rule_class.default())
        if limit is not None:
            reasons.append(f"{backend} cannot run with {rule_class.name!r}: {limit.reason}")
            continue
        return backend, None
    return None, "; ".join(reasons)


_PACKAGES = {"torchao": "torchao", "quanto": "optimum-quanto"}


def _installed(backend: str) -> bool:
    import importlib.util

    name = "torchao" if backend == "torchao" else "optimum.quanto"
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
