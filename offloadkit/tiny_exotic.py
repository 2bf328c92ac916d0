"""Tiny, real diffusers pipelines of the classes whose models are hard to stream layer by layer.

Each builder returns a genuine diffusers pipeline with random, seeded weights so
small that a 2-step call takes a fraction of a second on a CPU. Nothing is
downloaded: tokenizers are the offline ones of `offloadkit.testing`. These are
the pipelines on which `sequential` / `disk` offload used to crash or silently
return `inf` (models that read weights outside `forward`, or call submodules
through other methods); the tests use them to keep that fixed.

Each builder's docstring gives the keyword arguments of a quick call.
"""

from __future__ import annotations

import json

import torch

from .tiny_parts import _clip_tokenizer, _finish, _qwen_tokenizer, _qwen_vl_token_ids, _ready, _seeded, _t5_tokenizer

__all__ = [
    "tiny_ace_step_pipeline",
    "tiny_easyanimate_pipeline",
    "tiny_hunyuan_dit_pipeline",
    "tiny_hunyuan_video_framepack_pipeline",
    "tiny_longcat_audio_dit_pipeline",
    "tiny_motif_video_image2video_pipeline",
    "tiny_stable_audio_3_pipeline",
]


def tiny_longcat_audio_dit_pipeline(*, seed: int = 0):
    """A tiny ``LongCatAudioDiTPipeline`` (UMT5 encoder, 2-block audio DiT, 1-stride VAE).

    Call: ``pipe(prompt="soft ocean ambience", audio_duration_s=0.1, num_inference_steps=2,
    guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").audios``
    """
    from diffusers import LongCatAudioDiTPipeline, LongCatAudioDiTTransformer, LongCatAudioDiTVae
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _t5_tokenizer()
    with _seeded(seed + 1):
        text_encoder = _ready(UMT5EncoderModel(UMT5Config(d_model=32, num_layers=1, num_heads=4, d_ff=64,
                                                          vocab_size=len(tokenizer))))
    with _seeded(seed):
        transformer = LongCatAudioDiTTransformer(dit_dim=64, dit_depth=2, dit_heads=4, dit_text_dim=32,
                                                 latent_dim=8, text_conv=False)
    with _seeded(seed + 2):
        vae = LongCatAudioDiTVae(in_channels=1, channels=16, c_mults=[1, 2], strides=[2], latent_dim=8,
                                 encoder_latent_dim=16, downsampling_ratio=2, sample_rate=400)  # 20 latent frames for 0.1 s
    pipe = LongCatAudioDiTPipeline(vae=_ready(vae), text_encoder=text_encoder, tokenizer=tokenizer,
                                   transformer=_ready(transformer))
    return _finish(pipe)


def tiny_stable_audio_3_pipeline(*, seed: int = 0):
    """A tiny ``StableAudio3Pipeline`` (T5Gemma encoder, duration embedder, 2-block DiT, SAME VAE).

    Call: ``pipe(prompt="a hammer on wood", duration=1.0, num_inference_steps=2,
    generator=torch.Generator("cpu").manual_seed(0), output_type="pt").audios``
    """
    from diffusers import AutoencoderSAME, FlowMatchEulerDiscreteScheduler, StableAudio3DiTModel, StableAudio3Pipeline
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
    from transformers import T5GemmaConfig, T5GemmaEncoderModel, T5GemmaModuleConfig

    cond_dim = 16
    tokenizer = _t5_tokenizer()
    with _seeded(seed):
        transformer = StableAudio3DiTModel(io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=4,
                                           cond_token_dim=cond_dim, global_cond_dim=cond_dim, local_add_cond_dim=5,
                                           timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
                                           use_differential_attention=False)
    with _seeded(seed + 1):
        vae = AutoencoderSAME(audio_channels=2, patch_size=2, encoder_channels=8, encoder_c_mults=(2,),
                              encoder_strides=(2,), encoder_transformer_depths=(1,), latent_dim=8,
                              use_differential_attention=False, dim_heads=4, ff_mult=2, sampling_rate=16)
    module = T5GemmaModuleConfig(vocab_size=len(tokenizer), hidden_size=cond_dim, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                 max_position_embeddings=64, sliding_window=64,
                                 layer_types=["full_attention", "full_attention"])
    with _seeded(seed + 2):
        text_encoder = T5GemmaEncoderModel(T5GemmaConfig(encoder=module.to_dict(), decoder=module.to_dict(),
                                                         is_encoder_decoder=False))
    with _seeded(seed + 3):
        duration_embedder = StableAudio3DurationEmbedder(output_dim=cond_dim, fourier_dim=16)
    pipe = StableAudio3Pipeline(
        vae=_ready(vae), text_encoder=_ready(text_encoder), tokenizer=tokenizer,
        duration_embedder=_ready(duration_embedder), transformer=_ready(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=False))
    return _finish(pipe)


