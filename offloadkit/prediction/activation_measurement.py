"""Measuring the working memory of real forwards: what `activations`' coefficients are set from.

`measure_peak` runs a call under a dispatch mode that counts every tensor storage an op
creates and subtracts it when freed (weights and inputs excluded), keeping the peak;
`example_forward` builds the call a pipeline would make, on zeros of the right shapes.
Used by `benchmarks/measure_activations.py` and the tests; needs real weights, not `meta`.
"""

from __future__ import annotations

import math
import weakref

from ..errors import ModelSourceError
from .activations import (
    _CFG_BATCHED,
    _FAMILIES,
    _ROLES,
    _T5_DEFAULT,
    CLIP_TOKENS,
    QWEN_TOKENS,
    T5_TOKENS,
    _describe,
    default_text_tokens,
)


def _live_tracker(known):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        """Adds each new storage an op returns, subtracts it when the storage is freed; keeps the peak."""

        def __init__(self):
            super().__init__()
            # weights and inputs, and views of them (weight.t(), ...): never counted
            self.known = {t.untyped_storage()._cdata for t in known}
            self.live: dict[int, int] = {}
            self.current = self.peak = 0
            self.kernels: set[str] = set()

        def _freed(self, key):
            self.current -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "attention" in func.__name__:
                self.kernels.add(func.__name__.split(".")[0])
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                    continue
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in self.live or key in self.known:
                    continue  # in-place ops and views return a storage already counted
                self.live[key] = storage.nbytes()
                self.current += self.live[key]
                self.peak = max(self.peak, self.current)
                # the Python storage object lives as long as the storage itself
                weakref.finalize(storage, self._freed, key)
            return out

    return LiveBytes()


def measure_peak(module, run, *, inputs=()) -> tuple[int, set[str]]:
    """Run ``run()`` under ``torch.no_grad`` and return (peak live bytes of tensors it created, attention kernels).

    Weights, buffers and `inputs` (tensors made before the call) are not counted; the output is.

    >>> import torch
    >>> layer = torch.nn.Linear(8, 16)
    >>> x = torch.zeros(4, 8)
    >>> measure_peak(layer, lambda: layer(x), inputs=[x])[0]
    256
    """
    import torch

    known = [*module.parameters(), *module.buffers(), *inputs]
    tracker = _live_tracker(known)
    with torch.no_grad(), tracker:
        result = run()
        del result
    return tracker.peak, tracker.kernels


