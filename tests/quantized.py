"""Tiny components really quantized with each backend that runs on the CPU (for the quantization tests).

bitsandbytes and GGUF layers are put in place the way their diffusers loaders do
(their `from_pretrained` paths need a GPU or a checkpoint file); torchao, quanto and
layerwise casting use the libraries' own entry points.
"""

import warnings

import pytest
import torch

REAL_BACKENDS = ("torchao", "quanto", "bnb_8bit", "bnb_4bit", "gguf", "layerwise_casting")
_MODULES = {"torchao": "torchao", "quanto": "optimum.quanto", "bnb_8bit": "bitsandbytes",
            "bnb_4bit": "bitsandbytes", "gguf": "gguf", "layerwise_casting": "diffusers"}


def needs(backend):
    """Skip the test when the backend's package is missing (they are in the `test` extra)."""
    module = _MODULES[backend]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip(module)


def _linear_children(module):
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                yield parent, name, child


def quantize(module, backend, linear_only=False, device="cpu"):
    """Quantize `module`'s layers (quanto: Linear and Conv unless `linear_only`; the others: Linear) in place,
    or cast them, for layerwise casting. `device`: where bitsandbytes quantizes its layers (and leaves them),
    as a loader's `device_map` does; the other backends quantize where the module is."""
    needs(backend)
    if backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(module, Int8WeightOnlyConfig())
    elif backend == "quanto":
        from optimum.quanto import freeze, qint8
        from optimum.quanto import quantize as quanto_quantize

        linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)] if linear_only else None
        quanto_quantize(module, weights=qint8, include=linears)
        freeze(module)
    elif backend in ("bnb_8bit", "bnb_4bit"):
        import bitsandbytes as bnb

        for parent, name, linear in _linear_children(module):
            if backend == "bnb_8bit":
                layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                            has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                                 has_fp16_weights=False)
            else:
                layer = bnb.nn.LinearNF4(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         compute_dtype=torch.float32)
                layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
            setattr(parent, name, layer.to(device))  # bitsandbytes quantizes when the layer is moved
    elif backend == "gguf":
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        kind = gguf.GGMLQuantizationType.Q8_0
        block, _ = gguf.GGML_QUANT_SIZES[kind]
        for parent, name, linear in _linear_children(module):
            if linear.in_features % block:
                continue
            packed = gguf.quants.quantize(linear.weight.detach().float().numpy(), kind)
            layer = GGUFLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               compute_dtype=torch.float32)
            layer.weight = GGUFParameter(torch.from_numpy(packed), quant_type=kind)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
            setattr(parent, name, layer)
    elif backend == "layerwise_casting":
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:
        raise ValueError(backend)
    return module


def mark(module, backend):
    """Set only the attributes the backend's loader sets (the detection path, without quantized tensors)."""
    if backend in ("bnb_4bit", "bnb_8bit"):
        module.quantization_method = "bitsandbytes"
        setattr(module, f"is_loaded_in_{backend[4:]}", True)
    elif backend == "other":
        module.quantization_method = "modelopt"
    else:
        module.quantization_method = backend
    return module
