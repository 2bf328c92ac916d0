"""Precision a policy declares per component: `storage_dtype` (layerwise casting) and `quantize` (int8 weights).

Both change a component's weights in place when the policy is applied, before any
offload hook is installed (a diffusers hook registered before Accelerate's survives
Accelerate's removal; one registered after does not). Both are kept by `remove()`:
casting weights back up would not bring back the precision they lost.

The planner sizes both before they happen: `planned_tensor_bytes` names the bytes
each affected tensor will have, from the same layer selection `apply` uses.
"""

from __future__ import annotations

from .errors import PipelineError

DTYPE_BYTES = {"float8_e4m3fn": 1, "float8_e5m2": 1, "bfloat16": 2, "float16": 2, "float32": 4}

# diffusers' defaults (hooks.layerwise_casting), restated so the planner needs no diffusers import to read them.
_DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


# What `quantize: int8` leaves on the weights, as offloadkit.quantization.detect describes it.
INT8_DETAIL = {"torchao": "Int8Tensor", "quanto": "qint8"}


def wants_change(options: dict) -> bool:
    return bool(options.get("storage_dtype") or options.get("quantize"))


def produced_by(options: dict, backend: str, detail: str) -> bool:
    """Whether `options` would leave a component in the state detected (backend, detail): applied before."""
    if options.get("storage_dtype"):
        return backend == "layerwise_casting" and detail == f"stored as {options['storage_dtype']}"
    if options.get("quantize"):
        return INT8_DETAIL.get(backend) == detail and options.get("quantize_with", "auto") in ("auto", backend)
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
    types = _castable_types()
    is_diffusers = any(c.__module__.startswith("diffusers") for c in type(module).__mro__)
    skip_types = () if is_diffusers else (torch.nn.Embedding,)
    found = []

    def walk(sub, prefix):
        if prefix and any(re.search(p, prefix) for p in patterns):
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

    from .quantization import _tensor_backend

    layers = []
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, torch.nn.Linear) and weight is not None and _tensor_backend(weight) is None \
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


def planned_tensor_bytes(module, options: dict) -> dict[int, int]:
    """{id(tensor): bytes} for the tensors the options change, as they will be stored afterwards."""
    sizes = {}
    storage = options.get("storage_dtype")
    if storage:
        per_element = DTYPE_BYTES[storage]
        for _, layer in castable_layers(module):
            for tensor in (*layer.parameters(), *layer.buffers()):
                if tensor.is_floating_point():
                    sizes[id(tensor)] = tensor.numel() * per_element
    elif options.get("quantize"):
        for _, layer in quantizable_layers(module):
            sizes[id(layer.weight)] = _int8_bytes(layer.weight, options.get("quantize_with"))
    return sizes


# Devices a backend's int8 weight-only layers do not run on, with the reason.
_NOT_ON_DEVICE = {
    ("quanto", "mps"): "quanto's int8 matmul (`qbytes_mm`) has no MPS kernel and falls back to the CPU in the middle "
                       "of the graph (reported in deepbeepmeep/Wan2GP#1777)",
}


def quantize_backend(choice: str, strategy: str, *, installed: bool = True,
                     device_type: str | None = None) -> tuple[str | None, str | None]:
    """(backend, None) for `quantize_with: choice` under `strategy` on `device_type`, or (None, why not).

    `auto` takes torchao, else optimum-quanto: the first that is installed, runs on the device and
    that the strategy can run with. `installed=False` (validating or planning without a loaded
    pipeline) does not look for the packages: they are needed where the policy is applied.
    """
    from .compatibility import limit_for

    candidates = ("torchao", "quanto") if choice == "auto" else (choice,)
    reasons = []
    for backend in candidates:
        if installed and not _installed(backend):
            reasons.append(f"{_PACKAGES[backend]} is not installed (pip install {_PACKAGES[backend]})")
            continue
        if (backend, device_type) in _NOT_ON_DEVICE:
            reasons.append(f"{backend} does not run on {device_type}: {_NOT_ON_DEVICE[(backend, device_type)]}")
            continue
        limit = limit_for(backend, strategy, {})
        if limit is not None:
            reasons.append(f"{backend} cannot run with {strategy!r}: {limit.reason}")
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


def apply_precision(name: str, module, options: dict) -> None:
    """Make the precision change `options` asks for, unless the component already has it."""
    from .quantization import detect

    backend = options.get("quantize_with")  # resolved by the plan: torchao or quanto
    found = detect(module)
    storage = options.get("storage_dtype")
    if storage:
        if found is not None and found.backend == "layerwise_casting":
            if found.detail != f"stored as {storage}":
                raise PipelineError(f"{name!r} is already {found.label}; the policy asks for storage_dtype "
                                    f"{storage}. Reload the component to store it differently")
            return
        _cast_layers(module, storage, options.get("compute_dtype"))
    elif options.get("quantize"):
        if found is not None and produced_by(options, found.backend, found.detail):
            return  # quantized by an earlier apply of this policy (remove() keeps it)
        if found is not None:
            raise PipelineError(f"{name!r} is already {found.label}; `quantize` applies to float weights. Remove "
                                "`quantize` from its rule")
        layers = quantizable_layers(module)
        if not layers:
            raise PipelineError(f"{name!r} has no Linear layer with float weights to quantize. Remove `quantize` "
                                "from its rule")
        if backend == "torchao":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            chosen = {id(layer) for _, layer in layers}
            quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
        else:
            from optimum.quanto import freeze, qint8, quantize

            quantize(module, weights=qint8, include=[n for n, _ in layers])
            freeze(module)


def _cast_layers(module, storage: str, compute: str | None) -> None:
    import torch
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    if compute is None:
        compute_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    else:
        compute_dtype = getattr(torch, compute)
    for _, layer in castable_layers(module):
        apply_layerwise_casting_hook(layer, getattr(torch, storage), compute_dtype, non_blocking=False)
    try:  # as apply_layerwise_casting does: peft layers must not cast their inputs to the storage dtype
        from diffusers.hooks.layerwise_casting import _disable_peft_input_autocast
    except ImportError:
        return
    _disable_peft_input_autocast(module)
