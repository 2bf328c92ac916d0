"""Which strategies cannot run on which quantized weights, with the reason and what to use instead.

Checked when a policy is resolved against a pipeline, so the refusal comes
before anything is installed, not from inside a forward pass.
"""

from __future__ import annotations

# (strategy, quantization) -> (why it fails, what to use instead). Quantization is a rule kind
# ("bnb_8bit", "bnb_4bit") or a backend name ("quanto", "torchao", "gguf").
INCOMPATIBLE = {
    ("sequential", "bnb_4bit"): ("Accelerate's per-layer streaming cannot rebuild bitsandbytes 4-bit weights "
                                 "from its host copy", "'model' or 'group'"),
    ("sequential", "bnb_8bit"): ("Accelerate's per-layer streaming cannot rebuild bitsandbytes 8-bit weights "
                                 "from its host copy", "'model', or keep it on the device"),
    ("disk", "bnb_4bit"): ("bitsandbytes 4-bit weights cannot be stored and rebuilt from a safetensors file "
                           "per layer", "'model' or 'group'"),
    ("disk", "bnb_8bit"): ("bitsandbytes 8-bit weights cannot be stored and rebuilt from a safetensors file "
                           "per layer", "'model', or keep it on the device"),
    ("sequential", "quanto"): ("quanto's tensor subclasses do not survive Accelerate's meta-device swaps",
                               "'model'"),
    ("disk", "quanto"): ("quanto's tensor subclasses cannot be written to safetensors and rebuilt per layer",
                         "'model'"),
    ("group", "quanto"): ("diffusers' group offloading swaps `param.data`, which breaks quanto's tensor "
                          "subclasses (device mismatches)", "'model'"),
    ("disk", "torchao"): ("torchao tensor subclasses cannot be written to safetensors and rebuilt per layer",
                          "'model' or 'group'"),
}


def incompatibility(strategy: str, quantization: str | None, backend: str | None) -> tuple[str, str] | None:
    for key in (quantization, backend):
        if key is not None and (strategy, key) in INCOMPATIBLE:
            return INCOMPATIBLE[(strategy, key)]
    return None
