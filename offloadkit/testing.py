"""Tiny, real diffusers pipelines for tests, demos and CI.

Every builder here returns a genuine diffusers pipeline (the same classes a
user loads from the hub), but with models so small that a full denoising call
takes well under a second on a laptop CPU. Nothing is downloaded: the weights
are random and seeded, and the CLIP tokenizer is built from a vocab.json and
merges.txt that this module writes itself into the temp directory.

The same ``seed`` always gives the same weights, and :func:`tiny_call_kwargs`
gives a seeded generator, so two calls give bit-identical images. That makes
the pipelines useful to check that an offloading policy does not change
results::

    import numpy as np
    import pytest
    from offloadkit.testing import TINY_PIPELINES, tiny_call_kwargs, tiny_pipeline

    @pytest.mark.parametrize("name", TINY_PIPELINES)
    def test_policy_keeps_images(name):
        reference = tiny_pipeline(name)
        expected = reference(**tiny_call_kwargs(reference)).images

        pipe = tiny_pipeline(name)          # same seed -> same weights
        apply_my_policy(pipe)               # e.g. pipe.enable_model_cpu_offload(device="cpu")
        images = pipe(**tiny_call_kwargs(pipe)).images

        np.testing.assert_array_equal(images, expected)

Notes:

* ``tiny_sd3_pipeline()`` leaves ``text_encoder_3``/``tokenizer_3`` (T5) as
  ``None``; diffusers then feeds zeros in place of the T5 embeddings, so a plain
  ``pipe(prompt=...)`` works. Pass ``with_t5=True`` to get a tiny
  ``T5EncoderModel`` too (its tokenizer is also built offline).
* The VAE is only used through ``vae.decode`` (never ``vae.forward``); diffusers
  routes accelerate hooks to it with its ``apply_forward_hook`` decorator.
* Tokenizers and schedulers are pipeline components that are not
  ``torch.nn.Module`` instances.
* ``tiny_wan_pipeline()`` (text-to-video) is not in ``TINY_PIPELINES``: its
  output is ``.frames``, not ``.images``, which code written for the image
  pipelines above does not expect. ``tiny_call_kwargs`` handles it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .tiny_parts import (_CALL_PROMPT, _IMAGE_SIZE, _LATENT_CHANNELS, _MAX_TOKENS, _clip_text_encoder, _clip_tokenizer,
                         _controlnet_from, _finish, _qwen_tokenizer, _qwen_vl_token_ids, _ready, _sd_scheduler,
                         _seeded, _t5_tokenizer, _tiny_t5, _unet, _vae)

__all__ = [
    "ARCHITECTURE_ALIASES",
    "TINY_PIPELINES",
    "tiny_call_kwargs",
    "tiny_controlnet_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_wan_pipeline",
]

TINY_PIPELINES = ("sd", "sdxl", "sd3", "controlnet", "flux", "qwen-image", "flux-kontext")

# --------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------


def tiny_sd_pipeline(*, seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (UNet, VAE, one CLIP text encoder)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=32, with_projection=False)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=_unet(seed, cross_attention_dim=32),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(*, seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` with two CLIP text encoders."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=16, with_projection=False)
    # Offset seed: two same-shaped encoders with equal weights would hide a
    # policy that mixes them up.
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed + 1, hidden_size=16, with_projection=True)

    # SDXL conditions the UNet on the concatenated hidden states of both
    # encoders, and adds an embedding of the pooled text (from encoder 2) plus
    # six size/crop numbers, each given `addition_time_embed_dim` features.
    time_embed_dim = 8
    unet = _unet(
        seed,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim
        + text_encoder_2.config.projection_dim,
        transformer_layers_per_block=(1, 1),
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        # Not EulerDiscreteScheduler (SDXL's usual one): its set_timesteps calls
        # np.array on a tensor, which emits a DeprecationWarning with numpy 2.x
        # and would fail test suites that turn warnings into errors.
        scheduler=_sd_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,  # needs the optional invisible-watermark package
    )
    return _finish(pipe)


def tiny_sd3_pipeline(*, seed: int = 0, with_t5: bool = False):
    """A tiny ``StableDiffusion3Pipeline`` (MMDiT transformer, flow matching).

    By default there is no T5 encoder (``text_encoder_3=None``); diffusers then
    uses zeros for the T5 part of the prompt embeddings. ``with_t5=True`` adds a
    tiny ``T5EncoderModel`` and an offline-built T5 tokenizer.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=16, with_projection=True)
    # Offset seed: two same-shaped encoders with equal weights would hide a
    # policy that mixes them up.
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed + 1, hidden_size=16, with_projection=True)

    # SD3 zero-pads the concatenated CLIP hidden states up to the T5 width
    # (joint_attention_dim); a narrower joint dim would silently crop them.
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    joint_attention_dim = clip_width

    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        from transformers import T5Config, T5EncoderModel

        tokenizer_3 = _t5_tokenizer()
        t5_config = T5Config(
            vocab_size=len(tokenizer_3),
            d_model=joint_attention_dim,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
        )
        with _seeded(seed + 2):
            text_encoder_3 = _ready(T5EncoderModel(t5_config))

    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=_IMAGE_SIZE // 2,  # latent pixels
            patch_size=2,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=32,
            # The pooled input is both CLIP projections side by side.
            pooled_projection_dim=text_encoder.config.projection_dim
            + text_encoder_2.config.projection_dim,
            pos_embed_max_size=_IMAGE_SIZE // 2,
        )
    transformer = _ready(transformer)
    # SD3's VAE has no quant convs and a shift factor the pipeline relies on.
    vae = _vae(
        seed,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


def tiny_controlnet_pipeline(*, seed: int = 0):
    """A tiny ``StableDiffusionControlNetPipeline``; the ControlNet mirrors the UNet."""
    from diffusers import StableDiffusionControlNetPipeline

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=32, with_projection=False)
    unet = _unet(seed, cross_attention_dim=32)
    pipe = StableDiffusionControlNetPipeline(
        vae=_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=_controlnet_from(unet, seed),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_flux_pipeline(*, seed: int = 0):
    """A tiny ``FluxPipeline``: CLIP and T5 text encoders, a transformer of 2 double- and 4 single-stream blocks."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=16, with_projection=False)
    tokenizer_2 = _t5_tokenizer()
    text_encoder_2 = _tiny_t5(T5Config, T5EncoderModel, tokenizer_2, seed + 2)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=_LATENT_CHANNELS * 4,  # latents are packed 2x2
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,  # as FLUX.1-dev
            axes_dims_rope=(2, 2, 4),
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=_ready(transformer),
    )
    return _finish(pipe)


def tiny_qwen_image_pipeline(*, seed: int = 0):
    """A tiny ``QwenImagePipeline``: a 2-layer Qwen2.5-VL text encoder, a 2-block transformer, Wan-style VAE."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    ids = _qwen_vl_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": 32, "fullatt_block_indexes": [0]}, **ids)
    with _seeded(seed + 1):
        text_encoder = _ready(Qwen2_5_VLForConditionalGeneration(config))
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=_LATENT_CHANNELS * 4, out_channels=_LATENT_CHANNELS, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    with _seeded(seed + 2):
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * _LATENT_CHANNELS,
                                     latents_std=[1.0] * _LATENT_CHANNELS)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_ready(vae),
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=_ready(transformer))
    return _finish(pipe)


