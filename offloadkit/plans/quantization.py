"""Which quantization backend a loaded component uses, found from its tensors or its loader's attributes.

Tensor classes are looked up by name and module, so detecting a backend never
imports it. The attributes diffusers' and transformers' loaders set
(`quantization_method`, `hf_quantizer`, `is_loaded_in_8bit`, ...) are the second
source: they are all there is for a component still on `meta`, and they name
backends offloadkit has no rule of its own for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy.backends import BACKENDS
from ..units import torch_dtype_name

@dataclass(frozen=True)
class Quantization:
    """A component's quantization: the backend key (see BACKENDS) and what was seen."""

    backend: str
    detail: str = ""  # e.g. "Int8Tensor", "Q8_0", "stored as float8_e4m3fn"
    found_by: str = "tensors"  # "tensors" or "attributes"

    @property
    def label(self) -> str:
        text = BACKENDS[self.backend]
        return f"{text} ({self.detail})" if self.detail else text


def tensor_backend(tensor) -> tuple[str, str] | None:
    cls = type(tensor)
    module, name = cls.__module__, cls.__name__
    if module.startswith("bitsandbytes"):
        if name == "Int8Params":
            return "bnb_8bit", ""
        if name == "Params4bit":
            return "bnb_4bit", str(getattr(tensor, "quant_type", "") or "")
    if module.startswith("torchao"):
        return "torchao", name
    if module.startswith("optimum.quanto"):
        qtype = getattr(getattr(tensor, "qtype", None), "name", None)
        return "quanto", str(qtype or name)
    if name == "GGUFParameter":
        kind = getattr(tensor, "quant_type", None)
        return "gguf", str(getattr(kind, "name", kind) or "")
    return None


def _layerwise_storage(module) -> str | None:
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        get_hook = getattr(registry, "get_hook", None)
        hook = get_hook("layerwise_casting") if get_hook is not None else None
        if hook is not None:
            return torch_dtype_name(hook.storage_dtype)
    return None


def _attribute_backend(module) -> str | None:
    method = getattr(module, "quantization_method", None)
    if method is None:
        config = getattr(getattr(module, "hf_quantizer", None), "quantization_config", None)
        method = getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        quantized = getattr(module, "hf_quantizer", None) is not None or getattr(module, "is_quantized", False)
        return "other" if quantized else None
    method = str(method).lower()
    if method == "bitsandbytes":
        if getattr(module, "is_loaded_in_8bit", False):
            return "bnb_8bit"
        if getattr(module, "is_loaded_in_4bit", False):
            return "bnb_4bit"
        return "other"
    if "quanto" in method:
        return "quanto"
    return method if method in ("torchao", "gguf") else "other"


def detect(module) -> Quantization | None:
    """The quantization of a component, or None for plain weights."""
    for tensor in (*module.parameters(), *module.buffers()):
        found = tensor_backend(tensor)
        if found is not None:
            return Quantization(*found)
    by_attributes = _attribute_backend(module)
    if by_attributes is not None:
        method = getattr(module, "quantization_method", None)
        detail = "" if by_attributes != "other" else str(getattr(method, "value", method) or "")
        return Quantization(by_attributes, detail, found_by="attributes")
    storage = _layerwise_storage(module)
    if storage is not None:
        return Quantization("layerwise_casting", f"stored as {storage}")
    return None
