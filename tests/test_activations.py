"""The working-memory estimate: close to measured forwards of the tiny models, sane for real architectures."""

from __future__ import annotations

import pytest
import torch

from offloadkit.prediction.activation_measurement import example_forward, measure_peak
from offloadkit.prediction.activations import (
    CUDA_RUNTIME_OVERHEAD,
    TOLERANCE,
    component_working_memory,
    working_memory,
)
from offloadkit.errors import DtypeError, ModelSourceError
from offloadkit.prediction.sizing import architecture_names, build_component
from offloadkit.plans.stages import STAGES, stage_of
from offloadkit.testing import tiny_pipeline

GiB, MiB = 2**30, 2**20
ROLES = {"vae": "decode", "unet": "denoise", "transformer": "denoise"}


@pytest.fixture(scope="module")
def tiny():
    return {name: tiny_pipeline(name) for name in ("sd", "sdxl", "sd3")}


def stage_working_memory(source, **call) -> dict:
    """Each stage's working memory: the largest of its models' (they run one after the other)."""
    stages = dict.fromkeys(STAGES, 0)
    for name, nbytes in component_working_memory(source, **call).items():
        stages[stage_of(name)] = max(stages[stage_of(name)], nbytes)
    return stages


def _cases():
    for name, components in (("sd", ("unet", "vae", "text_encoder")),
                             ("sdxl", ("unet", "text_encoder_2")),
                             ("sd3", ("transformer", "vae", "text_encoder"))):
        for component in components:
            sizes = (32, 64) if ROLES.get(component, "encode") != "encode" else (32,)
            for size in sizes:
                yield name, component, size


@pytest.mark.parametrize("name,component,size", list(_cases()))
def test_estimate_is_within_tolerance_of_the_measured_tiny_forward(tiny, name, component, size):
    module = tiny[name].components[component]
    role = ROLES.get(component, "encode")
    kwargs = dict(height=size, width=size, latent_scale=2)  # the tiny VAEs have 2 levels
    run, inputs = example_forward(module, role=role, **kwargs)
    measured, kernels = measure_peak(module, run, inputs=inputs)
    estimate = working_memory(module, role=role, dtype="fp32", **kwargs)
    assert TOLERANCE[0] <= estimate / measured <= TOLERANCE[1], (estimate, measured)
    assert all("flash" in k for k in kernels)  # CPU SDPA: no tokens^2 scores, as flash/mem-efficient on CUDA


def test_tracker_counts_new_tensors_not_weights_or_inputs():
    layer = torch.nn.Linear(8, 16)
    x = torch.zeros(4, 8)
    # (4, 16) output, float32; a transposed view of the weight is not counted
    assert measure_peak(layer, lambda: layer(x), inputs=[x])[0] == 4 * 16 * 4

    def two_temporaries():
        a = x * 2  # 128 B
        b = a + 1  # 128 B, both alive
        del a
        return b.sum()

    assert measure_peak(layer, two_temporaries, inputs=[x])[0] == 2 * 128


@pytest.fixture(scope="module")
def meta_models():
    return {
        "unet": build_component("sdxl", "unet"),
        "vae": build_component("sdxl", "vae"),
        "transformer": build_component("flux1-dev", "transformer"),
        "text_encoder_2": build_component("sd35-large", "text_encoder_3"),
    }


def test_works_on_meta_models_and_configs_alike(meta_models):
    unet = meta_models["unet"]
    from_module = working_memory(unet, role="denoise", height=1024, width=1024)
    from_config = working_memory(("UNet2DConditionModel", dict(unet.config)), role="denoise", height=1024, width=1024)
    assert from_module == from_config > 0


@pytest.mark.parametrize("component", ["unet", "vae", "transformer", "text_encoder_2"])
def test_monotonic_in_resolution_and_batch_and_half_in_fp16(meta_models, component):
    module = meta_models[component]
    role = ROLES.get(component, "encode")

    def wm(**kw):
        args = dict(role=role, height=512, width=512, batch=1, dtype="fp32") | kw
        return working_memory(module, **args)

    if role != "encode":  # text encoders do not see the image size
        assert wm(height=512) < wm(height=768) < wm(height=1024, width=1024)
    assert wm(batch=1) < wm(batch=2) < wm(batch=4)
    assert wm(dtype="fp16") == wm(dtype="bf16") == pytest.approx(wm(dtype="fp32") / 2, abs=1)


def test_guidance_doubles_only_where_the_pipeline_batches_it(meta_models):
    def ratio(module):
        kw = dict(role="denoise", height=1024, width=1024)
        return working_memory(module, guidance=True, **kw) / working_memory(module, guidance=False, **kw)

    assert ratio(meta_models["unet"]) == pytest.approx(2, rel=1e-6)  # SDXL: torch.cat([latents] * 2)
    assert ratio(meta_models["transformer"]) == 1  # FLUX.1: guidance-distilled, no doubled batch


def test_role_and_class_errors(meta_models):
    with pytest.raises(ModelSourceError, match="decode"):
        working_memory(meta_models["vae"], role="denoise", height=64, width=64)
    with pytest.raises(ModelSourceError, match="no working-memory formula for 'UNet3DConditionModel'"):
        working_memory(("UNet3DConditionModel", {}), role="denoise", height=64, width=64)
    with pytest.raises(ModelSourceError, match="Linear has no config"):
        working_memory(torch.nn.Linear(2, 2), role="encode", height=64, width=64)