def tiny_flux_kontext_pipeline(*, seed: int = 0):
    """A tiny ``FluxKontextPipeline`` (image editing): the tiny Flux pipeline's models; its VAE also encodes the
    input image."""
    from diffusers import FluxKontextPipeline

    return _finish(FluxKontextPipeline(**tiny_flux_pipeline(seed=seed).components))


def tiny_wan_pipeline(*, seed: int = 0):
    """A tiny ``WanPipeline`` (text-to-video): a 2-layer UMT5 text encoder, a 2-block transformer and a Wan VAE
    that halves height, width and frames once. Its output is ``.frames``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    text_encoder = _tiny_t5(UMT5Config, UMT5EncoderModel, tokenizer, seed + 1)
    with _seeded(seed):
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
            rope_max_seq_len=32)
    with _seeded(seed + 2):
        vae = AutoencoderKLWan(base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                               temperal_downsample=[True], latents_mean=[0.0] * _LATENT_CHANNELS,
                               latents_std=[1.0] * _LATENT_CHANNELS, scale_factor_temporal=2,
                               scale_factor_spatial=2)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_ready(vae),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=_ready(transformer))
    return _finish(pipe)


_BUILDERS: dict[str, Callable[..., Any]] = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline,
    "controlnet": tiny_controlnet_pipeline,
    "flux": tiny_flux_pipeline,
    "qwen-image": tiny_qwen_image_pipeline,
    "flux-kontext": tiny_flux_kontext_pipeline,
}


# Tiny pipelines are named by family; the built-in architectures (`offloadkit list`) by model. A model's
# name gives its family's tiny pipeline, so one name works in both places.
ARCHITECTURE_ALIASES = {
    "sd15": "sd",
    "sd35-medium": "sd3",
    "sd35-large": "sd3",
    "flux1-dev": "flux",
    "flux1-schnell": "flux",
    "flux1-kontext-dev": "flux-kontext",
}


def tiny_pipeline(name: str, *, seed: int = 0):
    """Build the tiny pipeline called ``name``: one of :data:`TINY_PIPELINES`, or an architecture's name
    (``sd15``, ``flux1-dev``, ... in :data:`ARCHITECTURE_ALIASES`) for its family's tiny pipeline."""
    try:
        builder = _BUILDERS[ARCHITECTURE_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        from .errors import did_you_mean

        raise ValueError(f"Unknown tiny pipeline {name!r}. "
                         + did_you_mean(str(name), [*TINY_PIPELINES, *ARCHITECTURE_ALIASES], "names")) from None
    return builder(seed=seed)


def tiny_call_kwargs(pipe, seed: int = 0) -> dict[str, Any]:
    """Arguments for a quick, deterministic call: ``pipe(**tiny_call_kwargs(pipe))``.

    Each call returns a fresh, freshly seeded generator, so the same kwargs
    recipe can be used for a reference run and a run under test.
    """
    from diffusers import FluxKontextPipeline, FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline, \
        StableDiffusionControlNetPipeline, WanPipeline

    kwargs: dict[str, Any] = {
        "prompt": _CALL_PROMPT,
        "num_inference_steps": 2,
        "height": _IMAGE_SIZE,
        "width": _IMAGE_SIZE,
        # Above 1 so classifier-free guidance (and negative-prompt encoding)
        # runs too, as it does in real use.
        "guidance_scale": 5.0,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "np",
    }
    if isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline, FluxKontextPipeline)):
        # Length of the T5 part of the sequence (zeros without T5); the default
        # 256 only slows the tiny transformer down.
        kwargs["max_sequence_length"] = _MAX_TOKENS
    if isinstance(pipe, (FluxPipeline, FluxKontextPipeline)):
        kwargs["guidance_scale"] = 3.5  # FLUX.1-dev's distilled guidance: an input of the transformer, no CFG
    if isinstance(pipe, FluxKontextPipeline):
        # the image to edit, kept at its size (Kontext would resize it to about 1024 px)
        kwargs["image"] = torch.rand((1, 3, _IMAGE_SIZE, _IMAGE_SIZE), generator=torch.Generator("cpu").manual_seed(seed))
        kwargs["_auto_resize"] = False
        kwargs["max_area"] = _IMAGE_SIZE**2  # else the output is scaled up to about 1024 x 1024
    if isinstance(pipe, QwenImagePipeline):
        # no negative prompt: its "true CFG" is off, as in a call that passes none (no second forward)
        del kwargs["guidance_scale"]
        kwargs["true_cfg_scale"] = 1.0
    if isinstance(pipe, WanPipeline):
        # 3 frames: the VAE halves time causally (1 + 2k frames), to 2 latent frames
        kwargs["num_frames"] = 3
        kwargs["max_sequence_length"] = _MAX_TOKENS
    if isinstance(pipe, StableDiffusionControlNetPipeline):
        # Control images are RGB in [0, 1] at the output pixel size.
        control_generator = torch.Generator("cpu").manual_seed(seed)
        kwargs["image"] = torch.rand(
            (1, 3, _IMAGE_SIZE, _IMAGE_SIZE), generator=control_generator
        )
    return kwargs


# The builders of other families live in modules of their own, built from the same parts.
from . import tiny_exotic, tiny_multistage  # noqa: E402
from .tiny_exotic import *  # noqa: E402,F401,F403  (models that read weights outside forward)
from .tiny_multistage import *  # noqa: E402,F401,F403  (priors, combined pipelines, AudioLDM2)

__all__ += [*tiny_exotic.__all__, *tiny_multistage.__all__]
