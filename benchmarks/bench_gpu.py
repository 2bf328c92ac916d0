"""Benchmark on a GPU: SDXL-sized random-weight pipeline under every offload method, diffusers vs offloadkit.

**Run on an H100** (2026-11-26, through ``benchmarks/gpu_session.sh``) for
diffusers-model, ok-pinned, diffusers-group, ok-group-all and ok-group-stream
(figures in the README); none and ok-copy-free ran once in a run cut short before
it printed. diffusers-sequential, ok-default, ok-pinned-prefetch, ok-sequential and
ok-disk have not run on a GPU (ok-default and ok-pinned-prefetch only on the tiny
pipeline, on the CPU).

What it measures, for a ``StableDiffusionXLPipeline`` whose components have the
sizes of SDXL base 1.0 -- a ``UNet2DConditionModel`` (block_out_channels
(320, 640, 1280), transformer_layers_per_block (1, 2, 10), cross_attention_dim
2048, "text_time" added embeddings: ~2.6B parameters), an ``AutoencoderKL``
(block_out_channels (128, 256, 512, 512): ~84M), a ``CLIPTextModel`` (CLIP ViT-L:
hidden 768, 12 layers: ~123M) and a ``CLIPTextModelWithProjection`` (OpenCLIP
bigG: hidden 1280, 32 layers, projection 1280: ~695M), 6.9 GB in fp16 -- built
from their published configs (written inline below) with random, seeded weights:
the models are created on the ``meta`` device (``accelerate.init_empty_weights``,
so no fp32 copy is ever allocated) and each parameter is then materialised on the
CPU in the benchmark dtype (fp16 on CUDA) from its own seeded generator, with
PyTorch's default initialisation rule (uniform +-1/sqrt(fan_in) for weights and
biases of linear/conv layers, ones/zeros for norms, N(0, 0.02) for embeddings).
Same ``--seed`` -> bit-identical weights in every process. The tokenizers are
offloadkit.testing's offline CLIP tokenizer (one token per byte, 77 tokens); the
text encoders keep CLIP's real vocab size (49408 rows) so their sizes are SDXL's,
with bos/eos/pad ids set to the tokenizer's. The VAE is built with
``force_upcast=False`` (as the fp16-fix SDXL VAE), so the pipeline never casts it
to fp32 in the middle of a call. The scheduler is SDXL's (``EulerDiscreteScheduler``,
scaled-linear betas 0.00085..0.012, leading spacing, steps_offset 1).

Methods (each in its own fresh child process: peak VRAM and host RSS are per method):

  none                  pipe.to(device): no offloading (the reference output)
  diffusers-model       pipe.enable_model_cpu_offload(device=...)
  diffusers-sequential  pipe.enable_sequential_cpu_offload(device=...)
  diffusers-group       pipe.enable_group_offload(device, offload_type="block_level",
                        num_blocks_per_group=1, use_stream=True)   (every component)
  ok-default            offloadkit.apply(pipe, "diffusers-default")
  ok-copy-free          {"*": {"strategy": "model", "transfer": "copy-free"}}
  ok-pinned             {"*": {"strategy": "model", "transfer": "pinned"}}
  ok-pinned-prefetch    {"*": {"strategy": "model", "transfer": "pinned", "prefetch": true}}
                        (time per call and peaks only: its uploads overlap the previous
                        model's work, so per-transition timing does not apply)
  ok-sequential         offloadkit.apply(pipe, "sequential")
  ok-group-stream       diffusers-default, but {"unet": {"strategy": "group", "use_stream": true,
                        "record_stream": true}} (block_level, 1 block per group)
  ok-group-all          {"*": {"strategy": "group", "use_stream": true}} (block_level, 1 block per
                        group): diffusers-group's own settings, through a policy
  ok-disk               {"*": {"strategy": "disk", "granularity": "block"}}

Per method: setup time (the offload switch / ``offloadkit.apply``), then one warm-up
call and ``--calls`` timed calls (median reported), each call
``pipe(prompt, num_inference_steps=--steps, height, width, guidance_scale=5.0,
generator=torch.Generator("cpu").manual_seed(--seed), output_type="np")`` with
``torch.cuda.synchronize()`` before and after the timer and ``gc.collect()``
outside it; ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` per call
(peak stats reset before each call) and ``memory_allocated`` at rest after setup;
host RSS after setup and the peak RSS of the timed calls (the kernel's VmHWM,
reset by writing 5 to /proc/self/clear_refs; ``ru_maxrss`` over the whole process
is also reported).

Component transitions (the model-offload methods: diffusers-model, ok-default,
ok-copy-free, ok-pinned). After the timed calls, ``--transition-calls`` more calls
are made with every ``pre_forward`` of the whole-model offload hooks timed: the
class methods ``accelerate.hooks.CpuOffload.pre_forward`` (diffusers) and
``offloadkit.runtime.strategies.model.ChainOffloadHook.pre_forward`` (offloadkit) are wrapped in the
child by a timer that calls ``torch.cuda.synchronize()`` before starting and
after the hook returns, so a non-blocking (pinned) onload is counted until the
copy has finished and no earlier GPU work is counted. ``UserCpuOffloadHook.offload``
is wrapped the same way, to split off the time spent offloading the previous
model of the chain. A component's *transition* is its first ``pre_forward`` of a
call (offload of the previous model in the chain + onload of this one); the UNet's
later ``pre_forward`` calls (one per denoising step) are reported as its
steady-state hook cost. The timed calls above are made without this timer (its
synchronisations would change them). For offloadkit the trace's own onload
seconds (``handle.trace``; not synchronised, so a pinned onload shows only the time
to queue it) are reported next to the synchronised figure.

Targets (from the issue):

* ``ok-pinned`` UNet transition at least 1.5x faster than ``diffusers-model``'s
  (ratio diffusers / offloadkit >= 1.5); the ratio is also printed for every
  component and for every model-offload method.
* ``ok-group-all`` and ``ok-group-stream`` time per call no slower than ``diffusers-group``.

Outputs: the image of every method's last timed call is compared with ``none``'s
(max abs difference; ``np.allclose(atol=--atol, rtol=0)``, default atol 1e-2 on
images in [0, 1], an fp16 tolerance), and each method's calls with each other.
Random fp16 weights can overflow; NaNs in an output are reported.

How to run on a GPU machine (from the repository root; install the CUDA build of
torch into ``.venv`` first, see the README). Each method runs in its own child
process. Filling the 3.5G random fp16 values took 53 s on one core of the
machine this was written on, so the first child saves the weights it built as
safetensors files under ``--weights-cache`` (default ``TMP/weights``, 6.9 GB; the
file names hold the seed and dtype) and the others load them; ``weights_from`` in
each result says which happened, and the weight fingerprints are compared.
On the H100: 5.2 GiB of GPU memory at most for the offloading methods, 13-16 GiB of
host RAM per child (weights + pinned copies), about 35 s per method after the first
(75 s, building and saving the weights)::

    .venv/bin/python benchmarks/bench_gpu.py --json bench_gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --methods none,diffusers-model,ok-pinned --calls 5
    .venv/bin/python benchmarks/bench_gpu.py --height 768 --width 768 --steps 10

Smoke test without a GPU (the tiny SDXL pipeline of ``offloadkit.testing``, fp32;
methods that need CUDA -- pinned transfers, streams -- are skipped with a note,
or, with ``--no-stream-on-cpu``, the two group methods run without streams;
``diffusers-sequential`` is skipped too: diffusers makes the device ``cpu:0``, on
which Accelerate's per-layer meta swap raises a TypeError)::

    .venv/bin/python benchmarks/bench_gpu.py --size tiny --device cpu

Options: ``--device`` (default cuda; without CUDA it prints one line and exits 0),
``--size sdxl|tiny``, ``--methods`` (comma-separated), ``--calls`` (default 3),
``--transition-calls`` (default 3), ``--steps`` (default 4), ``--height/--width``
(default 1024 for sdxl, 32 for tiny), ``--dtype auto|float16|bfloat16|float32``
(auto: fp16 on CUDA, fp32 on CPU), ``--seed``, ``--atol``, ``--threads``, ``--tmp``
(where ok-disk's files and the per-method result folders go), ``--json PATH``.
The exit status is 0 whatever the results (a crash in a child is reported as that
method's error; an exception in the parent still fails loudly).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import benchkit
from benchkit import read_status, reset_hwm, ru_maxrss_bytes

NO_CUDA_MESSAGE = "no CUDA device: this benchmark needs a GPU; nothing measured"

METHODS = ("none", "diffusers-model", "diffusers-sequential", "diffusers-group", "ok-default", "ok-copy-free",
           "ok-pinned", "ok-pinned-prefetch", "ok-sequential", "ok-group-stream", "ok-group-all", "ok-disk")
# Methods that cannot run on the CPU, and why.
NEEDS_ACCELERATOR = {
    "diffusers-sequential": "diffusers makes the device `cpu:0`, on which Accelerate's per-layer meta swap fails "
                            "(TypeError in post_forward); offloadkit's `sequential` normalises it to `cpu`",
    "diffusers-group": "use_stream=True needs CUDA streams",
    "ok-pinned": "`transfer: pinned` needs an accelerator (on the CPU it runs as `copy-free`: not this method)",
    "ok-pinned-prefetch": "`transfer: pinned` needs an accelerator (on the CPU it runs as `copy-free`: not this "
                          "method)",
    "ok-group-stream": "`use_stream: true` needs CUDA streams (on the CPU it runs without: not this method)",
    "ok-group-all": "`use_stream: true` needs CUDA streams (on the CPU it runs without: not this method)",
}
# Whole-model offload with CpuOffload-style hooks: their component transitions are timed.
MODEL_OFFLOAD = ("diffusers-model", "ok-default", "ok-copy-free", "ok-pinned")
LABELS = {
    "none": "pipe.to(device), no offload",
    "diffusers-model": "enable_model_cpu_offload",
    "diffusers-sequential": "enable_sequential_cpu_offload",
    "diffusers-group": "enable_group_offload(block_level, 1, use_stream)",
    "ok-default": "offloadkit diffusers-default",
    "ok-copy-free": "offloadkit model, transfer copy-free",
    "ok-pinned": "offloadkit model, transfer pinned",
    "ok-pinned-prefetch": "offloadkit model, pinned + prefetch",
    "ok-sequential": "offloadkit sequential",
    "ok-group-stream": "offloadkit unet group+stream, rest default",
    "ok-group-all": "offloadkit group+stream, every component",
    "ok-disk": "offloadkit disk, granularity block",
}
COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "unet", "vae")

PINNED_TARGET = 1.5  # diffusers-model / ok-pinned UNet transition time, at least

# --------------------------------------------------------------------------------------------------
# SDXL base 1.0 configs (stabilityai/stable-diffusion-xl-base-1.0, */config.json), written inline
# --------------------------------------------------------------------------------------------------

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    upcast_attention=None,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    # SDXL's own VAE says True (the pipeline then casts it to fp32 for decoding); the fp16-fix VAE
    # everyone runs in fp16 says False. False keeps the VAE in the benchmark dtype throughout.
    force_upcast=False,
)

# CLIP ViT-L/14 text tower (text_encoder/config.json)
SDXL_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# OpenCLIP ViT-bigG/14 text tower (text_encoder_2/config.json)
SDXL_TEXT_ENCODER_2 = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)

SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)

PROMPT = "a lighthouse at dusk"
GUIDANCE = 5.0


# --------------------------------------------------------------------------------------------------
# Building the pipeline (child side)
# --------------------------------------------------------------------------------------------------

def _dtype(name: str, device_type: str):
    import torch

    if name == "auto":
        return torch.float16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)


def _sdxl_tokenizer():
    """offloadkit.testing's offline CLIP tokenizer, with SDXL's 77-token length where possible.

    `_clip_tokenizer()` fixes model_max_length to the tiny models' 32; the folder it loads from
    (`_clip_tokenizer_dir()`, private) is reused here with 77. Fallback: the tiny pipeline's own
    tokenizer (32 tokens; the text encoders still have 77 positions).
    """
    from offloadkit import testing

    folder = getattr(testing, "_clip_tokenizer_dir", None)
    if folder is not None:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(folder(), local_files_only=True, model_max_length=77)
    return testing.tiny_pipeline("sdxl").tokenizer


def _materialise(model, seed: int, dtype) -> None:
    """Give every meta parameter real CPU storage in `dtype`, filled from its own seeded generator.

    PyTorch's default rule: weights of linear/conv layers (and their biases) uniform in
    +-1/sqrt(fan_in); 1-d weights of norm layers ones, their biases zeros; embeddings N(0, 0.02)
    (CLIP's own init). One generator per parameter, seeded from `seed` and the parameter's index, so
    the weights do not depend on thread counts or on anything built before.
    """
    import math

    import torch

    generator = torch.Generator("cpu")
    done: dict = {}
    index = 0
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        weight = module._parameters.get("weight")
        fan_in = None
        if weight is not None and weight.dim() >= 2:
            fan_in = weight.shape[1] * math.prod(weight.shape[2:])
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in done:  # tied: keep it tied
                module._parameters[name] = done[id(param)]
                continue
            generator.manual_seed(seed * 1_000_003 + index)
            index += 1
            tensor = torch.empty(param.shape, dtype=dtype, device="cpu")
            if isinstance(module, torch.nn.Embedding):
                tensor.normal_(0.0, 0.02, generator=generator)
            elif param.dim() >= 2:
                bound = 1.0 / math.sqrt(param.shape[1] * math.prod(param.shape[2:]))
                tensor.uniform_(-bound, bound, generator=generator)
            elif is_norm and name == "weight":
                tensor.fill_(1.0)
            elif is_norm and name == "bias":
                tensor.zero_()
            elif fan_in is not None:
                bound = 1.0 / math.sqrt(fan_in)
                tensor.uniform_(-bound, bound, generator=generator)
            else:
                tensor.zero_()
            new = torch.nn.Parameter(tensor, requires_grad=False)
            done[id(param)] = new
            module._parameters[name] = new
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if buffer.device.type == "meta":
                raise RuntimeError(f"buffer {name!r} of {type(module).__name__} was created on meta; "
                                   "cannot materialise it")
            if buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
    model.eval()
    model.requires_grad_(False)


def build_sdxl_pipeline(seed: int, dtype, materialise: bool = True):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _sdxl_tokenizer()
    tokenizer_2 = _sdxl_tokenizer()
    assert len(tokenizer) <= SDXL_TEXT_ENCODER["vocab_size"]
    # The pooled output is read at the first eos token: the ids must be our tokenizer's.
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (position ids) real
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **ids))
    # Different seeds per component: same-shaped weights must not be equal across components.
    for offset, model in enumerate((text_encoder, text_encoder_2, unet, vae)):
        if materialise:
            _materialise(model, seed * 10 + offset, dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    assert not materialise or all(p.device.type == "cpu" for p in pipe.unet.parameters())
    return pipe


def build_pipeline(size: str, seed: int, dtype, cache: str | None = None):
    """The benchmark pipeline, and where its weights came from ("built", "cache" or "built+cached")."""
    if size == "sdxl":
        if cache:
            pipe = load_cached_sdxl(cache, seed, dtype)
            if pipe is not None:
                return pipe, "cache"
        pipe = build_sdxl_pipeline(seed, dtype)
        if cache:
            save_sdxl_cache(pipe, cache, seed, dtype)
            return pipe, "built+cached"
        return pipe, "built"
    from offloadkit.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl", seed=seed)
    pipe.set_progress_bar_config(disable=True)
    if any(p.dtype != dtype for p in pipe.unet.parameters()):
        pipe.to(dtype)
    return pipe, "built"


# Filling 3.5G random values takes one core tens of seconds per method; the first child saves what it
# built and later children load it. The file name holds everything the weights depend on.
def _cache_files(cache: str, seed: int, dtype) -> dict:
    tag = f"sdxl-seed{seed}-{str(dtype).replace('torch.', '')}"
    return {name: os.path.join(cache, f"{tag}-{name}.safetensors") for name in COMPONENT_ORDER}


def save_sdxl_cache(pipe, cache: str, seed: int, dtype) -> None:
    from safetensors.torch import save_file

    os.makedirs(cache, exist_ok=True)
    for name, path in _cache_files(cache, seed, dtype).items():
        state = {k: v.contiguous() for k, v in getattr(pipe, name).state_dict().items()}
        partial = f"{path}.{os.getpid()}.partial"
        save_file(state, partial)
        os.replace(partial, path)  # a crash mid-write never leaves a file that looks complete


def load_cached_sdxl(cache: str, seed: int, dtype):
    """The pipeline from `save_sdxl_cache`'s files, or None when any is missing."""
    from safetensors.torch import load_file

    files = _cache_files(cache, seed, dtype)
    if not all(os.path.isfile(path) for path in files.values()):
        return None
    pipe = build_sdxl_pipeline(seed, dtype, materialise=False)
    for name, path in files.items():
        state = load_file(path)
        # Copies in anonymous memory, as freshly built weights are (not views of the file's pages).
        for key in list(state):
            state[key] = state[key].clone()
        model = getattr(pipe, name)
        model.load_state_dict(state, strict=True, assign=True)
        for module in model.modules():  # as _materialise: buffers not in the file (non-persistent) in dtype
            for key, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                    module._buffers[key] = buffer.to(dtype)
        model.requires_grad_(False)
        model.eval()
    if any(p.device.type == "meta" for name in COMPONENT_ORDER for p in getattr(pipe, name).parameters()):
        raise RuntimeError(f"the weights cache in {cache} left parameters on meta; delete it and rerun")
    return pipe


def call_kwargs(pipe, args) -> dict:
    import torch

    if args.size == "tiny":
        from offloadkit.testing import tiny_call_kwargs

        kwargs = tiny_call_kwargs(pipe, seed=args.seed)
    else:
        kwargs = {"prompt": PROMPT, "guidance_scale": GUIDANCE, "output_type": "np"}
    kwargs["num_inference_steps"] = args.steps
    kwargs["height"] = args.height
    kwargs["width"] = args.width
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)  # fresh, freshly seeded each call
    return kwargs


