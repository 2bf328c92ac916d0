"""Tiny, real multi-stage diffusers pipelines: Kandinsky priors and combined pipelines, AudioLDM2, Stable Cascade.

These are the pipelines whose own `enable_model_cpu_offload` is not the plain one over
`model_cpu_offload_seq` (an exclusion inside the sequence, an override calling sub-pipelines, an
explicit list with submodules). Built like `offloadkit.testing`'s: random seeded weights, tokenizers
written offline, a call in well under a second; the same `seed` gives the same weights.
`tiny_multistage_call_kwargs(pipe)` gives a quick, seeded call for each.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .tiny_parts import _MAX_TOKENS, _byte_to_unicode, _clip_text_encoder, _clip_tokenizer, _finish, _ready, _seeded, \
    _t5_tokenizer, _tokenizer_folder

__all__ = [
    "tiny_audioldm2_pipeline",
    "tiny_kandinsky_combined_pipeline",
    "tiny_kandinsky_prior_pipeline",
    "tiny_kandinsky_v22_combined_pipeline",
    "tiny_kandinsky_v22_prior_pipeline",
    "tiny_multistage_call_kwargs",
    "tiny_stable_cascade_combined_pipeline",
]

_EMBED = 32  # CLIP width, image-embedding width and the decoders' cross-attention width
_IMAGE = 32  # pixels; the two-level MoVQ halves it once
_PROMPT = "a lighthouse at dusk"


# --------------------------------------------------------------------------
# Kandinsky
# --------------------------------------------------------------------------


def _prior_components(seed: int) -> dict:
    """The components of a Kandinsky 2.1 / 2.2 prior pipeline (the same classes in both)."""
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=_EMBED, with_projection=True)
    with _seeded(seed + 1):
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=_EMBED, projection_dim=_EMBED, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, image_size=28, patch_size=14))
    with _seeded(seed + 2):
        # num_embeddings: the text encoder's hidden states are as long as the tokenizer's max length
        prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=_EMBED, num_layers=1,
                                 num_embeddings=_MAX_TOKENS)
    # a zero clip_std would make every embedding zero, and any offload would look right
    prior.clip_std = torch.nn.Parameter(torch.ones_like(prior.clip_std))
    return {
        "prior": _ready(prior),
        "image_encoder": _ready(image_encoder),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                     num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0),
        "image_processor": CLIPImageProcessor(crop_size=28, size=28, do_center_crop=True, do_normalize=True,
                                              do_resize=True, resample=3),
    }


def tiny_kandinsky_prior_pipeline(*, seed: int = 0):
    """A tiny ``KandinskyPriorPipeline`` (Kandinsky 2.1): CLIP text and image encoders, a 1-layer prior.

    diffusers chains ``text_encoder -> prior`` although ``prior`` is in ``_exclude_from_cpu_offload``.
    """
    from diffusers import KandinskyPriorPipeline

    return _finish(KandinskyPriorPipeline(**_prior_components(seed)))


def tiny_kandinsky_v22_prior_pipeline(*, seed: int = 0, emb2emb: bool = False):
    """A tiny ``KandinskyV22PriorPipeline``, or with ``emb2emb=True`` a ``KandinskyV22PriorEmb2EmbPipeline``.

    diffusers chains ``text_encoder -> image_encoder -> prior`` although ``prior`` is excluded.
    """
    from diffusers import KandinskyV22PriorEmb2EmbPipeline, KandinskyV22PriorPipeline

    cls = KandinskyV22PriorEmb2EmbPipeline if emb2emb else KandinskyV22PriorPipeline
    return _finish(cls(**_prior_components(seed)))


def _movq(seed: int):
    from diffusers import VQModel

    with _seeded(seed + 3):
        # 32 channels at the least: the spatial norm has 32 groups
        movq = VQModel(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                       up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], in_channels=3, out_channels=3,
                       latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                       num_vq_embeddings=12, vq_embed_dim=4)
    return _ready(movq)


def _kandinsky_unet(seed: int, in_channels: int, **conditioning):
    from diffusers import UNet2DConditionModel

    with _seeded(seed + 4):
        unet = UNet2DConditionModel(
            in_channels=in_channels, out_channels=8,  # mean and variance
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
            encoder_hid_dim=_EMBED, cross_attention_dim=_EMBED, **conditioning)
    return _ready(unet)


def _decoder_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _combined(prior: dict, decoder: dict) -> dict:
    return {**decoder, **{f"prior_{name}": value for name, value in prior.items()}}


def tiny_kandinsky_v22_combined_pipeline(*, seed: int = 0, task: str = "text2img"):
    """A tiny Kandinsky 2.2 combined pipeline: ``task`` ``"text2img"`` (``KandinskyV22CombinedPipeline``),
    ``"img2img"`` (``KandinskyV22Img2ImgCombinedPipeline``) or ``"inpaint"``
    (``KandinskyV22InpaintCombinedPipeline``).

    The img2img one overrides ``enable_model_cpu_offload``: one chain per sub-pipeline (prior, decoder).
    """
    import diffusers

    classes = {"text2img": "KandinskyV22CombinedPipeline", "img2img": "KandinskyV22Img2ImgCombinedPipeline",
               "inpaint": "KandinskyV22InpaintCombinedPipeline"}
    if task not in classes:
        raise ValueError(f"Unknown task {task!r}; valid tasks are {', '.join(map(repr, classes))}.")
    # the inpainting UNet also reads the mask and the masked image's latents
    unet = _kandinsky_unet(seed, 9 if task == "inpaint" else 4, addition_embed_type="image",
                           encoder_hid_dim_type="image_proj")
    decoder = {"unet": unet, "scheduler": _decoder_scheduler(), "movq": _movq(seed)}
    return _finish(getattr(diffusers, classes[task])(**_combined(_prior_components(seed), decoder)))


def tiny_kandinsky_combined_pipeline(*, seed: int = 0, task: str = "text2img"):
    """A tiny Kandinsky 2.1 combined pipeline: ``task`` ``"text2img"`` (``KandinskyCombinedPipeline``),
    ``"img2img"`` or ``"inpaint"``. Its decoder has a tiny multilingual CLIP text encoder (XLM-R).

    diffusers chains ``prior_prior`` although it is excluded (it is in the sequence).
    """
    import diffusers
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    classes = {"text2img": "KandinskyCombinedPipeline", "img2img": "KandinskyImg2ImgCombinedPipeline",
               "inpaint": "KandinskyInpaintCombinedPipeline"}
    if task not in classes:
        raise ValueError(f"Unknown task {task!r}; valid tasks are {', '.join(map(repr, classes))}.")
    tokenizer = _clip_tokenizer()  # any tokenizer will do for the tiny XLM-R; the pipeline pads to 77
    config = MCLIPConfig(transformerDimSize=_EMBED, imageDimSize=_EMBED, hidden_size=_EMBED, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                         # XLM-R numbers positions from the pad id on, and the pipeline pads to 77 tokens
                         max_position_embeddings=tokenizer.pad_token_id + 80,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with _seeded(seed + 5):
        text_encoder = _ready(MultilingualCLIP(config))
    unet = _kandinsky_unet(seed, 9 if task == "inpaint" else 4, addition_embed_type="text_image",
                           encoder_hid_dim_type="text_image_proj")
    decoder = {"text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": _decoder_scheduler(),
               "movq": _movq(seed)}
    return _finish(getattr(diffusers, classes[task])(**_combined(_prior_components(seed), decoder)))


# --------------------------------------------------------------------------
# Stable Cascade
# --------------------------------------------------------------------------


def tiny_stable_cascade_combined_pipeline(*, seed: int = 0):
    """A tiny ``StableCascadeCombinedPipeline`` (no image encoder): prior and decoder ``StableCascadeUNet``s,
    a Paella VQ-GAN, CLIP text encoders.

    It overrides ``enable_model_cpu_offload`` and declares no sequence: diffusers chains each sub-pipeline,
    ``prior_text_encoder -> prior_prior`` then ``text_encoder -> decoder -> vqgan``.
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    tokenizer = _clip_tokenizer()
    prior_tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed, hidden_size=_EMBED, with_projection=True)
    prior_text_encoder = _clip_text_encoder(prior_tokenizer, seed + 1, hidden_size=_EMBED, with_projection=True)
    with _seeded(seed + 2):
        prior = StableCascadeUNet(
            conditioning_dim=32, block_out_channels=(32, 32), num_attention_heads=(2, 2),
            down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_image_in_channels=32,
            switch_level=(False,), clip_text_in_channels=_EMBED, clip_text_pooled_in_channels=_EMBED)
    with _seeded(seed + 3):
        decoder = StableCascadeUNet(
            in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(8, 16, 32, 32),
            num_attention_heads=(-1, -1, 1, 2), down_num_layers_per_block=(1, 1, 1, 1),
            up_num_layers_per_block=(1, 1, 1, 1), down_blocks_repeat_mappers=(1, 1, 1, 1),
            up_blocks_repeat_mappers=(1, 1, 1, 1),
            block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                                   ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                                   ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
                                   ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
            switch_level=None, clip_text_pooled_in_channels=_EMBED, dropout=(0.0, 0.0, 0.0, 0.0))
    with _seeded(seed + 4):
        vqgan = PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2)
    pipe = StableCascadeCombinedPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, decoder=_ready(decoder),
        scheduler=DDPMWuerstchenScheduler(), vqgan=_ready(vqgan), prior_prior=_ready(prior),
        prior_text_encoder=prior_text_encoder, prior_tokenizer=prior_tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(), prior_feature_extractor=None, prior_image_encoder=None)
    return _finish(pipe)