def example_forward(module, *, role: str, height: int, width: int, batch: int = 1, guidance: bool = True,
                    num_frames: int | None = None, text_tokens: int | None = None, latent_scale: int | None = None,
                    reference_images: int = 0):
    """``(run, inputs)``: a call of the model's forward (or ``decode``) on zeros of the shapes a pipeline gives it.

    Uses the same batch, guidance, text-length and frame rules as `working_memory`; the model's
    own dtype and device. For measuring (needs real weights, not ``meta``).

    >>> from offloadkit.testing import tiny_pipeline
    >>> vae = tiny_pipeline("sd").vae
    >>> run, inputs = example_forward(vae, role="decode", height=32, width=32)
    >>> tuple(run().sample.shape)
    (1, 3, 32, 32)
    """
    import torch

    model = _describe(module)
    family = _FAMILIES.get(model.class_name)
    if family is None or _ROLES[family] != role:
        raise ModelSourceError(f"no example forward for {model.class_name!r} in role {role!r}")
    config = model.config
    param = next(module.parameters())
    dtype, device = param.dtype, param.device

    def zeros(*shape, dt=None):
        return torch.zeros(*shape, dtype=dt or dtype, device=device)

    if family in ("clip", "t5", "qwen_vl"):
        ids = torch.ones(batch, text_tokens or default_text_tokens(family, config), dtype=torch.long, device=device)
        if family == "clip":
            return (lambda: module(ids, output_hidden_states=True)), [ids]
        if family == "qwen_vl":  # as QwenImagePipeline calls it, with the text-only rope positions it would compute
            # (computing them reads values, which `meta` tensors, used to count FLOPs, do not have)
            mask = None if device.type == "meta" else torch.ones_like(ids)
            positions = torch.arange(ids.shape[1], device=device).view(1, 1, -1).expand(3, batch, -1)
            return (lambda: module(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   output_hidden_states=True)), [ids, positions] + ([mask] if mask is not None else [])
        return (lambda: module(ids)), [ids]
    if family == "vae":
        scale = 2 ** (len(config["block_out_channels"]) - 1)
        z = zeros(batch, config["latent_channels"], math.ceil(height / scale), math.ceil(width / scale))
        return (lambda: module.decode(z)), [z]
    if family in ("wan_vae", "qwen_vae"):
        scale = 2 ** (len(config["dim_mult"]) - 1)
        frames = 1 if family == "qwen_vae" else num_frames or 81
        z = zeros(batch, config["z_dim"], (frames - 1) // 4 + 1, math.ceil(height / scale), math.ceil(width / scale))
        return (lambda: module.decode(z)), [z]

    scale = latent_scale or 8
    h, w = math.ceil(height / scale), math.ceil(width / scale)
    b = batch * (2 if guidance and model.class_name in _CFG_BATCHED else 1)
    t = torch.ones(b, dtype=dtype, device=device)
    if family == "unet":
        cross = config["cross_attention_dim"]
        text = zeros(b, text_tokens or CLIP_TOKENS, max(cross) if isinstance(cross, (list, tuple)) else cross)
        sample = zeros(b, config["in_channels"], h, w)
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            width_text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            extra = {"added_cond_kwargs": {"text_embeds": zeros(b, width_text), "time_ids": zeros(b, 6)}}
        inputs = [text, sample, t] + list(extra.get("added_cond_kwargs", {}).values())
        return (lambda: module(sample, t, encoder_hidden_states=text, **extra)), inputs
    if family == "sd3":
        text = zeros(b, text_tokens or CLIP_TOKENS + T5_TOKENS["StableDiffusion3Pipeline"],
                     config["joint_attention_dim"])
        sample = zeros(b, config["in_channels"], h, w)
        pooled = zeros(b, config["pooled_projection_dim"])
        return (lambda: module(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=t)), \
            [text, sample, pooled, t]
    if family == "flux":
        tokens = text_tokens or _T5_DEFAULT
        n = math.ceil(h / 2) * math.ceil(w / 2) * (1 + reference_images)  # Kontext: the input image's tokens too
        sample = zeros(b, n, config["in_channels"])
        text = zeros(b, tokens, config["joint_attention_dim"])
        pooled = zeros(b, config["pooled_projection_dim"])
        img_ids, txt_ids = zeros(n, 3), zeros(tokens, 3)
        extra = {"guidance": t} if config.get("guidance_embeds") else {}
        return (lambda: module(sample, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                               img_ids=img_ids, txt_ids=txt_ids, **extra)), [sample, text, pooled, img_ids, txt_ids, t]
    if family == "qwen":
        tokens = text_tokens or QWEN_TOKENS
        sample = zeros(b, math.ceil(h / 2) * math.ceil(w / 2), config["in_channels"])
        text = zeros(b, tokens, config["joint_attention_dim"])
        mask = torch.ones(b, tokens, dtype=torch.long, device=device)
        shapes = [(1, math.ceil(h / 2), math.ceil(w / 2))] * b
        return (lambda: module(sample, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=t,
                               img_shapes=shapes)), [sample, text, mask, t]
    # wan
    frames = ((num_frames or 81) - 1) // 4 + 1
    sample = zeros(b, config["in_channels"], frames, h, w)
    text = zeros(b, text_tokens or _T5_DEFAULT, config["text_dim"])
    return (lambda: module(sample, t, encoder_hidden_states=text)), [sample, text, t]