def weights_fingerprint(pipe) -> dict:
    """A cheap checksum per component (sum of a few parameters in float64): equal across processes."""
    out = {}
    for name in COMPONENT_ORDER:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        params = list(module.parameters())
        picked = params[:3] + params[-3:]
        out[name] = float(sum(p.detach().double().sum().item() for p in picked))
    return out


def component_bytes(pipe) -> dict:
    out = {}
    for name in COMPONENT_ORDER:
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return out


# --------------------------------------------------------------------------------------------------
# Setting up each method (child side)
# --------------------------------------------------------------------------------------------------

def policy_for(method: str, folder: str, device_type: str, no_stream: bool):
    if method == "ok-default":
        return "diffusers-default"
    if method == "ok-sequential":
        return "sequential"
    if method == "ok-copy-free":
        return {"version": 1, "name": "bench-copy-free", "components": {"*": {"strategy": "model",
                                                                          "transfer": "copy-free"}}}
    if method == "ok-pinned":
        return {"version": 1, "name": "bench-pinned", "components": {"*": {"strategy": "model",
                                                                       "transfer": "pinned"}}}
    if method == "ok-pinned-prefetch":
        return {"version": 1, "name": "bench-pinned-prefetch", "components": {"*": {
            "strategy": "model", "transfer": "pinned", "prefetch": True}}}
    if method == "ok-group-stream":
        stream = not no_stream
        return {"version": 1, "name": "bench-group-stream", "extends": "diffusers-default",
                "components": {"unet": {"strategy": "group", "offload_type": "block_level",
                                        "num_blocks_per_group": 1, "use_stream": stream,
                                        "record_stream": stream}}}
    if method == "ok-group-all":  # diffusers-group's settings, through a policy
        return {"version": 1, "name": "bench-group-all", "components": {"*": {
            "strategy": "group", "offload_type": "block_level", "num_blocks_per_group": 1,
            "use_stream": not no_stream}}}
    if method == "ok-disk":
        return {"version": 1, "name": "bench-disk", "components": {"*": {"strategy": "disk", "granularity": "block",
                                                                     "folder": folder}}}
    raise ValueError(method)