# Plausible ranges, fp16 (bf16 for FLUX/Wan), batch 1, guidance on. What they rest on:
# - SDXL VAE decode at 1024^2 without tiling: the pipeline upcasts the VAE to fp32 (force_upcast),
#   and the last up blocks hold 128-256 channels x 1024^2 pixels x 4 B = 0.5-1 GiB per tensor, a
#   few of them at once: a few GiB, which is why diffusers offers enable_vae_tiling/slicing and why
#   SDXL needs more than 8 GB cards without them.
# - Denoisers: one layer's activations (tokens x width x a few tens of bytes) at 1024^2:
#   4096 image tokens for SD3/FLUX, 16384 latent pixels at the UNet's first level; Wan 2.1 at
#   480x832x81 has 21 x 30 x 52 = 32760 tokens. Hundreds of MiB to a few GiB, well below the weights.
# - Wan 2.1 VAE decode at 480x832x81: one latent frame (4 video frames) at full resolution with
#   96-192 channels and its causal cache, plus the decoded video twice: a few GiB.
# - Text encoders: 77 (CLIP) to 512 (T5) tokens: MiB to a few hundred MiB.
RANGES = {
    "sd15": {"encode": (1 * MiB, 64 * MiB), "denoise": (256 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    "sdxl": {"encode": (1 * MiB, 64 * MiB), "denoise": (256 * MiB, 4 * GiB), "decode": (2 * GiB, 8 * GiB)},
    "sd35-large": {"encode": (16 * MiB, 1 * GiB), "denoise": (128 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    "sd35-medium": {"encode": (16 * MiB, 1 * GiB), "denoise": (128 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    "flux1-dev": {"encode": (16 * MiB, 1 * GiB), "denoise": (128 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    # Kontext's transformer sees the input image's tokens too: about twice Flux's
    "flux1-kontext-dev": {"encode": (16 * MiB, 1 * GiB), "denoise": (512 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    "flux1-schnell": {"encode": (16 * MiB, 1 * GiB), "denoise": (128 * MiB, 4 * GiB), "decode": (512 * MiB, 4 * GiB)},
    "wan21-t2v-1.3b": {"encode": (16 * MiB, 1 * GiB), "denoise": (512 * MiB, 8 * GiB), "decode": (1 * GiB, 24 * GiB)},
    "wan21-t2v-14b": {"encode": (16 * MiB, 1 * GiB), "denoise": (512 * MiB, 8 * GiB), "decode": (1 * GiB, 24 * GiB)},
    # the same experts' shape as 2.1 14B: the same working memory
    "wan22-t2v-a14b": {"encode": (16 * MiB, 1 * GiB), "denoise": (512 * MiB, 8 * GiB), "decode": (1 * GiB, 24 * GiB)},
    # Qwen2.5-VL's logits (546 tokens x 152,064) are most of its encode; the VAE decodes one 1024 px frame
    "qwen-image": {"encode": (128 * MiB, 1 * GiB), "denoise": (128 * MiB, 4 * GiB), "decode": (1 * GiB, 8 * GiB)},
}


def test_every_builtin_architecture_has_a_plausible_estimate_per_stage():
    assert sorted(RANGES) == architecture_names()
    for name, ranges in RANGES.items():
        video = name.startswith("wan")
        stages = stage_working_memory(name, height=480 if video else 1024, width=832 if video else 1024, batch=1,
                                      dtype="bf16" if name.startswith(("flux", "wan", "qwen")) else "fp16", guidance=True,
                                      num_frames=81 if video else None)
        for stage, (low, high) in ranges.items():
            assert low <= stages[stage] <= high, (name, stage, stages[stage] / MiB)


def test_sdxl_decodes_in_fp32_and_stages_take_the_largest_component():
    stages = stage_working_memory("sdxl", height=1024, width=1024, batch=1, dtype="fp16", guidance=True)
    vae = working_memory(build_component("sdxl", "vae"), role="decode", height=1024, width=1024, dtype="fp32")
    assert stages["decode"] == vae  # StableDiffusionXLPipeline upcasts a force_upcast VAE
    sd15 = stage_working_memory("sd15", height=512, width=512, batch=1, dtype="fp16", guidance=True)
    assert sd15["decode"] == working_memory(build_component("sd15", "vae"), role="decode", height=512, width=512)
    # the per-model figures the planner uses: each stage is the largest of its models
    per_model = component_working_memory("sdxl", height=1024, width=1024, dtype="fp16")
    assert set(per_model) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert stages["encode"] == max(per_model["text_encoder"], per_model["text_encoder_2"])
    assert (stages["denoise"], stages["decode"]) == (per_model["unet"], per_model["vae"])


def test_loaded_pipeline_source(tiny):
    stages = stage_working_memory(tiny["sd"], height=32, width=32, batch=1, dtype="fp32", guidance=True)
    assert stages["decode"] == working_memory(tiny["sd"].vae, role="decode", height=32, width=32, dtype="fp32")
    assert all(v > 0 for v in stages.values())


def test_cuda_runtime_overhead_is_a_separate_constant():
    assert 256 * MiB <= CUDA_RUNTIME_OVERHEAD <= 1 * GiB
