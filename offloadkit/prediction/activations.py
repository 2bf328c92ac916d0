"""Working memory (activations and temporaries, not weights) of one forward, predicted from a config.

The planner needs, before anything is loaded, the device memory a pipeline call takes on
top of the weights that are resident. This module predicts the peak bytes of the tensors a
component creates during ONE inference forward (``torch.no_grad``) at a given resolution,
batch and dtype: ``working_memory`` for one model, ``component_working_memory`` for every
model of a pipeline, each in the stage it runs in (``encode``: text/image encoders;
``denoise``: UNet/transformer and ControlNet, one denoiser call; ``decode``: the VAE's ``decode``).

>>> from offloadkit.prediction.activations import component_working_memory
>>> per_model = component_working_memory("sdxl", height=1024, width=1024, batch=1, dtype="fp16", guidance=True)
>>> sorted(per_model)
['text_encoder', 'text_encoder_2', 'unet', 'vae']

How. It works from a model built on ``meta`` (or a loaded one, or a config), so nothing runs:
for each family the peak is a small formula over the largest intermediate tensors that
family creates, with one coefficient (K_...) per family set from measured forwards of tiny
and mid-size random-weight models on CPU (``benchmarks/measure_activations.py``; where the
peak happens was found by tracking the module running at the peak). Every formula is
``bytes_per_element x batch x (a few "tokens x width" products)``, in elements:

* ``UNet2DConditionModel`` / ``ControlNetModel``: the peak is in the up path at the busiest
  level i: ``K x channels_i x tokens_i`` (K_UNET_ATTN = 25 at a level with transformer
  blocks: the GEGLU feed-forward alone holds 16 x channels; it includes the level's own skip
  tensors) plus the skip tensors of the levels above, still waiting (exact, from the config);
  plus the text keys/values. SD 1.5 peaks at its first level (320 ch), SDXL at its second
  (640 ch at 1/4 of the pixels, with 6.5 units of first-level skips waiting). ControlNet is
  not measured: the UNet formula is used for it.
* ``SD3Transformer2DModel``: ``inner_dim x (12.4 x image tokens + 7.9 x text tokens)``
  (fit on SD3.5-medium, whose dual-attention layers give image tokens a second attention);
  ``FluxTransformer2DModel``: ``15.1 x inner_dim`` per token, image and text alike (its single
  blocks concatenate the attention output with the 4x MLP hidden). The feed-forward is always
  4 x inner_dim in these two, so it is inside K.
* ``WanTransformer3DModel``: ``video tokens x (2 x ffn_dim + 3.9 x inner_dim)`` plus the text
  keys and values of its cross attention (ffn_dim / inner_dim differs between 1.3B and 14B,
  so the feed-forward is a separate term: its input and GELU output are alive together).
* ``AutoencoderKL.decode``: ``3 x`` the largest ``channels x pixels`` of the up path (for the
  SD/SDXL/SD3/FLUX VAE: 256 channels at full resolution, where the third up block's upsampler
  writes and the last block's first ResNet reads): input, GroupNorm output, SiLU output.
* ``AutoencoderKLWan.decode``: it decodes one latent frame (4 video frames) at a time with a
  causal cache: ``12.3 x 4 x pixels x base_dim`` (the cache of 2 frames per causal conv is in
  K), plus the decoded video twice (``torch.cat`` joins chunks, old and new output coexist).
* ``QwenImageTransformer2DModel``: ``14 x inner_dim`` per token, image and text alike (60 dual-stream
  blocks with joint attention, 4x GELU feed-forwards in both streams: in K).
* ``Qwen2_5_VLForConditionalGeneration`` (Qwen-Image's text encoder, run with ``output_hidden_states``):
  every layer's output stays alive beside the logits of every token (``tokens x vocabulary``, 152,064
  wide: the peak, measured within 1%) or a layer's gated MLP, whichever is larger.
* ``AutoencoderKLQwenImage.decode`` (Wan's VAE on one frame): ``18 x pixels x base_dim`` plus the image.
* Not covered: VAE ``encode`` (img2img), image encoders, the safety checker, VAE tiling/slicing.
* CLIP text: ``tokens x ((7 + layers + 1) x hidden + intermediate)`` (pipelines ask for
  ``output_hidden_states``: every layer's output stays alive). T5 / UMT5:
  ``tokens x (8 x d_model + 2 x d_ff + 1.25 x heads x tokens)``: the gated feed-forward's two
  hiddens and the relative position bias, built once as every layer's attention mask.

Batch and classifier-free guidance. ``batch`` is the number of images (videos) per call.
With ``guidance=True`` the denoiser's batch doubles where the pipeline concatenates the
conditional and unconditional inputs into one forward: Stable Diffusion 1.x/2.x, SDXL,
ControlNet and SD3 (``torch.cat([latents] * 2)`` in their ``__call__``). FLUX.1 does not
(guidance-distilled; its optional true CFG runs a second forward) and Wan 2.1 runs
the conditional and unconditional forwards one after the other (``current_model(...)``
twice in ``WanPipeline.__call__``), so neither doubles. Encoders run the negative prompt as
a separate forward: their batch never doubles. VAE decode never doubles.

Text lengths (the installed diffusers' pipeline defaults): CLIP 77 tokens (its
``max_position_embeddings``); T5 in SD3: 256 (``max_sequence_length=256``), so the SD3
transformer sees 77 + 256 = 333 text tokens; T5 in FLUX.1 (dev and schnell share the
pipeline): 512; UMT5 in Wan 2.1: 512. Qwen-Image pads prompts to the longest, not to a fixed
length: its bound at the default ``max_sequence_length=512`` is used, 512 + 34 template tokens
for Qwen2.5-VL and 512 for the transformer (a short prompt needs less). ``text_tokens=`` overrides.

Dtype. Estimates scale with the element size (fp16/bf16 = half of fp32; on CPU the tiny
models' measured bf16 peaks are exactly half their fp32 peaks). SDXL's pipeline
upcasts an fp16 VAE to fp32 for decoding when the VAE config says ``force_upcast`` (the
others do not), so ``component_working_memory`` decodes SDXL's VAE in fp32 at ``dtype="fp16"``.

What is counted: every tensor storage created by an aten op during the forward (outputs,
intermediates, the output of the forward itself), from its creation until it is freed, at
op granularity. Not counted: the weights and the inputs; memory inside kernels that never
becomes a tensor (cuBLAS/cuDNN workspaces, the blocks of flash/memory-efficient attention);
the caching allocator's rounding and fragmentation (PyTorch's CUDA allocator rounds up to
512 B blocks and keeps freed blocks cached, so ``torch.cuda.max_memory_reserved`` is above
this by a workload-dependent margin); and the CUDA context, cuBLAS handles and loaded
kernels, for which :data:`CUDA_RUNTIME_OVERHEAD` is a separate, documented allowance.

Accuracy: see :data:`TOLERANCE` and the benchmark. All coefficients come from CPU runs in
float32 with PyTorch's CPU flash-attention kernel (no tokens^2 score matrix, as with flash or
memory-efficient SDPA on CUDA). Unknown without a GPU: CUDA kernels (cuDNN convolution
workspaces, which SDPA backend a head size gets: the SD VAE's single 512-wide attention head
may fall back to the math kernel, which materialises tokens^2 scores), and the fp32 upcasts
inside fp16 norms/softmax, which add short-lived fp32 copies that CPU fp32 runs cannot show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CallSettingsError, ModelSourceError
from ..plans.stages import STAGES, stage_of
from ..units import dtype_name, dtype_size

#: Bytes a CUDA process holds before any tensor: the CUDA context, cuBLAS/cuDNN handles and
#: the kernels loaded on first use. It is not an activation: a predictor of what
#: ``nvidia-smi`` / ``torch.cuda.mem_get_info`` show adds it once per process. Not measured
#: here (no GPU): PyTorch forum threads report ~700-800 MB for the context alone on older CUDA
#: versions (discuss.pytorch.org "high-gpu-memory-overhead", "what-is-the-reason-for-pytorchs-
#: gpu-memory-floor"); with CUDA's lazy module loading, commonly 300-500 MiB. Raise it for old stacks.
CUDA_RUNTIME_OVERHEAD = 512 * 2**20

#: The estimate / measured ratio the tests hold the tiny models to. Seen on CPU (float32,
#: benchmarks/measure_activations.py): tiny pipelines' components 0.79-1.39 (median 1.12);
#: mid-size and full-width models 0.92-1.03 (median 1.00; those are the cases the K were fit on).
TOLERANCE = (0.67, 1.5)

# Default text lengths (tokens) of the installed pipelines, by pipeline class.
CLIP_TOKENS = 77
T5_TOKENS = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "WanPipeline": 512}
_T5_DEFAULT = 512
# Qwen-Image: its pipeline wraps the prompt in a 34-token chat template, runs Qwen2.5-VL on the padded
# batch and cuts the template off and the rest to `max_sequence_length` (512 by default) for the
# transformer. Prompts are padded to the longest, not to 512: these are the bounds a 512-token prompt reaches.
QWEN_TEMPLATE_TOKENS = 34
QWEN_TOKENS = 512

# Pipelines whose transformer sees the latents of input images beside the generated ones (as many tokens
# again per image): Flux.1 Kontext concatenates the encoded image to edit, taken at the output's size.
REFERENCE_IMAGES = {"FluxKontextPipeline": 1}

# Denoisers whose pipelines batch the conditional and unconditional inputs into one forward.
_CFG_BATCHED = ("UNet2DConditionModel", "ControlNetModel", "SD3Transformer2DModel", "SD3ControlNetModel")

# ---- coefficients (set from benchmarks/measure_activations.py; see the report there) ----
K_UNET_RES = 12.0  # ResNet-only level, in units of tokens x channels (never the peak in the cases measured)
K_UNET_ATTN = 25.0  # level with transformer blocks: the GEGLU feed-forward alone holds 16x channels
K_SD3_IMAGE = 12.4  # SD3: units of inner_dim per image token (SD3.5-medium, with its dual attention layers)
K_SD3_TEXT = 7.9  # SD3: units of inner_dim per text token
K_FLUX = 15.1  # FLUX.1: units of inner_dim per token, image and text alike (single blocks: 5x-wide concat)
K_WAN = 3.9  # Wan 2.1: units of inner_dim per video token beside 2 x ffn_dim
K_VAE = 3.0  # AutoencoderKL decode: units of the largest channels x pixels of the up path (input, norm, SiLU)
K_WAN_VAE = 12.3  # AutoencoderKLWan decode: units of 4 frames x pixels x first-level channels (incl. its causal cache)
K_CLIP = 7.0  # CLIP text: units of tokens x hidden, beside the feed-forward hidden and every layer's output
K_T5 = 8.0  # T5/UMT5: units of tokens x d_model, beside the two gated feed-forward hiddens
K_QWEN = 14.0  # Qwen-Image transformer: units of inner_dim per token, image and text alike (two streams, joint attention)
K_QWEN_VL = 8.0  # Qwen2.5-VL text: units of tokens x hidden beside a layer's gated MLP (assumed: the logits peak)
K_QWEN_VAE = 18.0  # AutoencoderKLQwenImage decode of one frame: units of pixels x first-level channels


# --------------------------------------------------------------------------
# Reading a model or a config
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    class_name: str
    config: dict


def _describe(module_or_config) -> _Model:
    """Class name and config (as a plain dict) of a model, a ``(class_name, config)`` pair or a config dict."""
    if isinstance(module_or_config, tuple) and len(module_or_config) == 2:
        return _Model(str(module_or_config[0]), dict(module_or_config[1]))
    if isinstance(module_or_config, dict):
        name = module_or_config.get("_class_name") or (module_or_config.get("architectures") or [None])[0]
        if not name:
            raise ModelSourceError("a config dict needs '_class_name' (diffusers) or 'architectures' (transformers); "
                                "or pass (class_name, config)")
        return _Model(str(name), dict(module_or_config))
    config = getattr(module_or_config, "config", None)
    if config is None:
        raise ModelSourceError(f"{type(module_or_config).__name__} has no config: pass a diffusers/transformers model, "
                            "a config dict or (class_name, config)")
    as_dict = dict(config) if isinstance(config, dict) else config.to_dict()
    return _Model(type(module_or_config).__name__, as_dict)


def _get(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


def _text_config(config: dict) -> dict:
    # CLIPTextConfig.to_dict() is flat; a CLIPConfig nests text_config/vision_config
    return config.get("text_config", config) if "hidden_size" not in config else config


# --------------------------------------------------------------------------
# Family formulas: each returns elements (multiply by bytes per element)
# --------------------------------------------------------------------------


def _unet_elements(config: dict, h: int, w: int, batch: int, text_tokens: int) -> float:
    channels = list(_get(config, "block_out_channels", (320, 640, 1280, 1280)))
    down_types = list(_get(config, "down_block_types", ()))
    layers = _get(config, "layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    tokens = []
    for _ in channels:
        tokens.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    # The peak is at the busiest level of the up path: its own working set (K x channels x
    # tokens, which includes its own skip tensors) plus the skips still waiting for the
    # levels above it (conv_in, each ResNet output, the downsampler output).
    above = working = 0.0
    for i, (ch, n) in enumerate(zip(channels, tokens)):
        attention = i < len(down_types) and "Attn" in down_types[i]
        working = max(working, (K_UNET_ATTN if attention else K_UNET_RES) * ch * n + above)
        above += ((1 if i == 0 else 0) + layers[i]) * ch * n + (ch * tokens[i + 1] if i + 1 < len(channels) else 0)
    cross = _get(config, "cross_attention_dim", 768)
    cross = max(cross) if isinstance(cross, (list, tuple)) else cross
    return batch * (working + 2 * text_tokens * cross)


def _dit_elements(family: str, config: dict, h: int, w: int, frames: int, batch: int, text_tokens: int,
                  references: int = 0) -> float:
    heads = _get(config, "num_attention_heads", 24)
    head_dim = _get(config, "attention_head_dim", 64)
    inner = heads * head_dim
    patch = _get(config, "patch_size", 2 if family == "sd3" else 1)
    if family == "flux":
        # FluxPipeline packs 2x2 latent patches into tokens itself (patch_size in the config is 1);
        # image and text tokens go through the same blocks
        image_tokens = math.ceil(h / 2) * math.ceil(w / 2) * (1 + references)
        return batch * inner * K_FLUX * (image_tokens + text_tokens)
    if family == "qwen":
        # QwenImagePipeline packs 2x2 latent patches into tokens (as Flux); image and text tokens keep
        # their own streams but attend jointly, so the per-token working set is one formula
        image_tokens = math.ceil(h / 2) * math.ceil(w / 2)
        return batch * inner * K_QWEN * (image_tokens + text_tokens)
    if family == "wan":
        pt, ph, pw = patch if isinstance(patch, (list, tuple)) else (1, patch, patch)
        tokens = math.ceil(frames / pt) * math.ceil(h / ph) * math.ceil(w / pw)
        feed_forward = _get(config, "ffn_dim", 4 * inner)
        # the feed-forward's input and GELU output (2 x ffn_dim) beside the block's other tensors;
        # text enters by cross attention: its keys and values
        return batch * (tokens * (2 * feed_forward + K_WAN * inner) + 2 * text_tokens * inner)
    image_tokens = math.ceil(h / patch) * math.ceil(w / patch)  # sd3
    return batch * inner * (K_SD3_IMAGE * image_tokens + K_SD3_TEXT * text_tokens)


def _vae_elements(config: dict, h: int, w: int, batch: int) -> float:
    channels = list(_get(config, "block_out_channels", (128, 256, 512, 512)))
    up = channels[::-1]  # the decoder walks the levels from the deepest
    largest = 0
    pixels = h * w
    for j, ch in enumerate(up):
        previous = up[j - 1] if j else ch
        largest = max(largest, pixels * max(ch, previous))  # the upsampler's output enters block j
        if j + 1 < len(up):
            pixels *= 4
    return batch * K_VAE * largest


def _wan_vae_elements(config: dict, h: int, w: int, frames: int, batch: int) -> float:
    base = _get(config, "base_dim", 96)
    mult = list(_get(config, "dim_mult", (1, 2, 4, 4)))
    scale = 2 ** (len(mult) - 1)
    pixels = h * scale * w * scale
    chunk_frames = min(frames, 2 ** sum(bool(t) for t in _get(config, "temperal_downsample", (False, True, True))))
    output = 3 * frames * pixels
    return batch * (K_WAN_VAE * chunk_frames * pixels * base * mult[0] + 2 * output)


def _qwen_vae_elements(config: dict, height: int, width: int, batch: int) -> float:
    # Wan's VAE on one frame (pixels of the decoded image): no causal cache of earlier chunks, its own K
    pixels = height * width
    return batch * (K_QWEN_VAE * pixels * _get(config, "base_dim", 96) * _get(config, "dim_mult", (1,))[0]
                    + 2 * 3 * pixels)


def _text_elements(family: str, config: dict, batch: int, tokens: int) -> float:
    if family == "clip":
        config = _text_config(config)
        hidden = _get(config, "hidden_size", 768)
        feed_forward = _get(config, "intermediate_size", 4 * hidden)
        layers = _get(config, "num_hidden_layers", 12)
        # pipelines ask for output_hidden_states: every layer's output stays alive
        return batch * tokens * (K_CLIP * hidden + feed_forward + (layers + 1) * hidden)
    if family == "qwen_vl":
        text = config.get("text_config", config)
        hidden = _get(text, "hidden_size", 3584)
        layers = _get(text, "num_hidden_layers", 28)
        # a decoder LM run with output_hidden_states: every layer's output stays alive, beside either a layer's
        # gated MLP (gate, up and their product) or, at the end, the logits of every token (the pipeline ignores
        # them; the model computes them). For Qwen2.5-VL-7B the logits are the peak (152,064 wide)
        layer = K_QWEN_VL * hidden + 3 * _get(text, "intermediate_size", 4 * hidden)
        return batch * tokens * ((layers + 1) * hidden + max(layer, _get(text, "vocab_size", 152064)))
    hidden = _get(config, "d_model", 4096)
    feed_forward = _get(config, "d_ff", 4 * hidden) * (2 if _get(config, "is_gated_act", True) else 1)
    heads = _get(config, "num_heads", 64)
    # T5's relative position bias (heads x tokens^2) is built once and passed to every layer's
    # SDPA as its mask: measured 1.25 x heads x tokens^2 in all
    return batch * tokens * (K_T5 * hidden + feed_forward + 1.25 * heads * tokens)


_FAMILIES = {
    "UNet2DConditionModel": "unet", "ControlNetModel": "unet",
    "SD3Transformer2DModel": "sd3", "SD3ControlNetModel": "sd3",
    "FluxTransformer2DModel": "flux", "FluxControlNetModel": "flux",
    "WanTransformer3DModel": "wan", "QwenImageTransformer2DModel": "qwen",
    "AutoencoderKL": "vae", "AutoencoderKLWan": "wan_vae", "AutoencoderKLQwenImage": "qwen_vae",
    "CLIPTextModel": "clip", "CLIPTextModelWithProjection": "clip",
    "T5EncoderModel": "t5", "UMT5EncoderModel": "t5", "Qwen2_5_VLForConditionalGeneration": "qwen_vl",
}
_ROLES = {"unet": "denoise", "sd3": "denoise", "flux": "denoise", "wan": "denoise", "qwen": "denoise",
          "vae": "decode", "wan_vae": "decode", "qwen_vae": "decode", "clip": "encode", "t5": "encode",
          "qwen_vl": "encode"}


def default_text_tokens(family: str, config: dict) -> int:
    """Tokens an encoder of `family` sees by default: CLIP its positions (77), T5 512, Qwen2.5-VL the bound
    of a Qwen-Image prompt (512 kept tokens plus the template cut off after encoding)."""
    if family == "clip":
        return _get(_text_config(config), "max_position_embeddings", CLIP_TOKENS)
    if family == "qwen_vl":
        return QWEN_TOKENS + QWEN_TEMPLATE_TOKENS
    return _T5_DEFAULT


def working_memory(module_or_config, *, role: str, height: int, width: int, batch: int = 1, dtype="fp16",
                   guidance: bool = True, num_frames: int | None = None, text_tokens: int | None = None,
                   latent_scale: int | None = None, reference_images: int = 0) -> int:
    """Estimated peak bytes of activations and temporaries (not weights) of ONE forward of a model.

    `module_or_config`: a model (on ``meta`` or loaded), a config dict with ``_class_name`` /
    ``architectures``, or ``(class_name, config)``. `role`: the stage it runs in (``"encode"``,
    ``"denoise"``, ``"decode"``); a model that does not run in that role is an error.
    `height`/`width`: the image in pixels; `batch`: images per call (doubled for denoisers whose
    pipeline batches classifier-free guidance, when `guidance`); `num_frames`: video frames (Wan);
    `text_tokens`: overrides the pipeline default text length; `latent_scale`: pixels per latent
    for denoisers (default 8; the VAE's ``2 ** (len(block_out_channels) - 1)``); `reference_images`: input
    images whose latents a Flux transformer sees beside the generated ones (Kontext: 1, at the output's size).

    >>> from offloadkit.prediction.sizing import build_component
    >>> vae = build_component("sdxl", "vae")
    >>> working_memory(vae, role="decode", height=1024, width=1024, dtype="fp32") > 2 * 2**30
    True
    """
    model = _describe(module_or_config)
    family = _FAMILIES.get(model.class_name)
    if family is None:
        raise ModelSourceError(f"no working-memory formula for {model.class_name!r}. Known: "
                            f"{', '.join(sorted(_FAMILIES))}")
    if role not in STAGES:
        raise ModelSourceError(f"role must be one of {', '.join(STAGES)}, not {role!r}")
    if _ROLES[family] != role:
        raise ModelSourceError(f"{model.class_name} runs in the {_ROLES[family]!r} stage, not {role!r}")
    if height <= 0 or width <= 0 or batch <= 0:
        raise CallSettingsError(f"height, width and batch must be positive, got {height}x{width}, batch {batch}")
    config, size = model.config, dtype_size(dtype_name(dtype))

    if family in ("clip", "t5", "qwen_vl"):
        return int(size * _text_elements(family, config, batch, text_tokens or default_text_tokens(family, config)))

    if family in ("vae", "wan_vae", "qwen_vae"):
        if family == "vae":
            scale = 2 ** (len(_get(config, "block_out_channels", (1, 1, 1, 1))) - 1)
            return int(size * _vae_elements(config, math.ceil(height / scale), math.ceil(width / scale), batch))
        if family == "qwen_vae":
            return int(size * _qwen_vae_elements(config, height, width, batch))
        scale = 2 ** (len(_get(config, "dim_mult", (1, 2, 4, 4))) - 1)
        return int(size * _wan_vae_elements(config, math.ceil(height / scale), math.ceil(width / scale),
                                            num_frames or 81, batch))

    scale = latent_scale or 8  # denoiser configs do not carry the VAE's factor; 8 for every built-in VAE
    h, w = math.ceil(height / scale), math.ceil(width / scale)
    effective = batch * (2 if guidance and model.class_name in _CFG_BATCHED else 1)
    if family == "unet":
        return int(size * _unet_elements(config, h, w, effective, text_tokens or CLIP_TOKENS))
    if family == "sd3":
        tokens = text_tokens or (CLIP_TOKENS + T5_TOKENS["StableDiffusion3Pipeline"])
    elif family == "qwen":
        tokens = text_tokens or QWEN_TOKENS
    else:
        tokens = text_tokens or _T5_DEFAULT
    frames = 1
    if family == "wan":
        frames = ((num_frames or 81) - 1) // 4 + 1  # Wan 2.1's VAE: 4x temporal compression, first frame alone
    return int(size * _dit_elements(family, config, h, w, frames, effective, tokens, reference_images))



def _pipeline_models(source) -> tuple[str, dict[str, _Model], dict]:
    """Pipeline class name, {component: model description}, {component: the object to pass on}."""
    from .sizing import CONFIG, _is_pipeline, _read_json, model_folder, read_model_index

    if _is_pipeline(source):
        import torch

        modules = {n: m for n, m in source.components.items() if isinstance(m, torch.nn.Module)}
        return type(source).__name__, {n: _describe(m) for n, m in modules.items()}, modules
    folder = model_folder(source)
    class_name, entries = read_model_index(folder)
    models, objects = {}, {}
    for name, entry in entries.items():
        if entry is None or entry[1] not in _FAMILIES:
            continue  # tokenizers, schedulers, and models without a formula (safety checker, image encoder)
        model = _Model(entry[1], _read_json(folder / name / CONFIG))
        models[name], objects[name] = model, (model.class_name, model.config)
    return class_name, models, objects


def decodes_upcast(pipeline_class: str, vae_config: dict, dtype) -> bool:
    """Whether the pipeline casts an fp16 VAE to float32 for the decode (SDXL does, when `force_upcast`)."""
    from .schedule import pipeline_family

    return (pipeline_family(pipeline_class) == "sdxl" and bool(vae_config.get("force_upcast"))
            and dtype_name(dtype) == "float16")


def component_working_memory(source, *, height: int, width: int, batch: int = 1, dtype="fp16",
                             guidance: bool = True, num_frames: int | None = None) -> dict[str, int]:
    """Estimated working memory of one forward of each model of a pipeline: ``{component: bytes}``.

    `source`: a built-in architecture name, a model folder (configs only are read) or a loaded
    pipeline. Each model gets the pipeline's own text length (T5: 256 in SD3, 512 in FLUX.1 and
    Wan), latent scale (from its VAE) and guidance batching; SDXL decodes in float32 when its VAE
    config says ``force_upcast`` (as ``StableDiffusionXLPipeline`` does). Models without a formula
    (safety checker, image encoder) or in an unexpected slot are left out.

    >>> sorted(component_working_memory("sd15", height=512, width=512))
    ['text_encoder', 'unet', 'vae']
    """
    pipeline_class, models, objects = _pipeline_models(source)
    scale = None
    for model in models.values():
        if model.class_name == "AutoencoderKL":
            scale = 2 ** (len(_get(model.config, "block_out_channels", (1, 1, 1, 1))) - 1)
        elif model.class_name in ("AutoencoderKLWan", "AutoencoderKLQwenImage"):
            scale = 2 ** (len(_get(model.config, "dim_mult", (1, 1, 1, 1))) - 1)
    found = {}
    for name, model in models.items():
        family = _FAMILIES[model.class_name]
        role = _ROLES[family]
        if stage_of(name, model.class_name) != role:
            continue  # a model in an unexpected slot: no formula for that use
        component_dtype, tokens = dtype, None
        if family == "t5":
            tokens = T5_TOKENS.get(pipeline_class, _T5_DEFAULT)
        if family == "vae" and decodes_upcast(pipeline_class, model.config, dtype):
            component_dtype = "fp32"
        found[name] = working_memory(objects[name], role=role, height=height, width=width, batch=batch,
                                     dtype=component_dtype, guidance=guidance, num_frames=num_frames,
                                     text_tokens=tokens, latent_scale=scale,
                                     reference_images=REFERENCE_IMAGES.get(pipeline_class, 0))
    return found