def setup_method(method: str, pipe, device, folder: str, no_stream: bool):
    """Put `pipe` under `method`; returns the offloadkit handle (or None)."""
    import torch

    if method == "none":
        pipe.to(device)
        return None
    if method == "diffusers-model":
        pipe.enable_model_cpu_offload(device=device)
        return None
    if method == "diffusers-sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return None
    if method == "diffusers-group":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1, use_stream=not no_stream)
        return None
    if method.startswith("ok-"):
        import offloadkit

        return offloadkit.apply(pipe, policy_for(method, folder, device.type, no_stream), device=str(device))
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------------------------------
# Measuring (child side)
# --------------------------------------------------------------------------------------------------

class TransitionTimer:
    """Synchronised wall time of every whole-model offload hook's pre_forward, and of offloads.

    Wraps the class methods, so it sees the hooks diffusers re-creates at the end of every call.
    """

    def __init__(self, sync, names: dict):
        self.sync = sync
        self.names = names  # id(component module) -> component name
        self.enabled = False
        self.calls: list = []  # per call: list of event dicts, in order
        self._depth = 0

    def begin_call(self) -> None:
        self.calls.append([])

    def _record(self, **event) -> None:
        if self.calls:
            self.calls[-1].append(event)

    def wrap_pre_forward(self, owner) -> None:
        original = owner.__dict__["pre_forward"]
        timer = self

        def pre_forward(hook, module, *args, **kwargs):
            if not timer.enabled or timer._depth:
                return original(hook, module, *args, **kwargs)
            timer._depth += 1
            timer.sync()
            start = time.perf_counter()
            try:
                return original(hook, module, *args, **kwargs)
            finally:
                timer.sync()
                elapsed = time.perf_counter() - start
                timer._depth -= 1
                timer._record(kind="pre_forward", component=timer.names.get(id(module), type(module).__name__),
                              seconds=elapsed, hook=type(hook).__name__)

        pre_forward.__wrapped__ = original
        setattr(owner, "pre_forward", pre_forward)

    def wrap_offload(self, owner) -> None:
        original = owner.__dict__["offload"]
        timer = self

        def offload(user_hook):
            if not timer.enabled:
                return original(user_hook)
            timer.sync()
            start = time.perf_counter()
            try:
                return original(user_hook)
            finally:
                timer.sync()
                timer._record(kind="offload", component=timer.names.get(id(user_hook.model), "?"),
                              seconds=time.perf_counter() - start, inside_pre_forward=bool(timer._depth))

        offload.__wrapped__ = original
        setattr(owner, "offload", offload)