def _bert_tokenizer():
    """A WordPiece tokenizer over single characters (BERT's), from a vocab.txt written here."""
    from transformers import BertTokenizer

    from .tiny_parts import _tokenizer_folder

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = [chr(code) for code in range(ord("!"), ord("~") + 1)]
    folder = _tokenizer_folder("bert", {"vocab.txt": "\n".join(specials + characters) + "\n",
                                        "tokenizer_config.json": json.dumps({"do_lower_case": True,
                                                                             "model_max_length": 77})})
    return BertTokenizer.from_pretrained(folder, local_files_only=True)


def _hunyuan_dit_parts(seed: int) -> dict:
    """The models HunyuanDiT pipelines share: BERT and T5 encoders, a 2-block DiT, the tiny VAE."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from diffusers import AutoencoderKL

    tokenizer = _bert_tokenizer()
    with _seeded(seed + 1):
        text_encoder = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=37,
                                            max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id))
    tokenizer_2 = _t5_tokenizer()
    with _seeded(seed + 2):
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37,
                                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                                 pad_token_id=tokenizer_2.pad_token_id,
                                                 eos_token_id=tokenizer_2.eos_token_id))
    with _seeded(seed):
        transformer = HunyuanDiT2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=3, in_channels=4, cross_attention_dim=32,
                                        cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
                                        activation_fn="gelu-approximate")
    # The pipeline sizes its rotary grid for a VAE that downsamples 8x: four levels
    with _seeded(seed + 4):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=4,
                            latent_channels=4, sample_size=64)
    return {"vae": _ready(vae), "text_encoder": _ready(text_encoder), "tokenizer": tokenizer,
            "text_encoder_2": _ready(text_encoder_2), "tokenizer_2": tokenizer_2,
            "transformer": _ready(transformer), "scheduler": DDPMScheduler(), "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}


def tiny_hunyuan_dit_pipeline(*, seed: int = 0, pag: bool = False, controlnet: bool = False):
    """A tiny ``HunyuanDiTPipeline`` (``pag=True``: ``HunyuanDiTPAGPipeline``; ``controlnet=True``:
    ``HunyuanDiTControlNetPipeline``).

    Call: ``pipe(prompt="a squirrel", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
    use_resolution_binning=False, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images``;
    with PAG add ``pag_scale=3.0``; with the ControlNet add ``control_image`` (a (1, 3, 64, 64) tensor) and
    ``controlnet_conditioning_scale=0.5``.
    """
    from diffusers import HunyuanDiT2DControlNetModel, HunyuanDiTControlNetPipeline, HunyuanDiTPAGPipeline, \
        HunyuanDiTPipeline

    parts = _hunyuan_dit_parts(seed)
    if pag:
        return _finish(HunyuanDiTPAGPipeline(**parts, pag_applied_layers="blocks.1"))
    if controlnet:
        with _seeded(seed + 3):
            net = HunyuanDiT2DControlNetModel(sample_size=8, transformer_num_layers=2, patch_size=2,
                                              attention_head_dim=8, num_attention_heads=3, in_channels=4,
                                              cross_attention_dim=32, cross_attention_dim_t5=32,
                                              pooled_projection_dim=16, hidden_size=24,
                                              activation_fn="gelu-approximate")
        # its output projections start at zero (a no-op): random ones make a test see whether it ran
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            for linear in [*net.controlnet_blocks, net.input_block]:
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
        return _finish(HunyuanDiTControlNetPipeline(**parts, controlnet=_ready(net)))
    return _finish(HunyuanDiTPipeline(**parts))


def _siglip(seed: int, image_size: int, hidden_size: int):
    """A one-layer SigLIP vision tower and its image processor (constructed, not downloaded)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37, image_size=image_size, patch_size=4, num_channels=3)
    with _seeded(seed):
        model = _ready(SiglipVisionModel(config))
    processor = SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                     size={"height": image_size, "width": image_size})
    return model, processor


