"""The parts tiny pipelines are built from: offline tokenizers, seeded tiny models, shared sizes.

`offloadkit.testing` and the family modules beside it (`tiny_exotic`, `tiny_multistage`) build
their pipelines from these; nothing here is public API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Iterator

import torch

# Shared sizes. The token budget is small to keep the text encoders cheap, but
# large enough that the demo prompt (one token per character) is not truncated.
_MAX_TOKENS = 32
_IMAGE_SIZE = 32  # pixels; the two-level VAE halves it once -> 16x16 latents
_LATENT_CHANNELS = 4
_CALL_PROMPT = "a lighthouse at dusk"

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE.

    Bytes that are already visible characters keep their own glyph; the rest
    (control characters, space, ...) are shifted into the range above 255 so
    every byte has a visible, whitespace-free stand-in. This must match what
    the tokenizers ``ByteLevel`` pre-tokenizer emits.
    """
    visible = set(range(ord("!"), ord("~") + 1))
    visible |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    visible |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    mapping = {}
    next_free = 256
    for byte in range(256):
        if byte in visible:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def _clip_vocab() -> dict[str, int]:
    """Every single byte symbol, alone and word-final, plus the two specials.

    With no merges each character becomes one token, so any text (including
    non-ASCII, through its UTF-8 bytes) tokenizes without unknown tokens.
    The order follows the real CLIP vocab: plain symbols, word-final symbols,
    then the special tokens last.
    """
    symbols = list(_byte_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [_BOS, _EOS]
    return {token: index for index, token in enumerate(tokens)}


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    except OSError:
        pass
    # Write a temporary file and rename it, so parallel test workers never
    # read a half-written file.
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def _tokenizer_folder(kind: str, files: dict[str, str]) -> str:
    """A folder holding ``files`` (name -> text), for ``from_pretrained``.

    The folder lives in the temp directory and is named after a hash of the
    contents, so it is written once and shared by later builds and processes.
    If that shared folder is not usable (for example created by another user),
    a private one is made instead.
    """
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode("utf-8") + b"\0" + files[name].encode("utf-8") + b"\0")
    shared = os.path.join(tempfile.gettempdir(), f"offloadkit-tiny-{kind}-{digest.hexdigest()[:16]}")
    try:
        os.makedirs(shared, exist_ok=True)
        for name, text in files.items():
            _write_if_changed(os.path.join(shared, name), text)
        return shared
    except OSError:
        private = tempfile.mkdtemp(prefix=f"offloadkit-tiny-{kind}-")
        for name, text in files.items():
            with open(os.path.join(private, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        return private


def _clip_tokenizer_dir() -> str:
    """Write vocab.json and merges.txt once, in a temp folder keyed by content."""
    vocab_text = json.dumps(_clip_vocab(), ensure_ascii=False)
    merges_text = "#version: 0.2\n"  # header only: no merges needed
    config_text = json.dumps(
        {
            "model_max_length": _MAX_TOKENS,
            "bos_token": _BOS,
            "eos_token": _EOS,
            "unk_token": _EOS,
            "pad_token": _EOS,
        }
    )
    return _tokenizer_folder(
        "clip",
        {
            "vocab.json": vocab_text,
            "merges.txt": merges_text,
            "tokenizer_config.json": config_text,
        },
    )


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # A local folder, never a hub id: local_files_only makes that explicit.
    return CLIPTokenizer.from_pretrained(
        _clip_tokenizer_dir(), local_files_only=True, model_max_length=_MAX_TOKENS
    )


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # "\u2581" marks a word start (sentencepiece style). Equal scores for all
    # characters: the tokenization is one piece per character.
    characters = ["\u2581"] + [chr(code) for code in range(ord("!"), ord("~") + 1)]
    pieces = specials + [(char, -1.0) for char in characters]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer_text = backend.to_str()
    config_text = json.dumps(
        {
            "model_max_length": 512,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "extra_ids": 0,
        }
    )
    folder = _tokenizer_folder(
        "t5", {"tokenizer.json": tokenizer_text, "tokenizer_config.json": config_text}
    )
    return T5TokenizerFast.from_pretrained(folder, local_files_only=True)


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for one model's initialisation.

    Model constructors draw their random weights from the global generator, so
    seeding it is what makes weights reproducible; forking keeps the caller's
    own RNG stream untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ready(model: torch.nn.Module) -> torch.nn.Module:
    # Cast only when needed (a non-float32 default dtype): diffusers warns on
    # every dtype cast through `.to()`, even a no-op one.
    if any(param.dtype != torch.float32 for param in model.parameters()):
        model = model.float()
    return model.eval()


def _clip_text_encoder(tokenizer, seed: int, hidden_size: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        # The pooled output is read at the first eos token, so the ids must be
        # those of our tokenizer, not CLIP's defaults.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with _seeded(seed):
        return _ready(model_class(config))


def _tiny_t5(config_class, model_class, tokenizer, seed: int):
    """A 2-layer T5-family encoder (T5, UMT5) sized for the offline T5 tokenizer."""
    config = config_class(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    with _seeded(seed):
        return _ready(model_class(config))


def _vae(seed: int, **extra_config):
    from diffusers import AutoencoderKL

    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=_LATENT_CHANNELS,
            sample_size=_IMAGE_SIZE,
            **extra_config,
        )
    return _ready(vae)


def _unet(seed: int, cross_attention_dim: int, **extra_config):
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=_IMAGE_SIZE // 2,
            in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
            cross_attention_dim=cross_attention_dim,
            **extra_config,
        )
    return _ready(unet)


def _controlnet_from(unet, seed: int):
    from diffusers import ControlNetModel

    # One downsampling step in the conditioning embedding, like the VAE, so a
    # control image at pixel size lands on the latent grid. The layers it does
    # not copy from the UNet get seeded random weights.
    with _seeded(seed):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    # ControlNet starts with zero-initialised output convolutions, which would
    # make it a no-op. Small random weights make the control image matter, so a
    # test can tell whether the controlnet actually ran.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
    return _ready(controlnet)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _qwen_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) and Qwen's chat special tokens."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = list(_byte_to_unicode().values())
    folder = _tokenizer_folder("qwen", {
        "vocab.json": json.dumps({token: i for i, token in enumerate(symbols + specials)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n",
        "tokenizer_config.json": json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                             "unk_token": None, "additional_special_tokens": specials[1:]}),
    })
    return Qwen2Tokenizer.from_pretrained(folder, local_files_only=True)


def _qwen_vl_token_ids(tokenizer) -> dict:
    """The special-token ids a Qwen-VL config asks for, mapped onto the byte-level tokenizer's few specials."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|endoftext|>"), ("video_token_id", "<|endoftext|>"),
        ("vision_start_token_id", "<|im_start|>"), ("vision_end_token_id", "<|im_end|>"))}