def summarise_transitions(calls: list) -> dict:
    """Per component: transition (first pre_forward of a call), the offload inside it, steady pre_forwards."""
    per_component: dict = {}
    for events in calls:
        seen = set()
        pending_offload = 0.0
        for event in events:
            if event["kind"] == "offload":
                if event.get("inside_pre_forward"):
                    pending_offload += event["seconds"]
                continue
            name = event["component"]
            entry = per_component.setdefault(name, {"transition_s": [], "offload_prev_s": [], "steady_s": []})
            if name not in seen:
                seen.add(name)
                entry["transition_s"].append(event["seconds"])
                entry["offload_prev_s"].append(pending_offload)
            else:
                entry["steady_s"].append(event["seconds"])
            pending_offload = 0.0
    out = {}
    for name, entry in per_component.items():
        out[name] = {
            "transition_ms": _median_ms(entry["transition_s"]),
            "offload_prev_ms": _median_ms(entry["offload_prev_s"]),
            "steady_pre_forward_ms": _median_ms(entry["steady_s"]),
            "transition_samples_ms": [s * 1e3 for s in entry["transition_s"]],
        }
    per_call_totals = []
    for events in calls:
        seen, total = set(), 0.0
        for event in events:
            if event["kind"] == "pre_forward" and event["component"] not in seen:
                seen.add(event["component"])
                total += event["seconds"]
        per_call_totals.append(total)
    return {"components": out, "all_transitions_per_call_ms": _median_ms(per_call_totals)}