def tiny_hunyuan_video_framepack_pipeline(*, seed: int = 0):
    """A tiny ``HunyuanVideoFramepackPipeline`` (Llama and CLIP encoders, SigLIP image encoder, 1+1-block
    transformer, 8x spatial / 4x temporal VAE).

    Call: ``pipe(image=PIL.Image.new("RGB", (32, 32)), prompt="dance", prompt_template={"template": "{}",
    "crop_start": 0}, num_inference_steps=2, guidance_scale=4.5, height=32, width=32, num_frames=9,
    latent_window_size=3, max_sequence_length=16, generator=torch.Generator("cpu").manual_seed(0),
    output_type="pt").frames``
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, \
        HunyuanVideoFramepackPipeline, HunyuanVideoFramepackTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    with _seeded(seed):
        transformer = HunyuanVideoFramepackTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
            has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)
    with _seeded(seed + 1):
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
            temporal_compression_ratio=4, mid_block_add_attention=True)
    tokenizer = _qwen_tokenizer()
    with _seeded(seed + 2):
        text_encoder = LlamaModel(LlamaConfig(
            hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"))
    tokenizer_2 = _clip_tokenizer()
    # the pipeline pads the CLIP prompt to 77 tokens
    with _seeded(seed + 3):
        text_encoder_2 = _ready(CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=8, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id)))
    image_encoder, feature_extractor = _siglip(seed + 4, image_size=16, hidden_size=16)
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=_ready(text_encoder), tokenizer=tokenizer, transformer=_ready(transformer), vae=_ready(vae),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, image_encoder=image_encoder, feature_extractor=feature_extractor)
    return _finish(pipe)


def tiny_motif_video_image2video_pipeline(*, seed: int = 0):
    """A tiny ``MotifVideoImage2VideoPipeline`` (T5Gemma2 encoder with a SigLIP tower, 1+1-block transformer,
    Wan VAE, adaptive projected guidance).

    Call: ``pipe(image=PIL.Image.new("RGB", (16, 16)), prompt="a test video", negative_prompt="bad quality",
    num_inference_steps=2, height=16, width=16, num_frames=9, max_sequence_length=16,
    generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames``
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, MotifVideoImage2VideoPipeline, \
        MotifVideoTransformer3DModel
    from diffusers.guiders import AdaptiveProjectedGuidance
    from transformers import SiglipImageProcessor, SiglipVisionConfig, T5Gemma2Encoder, T5Gemma2EncoderConfig, \
        T5Gemma2TextConfig

    with _seeded(seed + 1):
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    tokenizer = _t5_tokenizer()
    text_config = T5Gemma2TextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=128,
                                     head_dim=16, num_key_value_heads=2, dropout_rate=0.0)
    vision_config = SiglipVisionConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=16, patch_size=4, num_channels=3)
    with _seeded(seed + 2):
        text_encoder = T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text_config, vision_config=vision_config))
    with _seeded(seed):
        transformer = MotifVideoTransformer3DModel(
            in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
            num_single_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
            text_embed_dim=32, image_embed_dim=4, rope_axes_dim=(4, 4, 4))
    feature_extractor = SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                             size={"height": 16, "width": 16})
    pipe = MotifVideoImage2VideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), vae=_ready(vae), text_encoder=_ready(text_encoder),
        tokenizer=tokenizer, transformer=_ready(transformer), guider=AdaptiveProjectedGuidance(),
        feature_extractor=feature_extractor)
    return _finish(pipe)