# --------------------------------------------------------------------------
# AudioLDM2
# --------------------------------------------------------------------------


def _roberta_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) with RoBERTa's specials, for CLAP."""
    from transformers import RobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    symbols = list(_byte_to_unicode().values())
    folder = _tokenizer_folder("roberta", {
        "vocab.json": json.dumps({token: i for i, token in enumerate(specials + symbols)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n",
        "tokenizer_config.json": json.dumps({"model_max_length": _MAX_TOKENS}),
    })
    return RobertaTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_audioldm2_pipeline(*, seed: int = 0):
    """A tiny ``AudioLDM2Pipeline``: CLAP, T5, a 1-layer GPT-2, the projection model, UNet, VAE, HiFi-GAN vocoder.

    It overrides ``enable_model_cpu_offload`` with an explicit list, starting with the CLAP text model and
    projection (submodules of ``text_encoder``) and ending with the whole ``text_encoder``.
    """
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL, \
        DDIMScheduler
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel, \
        SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel

    tokenizer = _roberta_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with _seeded(seed):
        unet = AudioLDM2UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16))
    with _seeded(seed + 1):
        vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=1, out_channels=1, norm_num_groups=8,
                            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
    text_config = {"hidden_size": 8, "intermediate_size": 37, "num_attention_heads": 1, "num_hidden_layers": 1,
                   "vocab_size": len(tokenizer), "projection_dim": 8, "max_position_embeddings": _MAX_TOKENS + 2,
                   "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
    audio_config = {"spec_size": 8, "window_size": 4, "num_mel_bins": 8, "intermediate_size": 37, "depths": [1, 1],
                    "num_attention_heads": [1, 1], "num_hidden_layers": 1, "hidden_size": 192, "projection_dim": 8,
                    "patch_size": 2, "patch_stride": 2, "patch_embed_input_channels": 4}
    with _seeded(seed + 2):
        text_encoder = ClapModel(ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=16))
    with _seeded(seed + 3):
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8,
                                                 num_heads=1, num_layers=1, pad_token_id=tokenizer_2.pad_token_id,
                                                 eos_token_id=tokenizer_2.eos_token_id))
    with _seeded(seed + 4):
        language_model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=1, n_layer=1, vocab_size=64, n_ctx=99,
                                                    n_positions=99))
    language_model.config.max_new_tokens = 4
    with _seeded(seed + 5):
        projection_model = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16)
    with _seeded(seed + 6):
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
            normalize_before=False))
    pipe = AudioLDM2Pipeline(
        vae=_ready(vae), text_encoder=_ready(text_encoder), text_encoder_2=_ready(text_encoder_2),
        projection_model=_ready(projection_model), language_model=_ready(language_model), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, feature_extractor=ClapFeatureExtractor(), unet=_ready(unet),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False),
        vocoder=_ready(vocoder))
    return _finish(pipe)