def _median_ms(samples):
    samples = [s for s in samples if s is not None]
    return statistics.median(samples) * 1e3 if samples else None


def predict_method(method: str, pipe, device, args) -> dict:
    """offloadkit.predict for the method's policy and this call's size (errors are recorded, not raised)."""
    import offloadkit
    from offloadkit.prediction.schedule import CallSettings

    try:
        settings = CallSettings(height=args.height, width=args.width, steps=args.steps, guidance=GUIDANCE > 1)
        prediction = offloadkit.predict(pipe, policy_for(method, "unused", device.type, args.no_stream),
                                        hardware=args.hardware or None, settings=settings, device=str(device))
    except Exception as error:  # noqa: BLE001 - a prediction problem must not lose the measurement
        return {"error": f"{type(error).__name__}: {error}"}
    return {"device_peak_bytes": prediction.device_peak_bytes, "traced_peak_bytes": prediction.traced_peak_bytes,
            "bytes_moved": prediction.bytes_moved, "transfer_seconds": prediction.transfer_seconds,
            "hardware": prediction.hardware}


def child_main(args) -> int:
    method = args.child
    result = {"method": method, "ok": False}
    out_dir = args.result_dir
    try:
        warnings.filterwarnings("ignore")
        import numpy as np
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cuda = device.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        if cuda:
            props = torch.cuda.get_device_properties(device)
            result["gpu"] = {"name": props.name, "total_memory": props.total_memory,
                             "cuda": torch.version.cuda}
        dtype = _dtype(args.dtype, device.type)
        result["dtype"] = str(dtype)

        # Instrument before anything is installed (class methods; enabled only for the transition calls).
        from accelerate.hooks import CpuOffload, UserCpuOffloadHook
        from offloadkit.runtime.strategies.model import ChainOffloadHook

        start = time.perf_counter()
        pipe, result["weights_from"] = build_pipeline(args.size, args.seed, dtype, args.weights_cache)
        result["build_s"] = time.perf_counter() - start
        result["weights_fingerprint"] = weights_fingerprint(pipe)
        result["component_bytes"] = component_bytes(pipe)
        names = {id(module): name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
        timer = TransitionTimer(sync, names)
        timer.wrap_pre_forward(CpuOffload)
        timer.wrap_pre_forward(ChainOffloadHook)
        timer.wrap_offload(UserCpuOffloadHook)
        gc.collect()
        result["rss_after_build"] = read_status().get("VmRSS")

        if method.startswith("ok-"):  # what the planner says before anything is installed
            result["predicted"] = predict_method(method, pipe, device, args)

        sync()
        start = time.perf_counter()
        handle = setup_method(method, pipe, device, os.path.join(out_dir, "disk"), args.no_stream)
        sync()
        result["setup_s"] = time.perf_counter() - start
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            result["vram_at_rest"] = torch.cuda.memory_allocated(device)
        result["rss_after_setup"] = read_status().get("VmRSS")
        result["ru_maxrss_before_calls"] = ru_maxrss_bytes()

        def one_call():
            kwargs = call_kwargs(pipe, args)  # outside the timer
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t0 = time.perf_counter()
            output = pipe(**kwargs)
            sync()
            elapsed = time.perf_counter() - t0
            peaks = None
            if cuda:
                peaks = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
            return elapsed, peaks, output.images

        # warm-up
        elapsed, peaks, _ = one_call()
        result["warmup_s"] = elapsed
        result["warmup_vram_peak"] = peaks[0] if peaks else None

        # timed calls
        hwm_reset = reset_hwm()
        times, vram, reserved, images = [], [], [], []
        for _ in range(args.calls):
            elapsed, peaks, image = one_call()
            times.append(elapsed)
            images.append(image)
            if peaks:
                vram.append(peaks[0])
                reserved.append(peaks[1])
        status = read_status()
        result["rss_call_peak"] = status.get("VmHWM") if hwm_reset else None
        result["call_s"] = times
        result["call_median_s"] = statistics.median(times)
        result["vram_peak_per_call"] = vram or None
        result["vram_peak_max"] = max(vram) if vram else None
        result["vram_reserved_peak_max"] = max(reserved) if reserved else None
        last = images[-1]
        if handle is not None:
            result["trace_timed_calls"] = [
                {"call": s.call, "bytes_moved": s.bytes_moved, "seconds_moving": s.seconds_moving,
                 "traced_peak_bytes": s.peak_resident_bytes, "device_peak_bytes": s.device_peak_bytes}
                for s in handle.trace.calls_summary()[-args.calls:]]
        result["stable_across_calls"] = bool(all(np.array_equal(last, img, equal_nan=True) for img in images))
        result["max_diff_across_calls"] = float(max(np.nanmax(np.abs(last - img)) for img in images))
        result["nan_count"] = int(np.isnan(last).sum())
        result["image_shape"] = list(last.shape)
        np.save(os.path.join(out_dir, "image.npy"), last)

        # component transitions, synchronised, in extra calls
        if method in MODEL_OFFLOAD and args.transition_calls > 0:
            first_call = handle.trace.calls + 1 if handle is not None else None
            timer.enabled = True
            for _ in range(args.transition_calls):
                timer.begin_call()
                kwargs = call_kwargs(pipe, args)
                pipe(**kwargs)
                sync()
            timer.enabled = False
            result["transitions"] = summarise_transitions(timer.calls)
            if handle is not None:
                trace_onloads: dict = {}
                for event in handle.trace:
                    if event.call >= first_call and event.action == "onload":
                        trace_onloads.setdefault(event.component, []).append(event.seconds)
                result["trace_onload_ms"] = {name: _median_ms(s) for name, s in trace_onloads.items()}
                result["trace_per_call"] = [
                    {"call": s.call, "bytes_moved": s.bytes_moved, "seconds_moving": s.seconds_moving,
                     "device_peak_bytes": s.device_peak_bytes}
                    for s in handle.trace.calls_summary()[-args.transition_calls:]]

        result["ru_maxrss"] = ru_maxrss_bytes()
        result["ok"] = True  # the process ends here: no remove() (ok-disk's files go with the parent's cleanup)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which carries on
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: one child per method, compare, report
# --------------------------------------------------------------------------------------------------

def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="execution device (default: cuda)")
    parser.add_argument("--size", default="sdxl", choices=("sdxl", "tiny"),
                        help="sdxl: SDXL-sized random-weight models; tiny: offloadkit.testing's tiny SDXL "
                             "pipeline, for a smoke test (default: sdxl)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per method after 1 warm-up (default: 3)")
    parser.add_argument("--transition-calls", type=int, default=3,
                        help="extra calls with synchronised hook timers, model-offload methods (default: 3)")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps (default: 4)")
    parser.add_argument("--height", type=int, default=None, help="default: 1024 (sdxl), 32 (tiny)")
    parser.add_argument("--width", type=int, default=None, help="default: 1024 (sdxl), 32 (tiny)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                        help="auto: float16 on CUDA, float32 on the CPU (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-2,
                        help="absolute tolerance on images in [0, 1] vs `none` (default: 1e-2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads in the children (default: 0 = torch's default)")
    parser.add_argument("--no-stream-on-cpu", dest="no_stream", action="store_true",
                        help="on the CPU, run diffusers-group and ok-group-stream without streams instead of "
                             "skipping them (exercises their code paths; not the GPU comparison)")
    parser.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "offloadkit-bench-gpu"),
                        help="parent folder of the per-method folders (ok-disk's files go there)")
    parser.add_argument("--weights-cache", default=None,
                        help="folder where the first method saves the SDXL-sized weights it built and later "
                             "methods (and later runs) load them (default: TMP/weights; 'none' to build "
                             "them in every method)")
    parser.add_argument("--hardware", default="",
                        help="hardware profile (name or YAML path, e.g. from `offloadkit calibrate`) for the "
                             "predicted transfer times printed next to the measured ones (default: none)")
    parser.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per method (default: 3600)")
    parser.add_argument("--json", dest="json_path", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.weights_cache is None:
        args.weights_cache = os.path.join(args.tmp, "weights")
    elif args.weights_cache.lower() == "none":
        args.weights_cache = ""
    default_pixels = 1024 if args.size == "sdxl" else 32
    args.height = args.height or default_pixels
    args.width = args.width or default_pixels
    return args


def run_child(method: str, args) -> dict:
    os.makedirs(args.tmp, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{method}-", dir=args.tmp)
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--result-dir", folder,
               "--device", args.device, "--size", args.size, "--calls", str(args.calls),
               "--transition-calls", str(args.transition_calls), "--steps", str(args.steps),
               "--height", str(args.height), "--width", str(args.width), "--dtype", args.dtype,
               "--seed", str(args.seed), "--threads", str(args.threads),
               "--weights-cache", args.weights_cache or "none", "--hardware", args.hardware]
    if args.no_stream:
        command.append("--no-stream-on-cpu")
    return benchkit.run_child(method, command, folder, args.child_timeout, "image.npy", _load_image)


def _load_image(path):
    import numpy as np

    return np.load(path)


def compare_images(results: dict, atol: float) -> dict:
    import numpy as np

    reference_name = "none" if "_image" in results.get("none", {}) else None
    if reference_name is None:
        reference_name = next((m for m, r in results.items() if "_image" in r), None)
    out = {"reference": reference_name, "atol": atol, "methods": {}}
    if reference_name is None:
        return out
    reference = results[reference_name]["_image"]
    for method, result in results.items():
        image = result.get("_image")
        if image is None:
            continue
        if image.shape != reference.shape:
            out["methods"][method] = {"max_abs_diff": None, "allclose": False, "identical": False,
                                      "note": f"shape {image.shape} vs {reference.shape}"}
            continue
        diff = np.abs(image.astype(np.float64) - reference.astype(np.float64))
        out["methods"][method] = {
            "max_abs_diff": float(np.nanmax(diff)) if diff.size and not np.isnan(diff).all() else None,
            "allclose": bool(np.allclose(image, reference, rtol=0.0, atol=atol, equal_nan=True)),
            "identical": bool(np.array_equal(image, reference, equal_nan=True)),
        }
    return out


def _gib(value) -> str:
    return f"{value / 2 ** 30:.2f}" if value is not None else "-"


def _ms(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("child", "result_dir", "json_path")}


def _clean(results: dict) -> dict:
    return {m: {k: v for k, v in r.items() if not k.startswith("_")} for m, r in results.items()}


def _write_json(path: str, payload: dict) -> None:
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(partial, path)


def _print_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def print_per_call(run: list, results: dict, comparison: dict, args) -> None:
    """Time, VRAM and RSS per method, and how its image compares with the reference."""
    header = (f"{'method':<21} {'setup s':>8} {'call ms':>10} {'VRAM peak GiB':>14} {'reserved':>9} "
              f"{'VRAM rest':>10} {'RSS setup':>10} {'RSS call pk':>12} {'RSS max':>8} {'max|d| vs ref':>14}  out")
    _print_header(header)
    for method in run:
        r = results[method]
        if not r.get("ok"):
            print(f"{method:<21} ERROR: {r.get('error', '?')}")
            continue
        cmp = comparison["methods"].get(method, {})
        diff = cmp.get("max_abs_diff")
        if cmp.get("identical"):
            verdict = "identical"
        elif cmp.get("allclose"):
            verdict = "close"
        else:
            verdict = "DIFFERENT"
        if r.get("nan_count"):
            verdict += f" ({r['nan_count']} NaN)"
        if not r.get("stable_across_calls"):
            verdict += f" (calls differ by {r.get('max_diff_across_calls'):.2g})"
        print(f"{method:<21} {r['setup_s']:>8.2f} {r['call_median_s'] * 1e3:>10.1f} {_gib(r.get('vram_peak_max')):>14} "
              f"{_gib(r.get('vram_reserved_peak_max')):>9} {_gib(r.get('vram_at_rest')):>10} "
              f"{_gib(r.get('rss_after_setup')):>10} {_gib(r.get('rss_call_peak')):>12} {_gib(r.get('ru_maxrss')):>8} "
              f"{(f'{diff:.3g}' if diff is not None else '-'):>14}  {verdict}")
    print(f"call ms: median of {args.calls}; VRAM: torch.cuda max_memory_allocated / max_memory_reserved per call "
          f"(max over calls), memory_allocated after setup; RSS in GiB (after setup, peak of the timed calls, "
          f"ru_maxrss of the process incl. the build); images vs {comparison.get('reference')!r}, "
          f"allclose atol={args.atol}")
    print()


def print_predicted(run: list, results: dict) -> None:
    """offloadkit.predict next to what the offloadkit methods measured."""
    predicted_rows = [m for m in run if results[m].get("ok") and results[m].get("predicted")]
    if predicted_rows:
        print("offloadkit.predict vs measured (per call; measured = median over the timed calls):")
        header = (f"{'method':<21} {'VRAM peak pred':>14} {'measured':>9} {'ratio':>6} {'moved GiB pred':>14} "
                  f"{'traced':>7} {'move s pred':>11} {'traced':>7} {'ratio':>6}")
        _print_header(header)
        for method in predicted_rows:
            r = results[method]
            p = r["predicted"]
            if "error" in p:
                print(f"{method:<21} prediction failed: {p['error']}")
                continue
            traced = r.get("trace_timed_calls") or []
            moved = statistics.median(c["bytes_moved"] for c in traced) if traced else None
            seconds = statistics.median(c["seconds_moving"] for c in traced) if traced else None
            peak_ratio = _ratio(p["device_peak_bytes"], r.get("vram_peak_max"))
            time_ratio = _ratio(p["transfer_seconds"], seconds)
            cells = [_gib(p["device_peak_bytes"]), _gib(r.get("vram_peak_max")), _fmt(peak_ratio, ".2f"),
                     _gib(p["bytes_moved"]), _gib(moved), _fmt(p["transfer_seconds"], ".3f"), _fmt(seconds, ".3f"),
                     _fmt(time_ratio, ".2f")]
            widths = (14, 9, 6, 14, 7, 11, 7, 6)
            print(f"{method:<21} " + " ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))
        print("VRAM: predicted device peak (weights + working memory) vs max_memory_allocated; move s: predicted "
              "transfer seconds (hardware profile: --hardware) vs the trace's seconds moving (non-blocking copies "
              "are counted until queued, not done)")
        print()


def print_transitions(run: list, results: dict) -> dict:
    """Synchronised component transitions of the model-offload methods; returns diffusers / offloadkit ratios."""
    transition_rows = [m for m in run if m in MODEL_OFFLOAD and results[m].get("transitions")]
    ratios = {}
    if transition_rows:
        print("component transitions (synchronised pre_forward of the whole-model hook: offload of the previous "
              "model + onload), ms, median of the transition calls:")
        comps = [c for c in COMPONENT_ORDER
                 if any(c in results[m]["transitions"]["components"] for m in transition_rows)]
        header = f"{'method':<17} " + " ".join(f"{c:>15}" for c in comps) + \
                 f" {'all/call':>10} {'unet offl.prev':>15} {'unet steady':>12} {'unet trace':>11}"
        _print_header(header)
        for method in transition_rows:
            t = results[method]["transitions"]
            unet = t["components"].get("unet", {})
            trace = (results[method].get("trace_onload_ms") or {}).get("unet")
            print(f"{method:<17} " + " ".join(f"{_ms(t['components'].get(c, {}).get('transition_ms')):>15}"
                                              for c in comps)
                  + f" {_ms(t['all_transitions_per_call_ms']):>10} {_ms(unet.get('offload_prev_ms')):>15}"
                    f" {_ms(unet.get('steady_pre_forward_ms')):>12} {_ms(trace):>11}")
        print("unet offl.prev: of the UNet transition, offloading text_encoder_2; unet steady: later pre_forwards "
              "(one per step); unet trace: offloadkit's own trace seconds for the onload (not synchronised)")
        baseline = results.get("diffusers-model", {}).get("transitions")
        if baseline:
            print()
            print("ratio diffusers-model / offloadkit per transition (higher = offloadkit faster):")
            header = f"{'method':<17} " + " ".join(f"{c:>15}" for c in comps) + f" {'all/call':>10}"
            _print_header(header)
            for method in transition_rows:
                if method == "diffusers-model":
                    continue
                t = results[method]["transitions"]
                row = {c: _ratio(baseline["components"].get(c, {}).get("transition_ms"),
                                 t["components"].get(c, {}).get("transition_ms")) for c in comps}
                row["all/call"] = _ratio(baseline["all_transitions_per_call_ms"], t["all_transitions_per_call_ms"])
                ratios[method] = row
                cells = [f"{row[c]:.2f}x" if row[c] else "-" for c in comps + ["all/call"]]
                print(f"{method:<17} " + " ".join(f"{cell:>15}" for cell in cells[:-1]) + f" {cells[-1]:>10}")
        print()
    return ratios


def evaluate_targets(run: list, results: dict, ratios: dict, device) -> list:
    """The issue's targets, each PASS, FAIL or n/a with its value."""
    targets = []
    pinned_ratio = ratios.get("ok-pinned", {}).get("unet")
    if pinned_ratio is None:
        why = "needs ok-pinned and diffusers-model on a CUDA device" if device.type != "cuda" or \
            not {"ok-pinned", "diffusers-model"} <= set(run) else "no transition measured (see errors above)"
        targets.append({"target": f"ok-pinned UNet transition >= {PINNED_TARGET}x faster than diffusers-model",
                        "value": None, "result": "n/a", "why": why})
    else:
        targets.append({"target": f"ok-pinned UNet transition >= {PINNED_TARGET}x faster than diffusers-model",
                        "value": pinned_ratio, "result": "PASS" if pinned_ratio >= PINNED_TARGET else "FAIL"})
    group_df = results.get("diffusers-group", {})
    streams = device.type != "cpu"
    for ours in ("ok-group-all", "ok-group-stream"):
        if ours not in run:
            continue
        group_ok = results.get(ours, {})
        target = f"{ours} time per call <= diffusers-group"
        if group_ok.get("ok") and group_df.get("ok"):
            ratio = group_ok["call_median_s"] / group_df["call_median_s"]
            verdict = "PASS" if ratio <= 1.0 else "FAIL"
            if not streams:
                verdict = "n/a (no streams on the CPU)"
            targets.append({"target": target, "value": ratio, "result": verdict})
        else:
            targets.append({"target": target, "value": None, "result": "n/a",
                            "why": f"needs {ours} and diffusers-group (both ran OK)"})
    return targets


def print_targets(targets: list) -> None:
    print("targets:")
    for t in targets:
        value = f"{t['value']:.3f}" if t["value"] is not None else "-"
        extra = f" ({t['why']})" if t.get("why") else ""
        print(f"  {t['target']:<62} value {value:>7}  {t['result']}{extra}")
    print("  (value: diffusers / offloadkit UNet transition time; offloadkit / diffusers time per call)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--flux" in argv:  # the FLUX.1-dev-sized `stream` benchmark (its own options: see bench_flux_stream.py)
        from bench_flux_stream import main as flux_main

        return flux_main([a for a in argv if a != "--flux"])
    args = _parse_args(argv)
    if args.child:
        return child_main(args)
    warnings.filterwarnings("ignore")

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE)
        return 0

    import offloadkit

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    notes = []
    run = []
    for method in methods:
        if device.type == "cpu" and method in NEEDS_ACCELERATOR:
            if args.no_stream and method in ("diffusers-group", "ok-group-stream", "ok-group-all"):
                notes.append(f"{method}: on the CPU without streams (--no-stream-on-cpu); not the GPU comparison")
                run.append(method)
            else:
                notes.append(f"{method}: skipped on the CPU ({NEEDS_ACCELERATOR[method]})")
            continue
        run.append(method)

    print(f"offloadkit {offloadkit.__version__} | size {args.size} | device {args.device} | dtype {args.dtype} | "
          f"{args.height}x{args.width}, {args.steps} steps, guidance {GUIDANCE} | calls {args.calls} "
          f"(+1 warm-up, +{args.transition_calls} transition calls for model offload) | torch {torch.__version__}")
    for note in notes:
        print(f"note: {note}")
    print(flush=True)

    results = {}
    for method in run:
        print(f"running {method:<22} ...", end=" ", flush=True)
        result = run_child(method, args)
        results[method] = result
        if result.get("ok"):
            transitions = (result.get("transitions") or {}).get("components", {})
            unet = transitions.get("unet", {}).get("transition_ms")
            print(f"done in {result['wall_s']:.1f} s (build {result.get('build_s', 0):.1f} s, "
                  f"{result.get('weights_from')}): call {result['call_median_s'] * 1e3:.0f} ms, "
                  f"VRAM peak {_gib(result.get('vram_peak_max'))} GiB"
                  + (f", unet transition {unet:.1f} ms" if unet is not None else ""), flush=True)
        else:
            print(f"FAILED: {result.get('error', '?')}", flush=True)
        if args.json_path:  # after every method, so a run cut short keeps what it measured
            _write_json(args.json_path, {"config": _config(args), "partial": True,
                                         "results": _clean(results)})
    print()

    comparison = compare_images(results, args.atol)
    gpu = next((r["gpu"] for r in results.values() if r.get("gpu")), None)
    if gpu:
        print(f"GPU: {gpu['name']}, {_gib(gpu['total_memory'])} GiB, CUDA {gpu['cuda']}")
    sizes = next((r["component_bytes"] for r in results.values() if r.get("component_bytes")), None)
    if sizes:
        print("components: " + ", ".join(f"{k} {_gib(v)} GiB" for k, v in sizes.items())
              + f" (total {_gib(sum(sizes.values()))} GiB)")
    fingerprints = {json.dumps(r.get("weights_fingerprint"), sort_keys=True)
                    for r in results.values() if r.get("weights_fingerprint")}
    if len(fingerprints) > 1:
        print("WARNING: the methods did not build the same weights (fingerprints differ)")
    print()

    print_per_call(run, results, comparison, args)
    print_predicted(run, results)
    ratios = print_transitions(run, results)
    targets = evaluate_targets(run, results, ratios, device)
    print_targets(targets)
    failed = [m for m in run if not results[m].get("ok")]
    if failed:
        print()
        for method in failed:
            print(f"--- {method} failed ---")
            print(results[method].get("traceback") or results[method].get("error"))

    if args.json_path:
        payload = {
            "config": _config(args),
            "environment": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "offloadkit": offloadkit.__version__,
                "diffusers": __import__("diffusers").__version__,
                "accelerate": __import__("accelerate").__version__,
                "transformers": __import__("transformers").__version__,
                "gpu": gpu,
            },
            "notes": notes,
            "results": _clean(results),
            "images": comparison,
            "transition_ratios_diffusers_over_offloadkit": ratios,
            "targets": targets,
        }
        _write_json(args.json_path, payload)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # 0 whatever the results; an exception in the parent still fails loudly