_CHAT_TEMPLATE = (  # Qwen's chat layout, enough for pipelines that format prompts with apply_chat_template
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_easyanimate_pipeline(*, seed: int = 0):
    """A tiny ``EasyAnimatePipeline`` (2-layer Qwen2-VL encoder, 1-block transformer, MagVit VAE).

    Call: ``pipe(prompt="dance monkey", negative_prompt="", num_inference_steps=2, guidance_scale=6.0,
    height=16, width=16, num_frames=5, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").frames``
    """
    from diffusers import AutoencoderKLMagvit, EasyAnimatePipeline, EasyAnimateTransformer3DModel, \
        FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    with _seeded(seed):
        transformer = EasyAnimateTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=16, num_layers=1, sample_width=16, sample_height=16, patch_size=2)
    with _seeded(seed + 1):
        vae = AutoencoderKLMagvit(
            in_channels=3, out_channels=3,
            down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
            up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
            spatial_group_norm=False)
    tokenizer = _qwen_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    ids = _qwen_vl_token_ids(tokenizer)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 1024, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2}, **ids)
    with _seeded(seed + 2):
        text_encoder = _ready(Qwen2VLForConditionalGeneration(config))
    pipe = EasyAnimatePipeline(vae=_ready(vae), text_encoder=text_encoder, tokenizer=tokenizer,
                               transformer=_ready(transformer), scheduler=FlowMatchEulerDiscreteScheduler())
    return _finish(pipe)


def tiny_ace_step_pipeline(*, seed: int = 0):
    """A tiny ``AceStepPipeline`` (2-layer Qwen3 encoder, condition encoder, audio (de)tokenizer, 2-layer
    transformer, Oobleck VAE).

    Call: ``pipe(prompt="a piano piece", lyrics="[verse]\\nsoft notes", audio_duration=0.4, num_inference_steps=2,
    max_text_length=32, generator=torch.Generator("cpu").manual_seed(0)).audios``
    """
    from diffusers import AceStepPipeline, AceStepTransformer1DModel, AutoencoderOobleck, \
        FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ace_step.modeling_ace_step import AceStepAudioTokenDetokenizer, \
        AceStepAudioTokenizer, AceStepConditionEncoder
    from transformers import Qwen3Config, Qwen3Model

    attention = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 10000.0,
                 "sliding_window": 16}
    with _seeded(seed):
        transformer = AceStepTransformer1DModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2,
                                                **attention)
    tokenizer = _qwen_tokenizer()
    with _seeded(seed + 1):
        text_encoder = Qwen3Model(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              vocab_size=len(tokenizer), max_position_embeddings=256))
    with _seeded(seed + 2):
        condition_encoder = AceStepConditionEncoder(hidden_size=32, intermediate_size=64, text_hidden_dim=32,
                                                    timbre_hidden_dim=8, num_lyric_encoder_hidden_layers=2,
                                                    num_timbre_encoder_hidden_layers=2, **attention)
    with _seeded(seed + 3):
        audio_tokenizer = AceStepAudioTokenizer(hidden_size=32, intermediate_size=64, audio_acoustic_hidden_dim=8,
                                                pool_window_size=2, fsq_dim=32, fsq_input_levels=[4, 4, 4],
                                                fsq_input_num_quantizers=1, num_attention_pooler_hidden_layers=1,
                                                **attention)
    with _seeded(seed + 4):
        detokenizer = AceStepAudioTokenDetokenizer(hidden_size=32, intermediate_size=64, audio_acoustic_hidden_dim=8,
                                                   pool_window_size=2, num_attention_pooler_hidden_layers=1,
                                                   **attention)
    with _seeded(seed + 5):
        vae = AutoencoderOobleck(encoder_hidden_size=6, downsampling_ratios=[1, 2], decoder_channels=3,
                                 decoder_input_channels=8, audio_channels=2, channel_multiples=[2, 4],
                                 sampling_rate=4)
    pipe = AceStepPipeline(vae=_ready(vae), text_encoder=_ready(text_encoder), tokenizer=tokenizer,
                           transformer=_ready(transformer), condition_encoder=_ready(condition_encoder),
                           scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
                           audio_tokenizer=_ready(audio_tokenizer), audio_token_detokenizer=_ready(detokenizer))
    return _finish(pipe)
