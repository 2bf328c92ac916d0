"""The quantization backends a policy's `quantization` section has a key for, with how plans name them.

Detecting which backend a loaded component uses is the plans floor's job
(`offloadkit.plans.quantization`); this is only the vocabulary.
"""

from __future__ import annotations

BACKENDS = {
    "bnb_8bit": "bitsandbytes 8-bit",
    "bnb_4bit": "bitsandbytes 4-bit",
    "torchao": "torchao",
    "quanto": "optimum-quanto",
    "gguf": "GGUF",
    "layerwise_casting": "layerwise casting",
    "other": "quantized",
}
