"""The stages of a pipeline call, and which stage each component's work belongs to: the one vocabulary.

The trace labels moves with it, the schedule orders a call's forwards by it and the
working-memory estimate picks its formula by it. A component's class decides first
(UNet, transformer, DiT, prior and ControlNet classes denoise; autoencoders, VQ models
and vocoders decode), its name second (text and image encoders encode; `vae`, `movq`,
`vqgan`, `vocoder` and `decoder` decode); anything else denoises. By class, Stable
Cascade's and Wuerstchen's `decoder` (a UNet) denoises, and their `vqgan` decodes.

Example::

    stage_of("decoder", "StableCascadeUNet")   # 'denoise'
    stage_of("vqgan", "PaellaVQModel")         # 'decode'
    stage_of("text_encoder_2")                 # 'encode'
"""

from __future__ import annotations

ENCODE, DENOISE, DECODE = STAGES = ("encode", "denoise", "decode")

# Parts of class names (case-sensitive, as the classes spell them), checked decode first:
# `AutoencoderKLTemporalDecoder` and `ConsistencyDecoderVAE` decode although they say "Decoder".
_DECODE_CLASSES = ("Autoencoder", "VQModel", "VAE", "Vocoder", "HifiGan")
_DENOISE_CLASSES = ("UNet", "Transformer", "DiT", "Prior", "DiffNeXt", "ControlNet")
# Parts of component names, by the names diffusers pipelines use.
_ENCODE_NAMES = ("text_encoder", "image_encoder", "tokenizer", "feature_extractor", "language_model",
                 "projection_model")
_DECODE_NAMES = ("vae", "movq", "vqgan", "vocoder", "decoder")


def stage_of(component: str, class_name: str | None = None) -> str:
    """The stage of a component's forward: by its class (`type_name`, may be `A | B`) when known, else its name."""
    if class_name:
        if any(marker in class_name for marker in _DECODE_CLASSES):
            return DECODE
        if any(marker in class_name for marker in _DENOISE_CLASSES):
            return DENOISE
    if any(marker in component for marker in _ENCODE_NAMES):
        return ENCODE
    if any(marker in component for marker in _DECODE_NAMES):
        return DECODE
    return DENOISE


def strictly_between(first: str, middle: str, last: str) -> bool:
    """Whether stage `middle` comes after `first` and before `last` (False when one is not a stage)."""
    if not {first, middle, last} <= set(STAGES):
        return False
    return STAGES.index(first) < STAGES.index(middle) < STAGES.index(last)