# --------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------


def tiny_multistage_call_kwargs(pipe, seed: int = 0) -> dict[str, Any]:
    """Arguments for a quick, deterministic call of a pipeline built here (a freshly seeded generator each time)."""
    import diffusers

    generator = torch.Generator("cpu").manual_seed(seed)
    image = torch.rand((1, 3, _IMAGE, _IMAGE), generator=torch.Generator("cpu").manual_seed(seed + 1))
    name = getattr(pipe, "_offloadkit_base_class", type(pipe)).__name__
    if name == "AudioLDM2Pipeline":
        return {"prompt": _PROMPT, "num_inference_steps": 2, "guidance_scale": 2.0, "audio_length_in_s": 0.1,
                "max_new_tokens": 2, "generator": generator, "output_type": "np"}
    if isinstance(pipe, (diffusers.KandinskyPriorPipeline, diffusers.KandinskyV22PriorPipeline)):
        return {"prompt": _PROMPT, "num_inference_steps": 2, "guidance_scale": 4.0, "generator": generator,
                "output_type": "pt"}
    if isinstance(pipe, diffusers.KandinskyV22PriorEmb2EmbPipeline):
        image = torch.rand((1, 3, 28, 28), generator=torch.Generator("cpu").manual_seed(seed + 1))  # the CLIP size
        return {"prompt": _PROMPT, "image": image, "strength": 0.5, "num_inference_steps": 4, "guidance_scale": 4.0,
                "generator": generator, "output_type": "pt"}
    kwargs = {"prompt": _PROMPT, "num_inference_steps": 2, "generator": generator, "output_type": "np",
              "height": _IMAGE, "width": _IMAGE}
    if isinstance(pipe, diffusers.StableCascadeCombinedPipeline):
        # the decoder's latents are 4x the prior's side, which must be at least 1: 128 pixels at the least
        return {**kwargs, "prior_num_inference_steps": 2, "height": 128, "width": 128}
    kwargs["prior_num_inference_steps"] = 2
    if "Img2Img" in name:
        kwargs.update(image=image, strength=0.75, num_inference_steps=4)
    if "Inpaint" in name:
        mask = torch.zeros((_IMAGE, _IMAGE))
        mask[: _IMAGE // 2] = 1.0
        kwargs.update(image=image, mask_image=mask)
    return kwargs
