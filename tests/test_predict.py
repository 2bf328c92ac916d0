"""The planner's predictions against what the runtime records, and its reports."""

import json
from pathlib import Path

import pytest

import offloadkit
from offloadkit.prediction.replay import predict
from offloadkit.prediction.schedule import CallSettings, schedule
from offloadkit.prediction.sizing import architecture_names
from offloadkit.testing import tiny_call_kwargs, tiny_pipeline

from helpers import golden_predictions

POLICIES = {
    "diffusers-default": "diffusers-default",
    "sequential": "sequential",
    "vae-resident": "vae-resident",
    "mixed": {"version": 1, "components": {"DENOISER": {"strategy": "group"}, "vae": {"strategy": "resident"}}},
    "group-pairs": {"version": 1, "components": {"*": {"strategy": "group", "num_blocks_per_group": 2}}},
    "leaf": {"version": 1, "components": {"*": {"strategy": "group", "offload_type": "leaf_level"}}},
    "prefetch": {"version": 1, "components": {"*": {"strategy": "model", "transfer": "copy-free", "prefetch": True}}},
    "keep": {"version": 1, "components": {"DENOISER": {"strategy": "model", "keep_on_device": True}}},
    "disk-block": {"version": 1, "components": {"*": {"strategy": "disk", "granularity": "block"}}},
    # declared precision: sizes planned before the weights are changed
    "fp8-storage": {"version": 1, "components": {
        "DENOISER": {"strategy": "group", "storage_dtype": "float8_e4m3fn"},
        "text_encoder": {"strategy": "model", "storage_dtype": "bfloat16"},
        "vae": {"strategy": "disk", "storage_dtype": "float8_e5m2"}}},
    "int8": {"version": 1, "components": {
        "DENOISER": {"strategy": "sequential", "quantize": "int8", "quantize_with": "torchao"},
        "text_encoder_2": {"strategy": "model", "quantize": "int8", "quantize_with": "quanto"}}},
    # resident blocks plus a stream of the rest, at several counts, prefetch depths and weight formats
    "stream-none": {"version": 1, "components": {"DENOISER": {"strategy": "stream", "resident": 0}}},
    "stream-spread": {"version": 1, "components": {"DENOISER": {"strategy": "stream", "resident": 1, "prefetch": 2}}},
    "stream-budget": {"version": 1, "budget": {"device_memory": "280KiB"},
                      "components": {"DENOISER": {"strategy": "stream", "placement": "last"}}},
    "stream-int8": {"version": 1, "components": {
        "DENOISER": {"strategy": "stream", "resident": "50%", "quantize": "int8", "quantize_with": "torchao"},
        "text_encoder": {"strategy": "stream", "blocks": ["encoder.layers"], "resident": 0}}},
    "stream-disk": {"version": 1, "components": {
        "DENOISER": {"strategy": "stream", "resident": 1, "from": "disk", "keep_on_device": True}}},
}
CASES = [("sdxl", name) for name in POLICIES] + [
    (pipeline, name) for pipeline in ("sd3", "controlnet") for name in ("diffusers-default", "mixed", "prefetch")] + [
    ("sd3", "stream-none"), ("sd3", "stream-spread")] + [
    # Qwen-Image (Qwen2.5-VL encoder) and Flux.1 Kontext (the VAE encodes the input image first, then decodes)
    (pipeline, name) for pipeline in ("qwen-image", "flux-kontext")
    for name in ("diffusers-default", "mixed", "prefetch", "stream-spread")] + [("qwen-image", "sequential")]


def _policy(name, pipe):
    policy = POLICIES[name]
    if isinstance(policy, dict):
        denoiser = "transformer" if "transformer" in pipe.components else "unet"
        components = {denoiser if k == "DENOISER" else k: v for k, v in policy["components"].items()}
        policy = {**policy, "components": components}
    return policy


@pytest.mark.parametrize("pipeline, policy_name", CASES)
def test_predicted_moves_and_peaks_equal_the_trace(pipeline, policy_name):
    pipe = tiny_pipeline(pipeline)
    policy = _policy(policy_name, pipe)
    prediction = predict(pipe, policy, device="cpu", settings=CallSettings(steps=2))
    handle = offloadkit.apply(pipe, policy, device="cpu")
    for _ in range(2):
        pipe(**tiny_call_kwargs(pipe))
    for call in (1, 2):  # the first call can differ (residency kept from it): both are predicted
        recorded = [(e.component, e.action, e.bytes, e.stage) for e in handle.trace.for_call(call)]
        predicted = [(e.component, e.action, e.bytes, e.stage) for e in prediction.events if e.call == call]
        assert predicted == recorded
    summary = handle.trace.calls_summary()[-1]
    assert {s.stage: s.traced_weights_bytes for s in prediction.stages if s.traced_weights_bytes is not None} \
        == summary.stage_peak_bytes
    assert prediction.traced_peak_bytes == summary.peak_resident_bytes
    assert prediction.bytes_moved == summary.bytes_moved
    assert {s.stage: s.bytes_moved for s in prediction.stages} == {
        stage: sum(e.bytes for e in handle.trace.for_call(2) if e.stage == stage)
        for stage in {e.stage for e in handle.trace.for_call(2)}} | {
        s.stage: 0 for s in prediction.stages if s.bytes_moved == 0}


def test_schedules_follow_the_pipelines_call_structure():
    steps = CallSettings(steps=3)
    assert schedule("StableDiffusionPipeline", ["text_encoder", "unet", "vae"], steps).forwards == (
        "text_encoder", "text_encoder", "unet", "unet", "unet", "vae")
    sdxl = ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert schedule("StableDiffusionXLPipeline", sdxl, steps).count("text_encoder") == 1
    assert schedule("StableDiffusionXLPipeline", sdxl, steps, force_zeros_for_empty_prompt=False).forwards[:4] == (
        "text_encoder", "text_encoder_2", "text_encoder", "text_encoder_2")
    wan = schedule("WanPipeline", ["text_encoder", "transformer", "vae"], steps)
    assert wan.count("transformer") == 6 and wan.count("text_encoder") == 2
    flux = schedule("FluxPipeline", ["text_encoder", "text_encoder_2", "transformer", "vae"], steps)
    assert flux.forwards == ("text_encoder", "text_encoder_2") + ("transformer",) * 3 + ("vae",)
    control = schedule("StableDiffusionControlNetPipeline", ["text_encoder", "unet", "controlnet", "vae"], steps)
    assert control.forwards[2:4] == ("controlnet", "unet") and not control.assumed
    assert schedule("SomeNewPipeline", ["text_encoder", "transformer", "vae"], steps).assumed
    # a variant of a checked family (img2img also runs the VAE's encoder): its family's rule, marked assumed
    assert schedule("StableDiffusionXLImg2ImgPipeline", sdxl, steps).assumed


GOLDEN = Path(__file__).parent / "golden" / "predictions"


@pytest.mark.parametrize("architecture", architecture_names())
def test_predictions_of_the_built_in_policies_match_golden(architecture):
    """A change of diffusers, torch or offloadkit that changes memory behaviour shows up as a diff here."""
    golden = json.loads((GOLDEN / f"{architecture}.json").read_text())
    assert json.loads(json.dumps(golden_predictions(architecture))) == golden, (
        "predictions changed: if intended, run tests/golden/regenerate.py and review the diff")


def test_each_architecture_is_predicted_in_the_dtype_its_checkpoint_ships_in():
    from offloadkit.prediction.sizing import shipped_dtype

    shipped = {name: shipped_dtype(name) for name in architecture_names()}
    assert shipped == {"flux1-dev": "bf16", "flux1-schnell": "bf16", "sd15": "fp16", "sd35-large": "bf16",
                       "sd35-medium": "bf16", "sdxl": "fp16", "wan21-t2v-1.3b": "bf16", "wan21-t2v-14b": "bf16",
                       "wan22-t2v-a14b": "bf16", "qwen-image": "bf16", "flux1-kontext-dev": "bf16"}
    flux = predict("flux1-dev", "diffusers-default")
    assert flux.settings["dtype"] == "bf16"
    t5 = {e.component: e.bytes for e in flux.events if e.action == "onload"}["text_encoder_2"]
    assert round(t5 / 2**30, 1) == 8.9  # bf16 keeps no layer in float32 (fp16 T5 keeps `wo`: 10.7 GiB)
    assert predict("flux1-dev", "diffusers-default", settings=CallSettings(dtype="fp16")).settings["dtype"] == "fp16"


def test_compute_is_counted_on_meta_and_call_time_adds_the_transfers_compute_does_not_hide():
    from offloadkit.prediction.compute import forward_flops
    from offloadkit.prediction.hardware import load_hardware
    from offloadkit.prediction.sizing import build_components

    unet = build_components("sdxl", dtype="fp16")["unet"]
    one = forward_flops(unet, height=1024, width=1024, batch=1, guidance=False)
    assert forward_flops(unet, height=1024, width=1024, batch=2, guidance=False) == 2 * one
    assert forward_flops(unet, height=1024, width=1024, batch=1, guidance=True) == 2 * one  # the CFG batch
    assert 5e12 < one < 9e12  # SDXL's UNet at 1024x1024: about 6-7 TFLOP a forward per image
    hardware = load_hardware("h100-80gb")
    resident = predict("sdxl", {"version": 1, "components": {"*": {"strategy": "resident"}}}, hardware=hardware)
    rate = hardware.compute * hardware.compute_efficiency
    assert resident.compute_seconds == pytest.approx(30 * 2 * one / rate, rel=0.05)  # the UNet dominates
    assert resident.call_seconds == pytest.approx(resident.compute_seconds)  # nothing moves in a later call
    offloaded = predict("sdxl", "diffusers-default", hardware=hardware)
    assert offloaded.compute_seconds == pytest.approx(resident.compute_seconds)
    for stage in offloaded.stages:
        hidden = min(stage.overlapped_seconds, stage.compute_seconds)
        assert stage.exposed_seconds == pytest.approx(stage.transfer_seconds + stage.overlapped_seconds - hidden)
    assert offloaded.call_seconds == pytest.approx(sum(s.compute_seconds + s.exposed_seconds
                                                       for s in offloaded.stages))
    assert offloaded.call_seconds > resident.call_seconds
    assert "predicted call time" in str(offloaded) and "all resident" in str(offloaded)
    # a loaded pipeline's models are not run to count them: no call time rather than a guess
    loaded = predict(tiny_pipeline("sd"), "diffusers-default", hardware=hardware)
    assert loaded.call_seconds is None and loaded.compute_seconds is None



def test_two_experts_switch_at_the_boundary_timestep_as_wans_pipeline_does():
    """Wan 2.2 A14B: `transformer` for timesteps at or above boundary_ratio * 1000, `transformer_2` below, with the
    scheduler's own timesteps (UniPC, flow shift 12 from the architecture's offloadkit.json)."""
    from diffusers import UniPCMultistepScheduler

    from offloadkit.prediction.schedule import expert_steps

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=12.0)
    scheduler.set_timesteps(30)
    high = [t for t in scheduler.timesteps if float(t) >= 875]
    assert expert_steps(30, 0.875, 12.0) == len(high) and 0 < len(high) < 30
    prediction = predict("wan22-t2v-a14b", "diffusers-default", settings=CallSettings(steps=30))
    counts = {name: prediction.schedule.count(name) for name in ("transformer", "transformer_2")}
    assert f"transformer x{2 * len(high)}" in prediction.schedule  # two forwards a step under guidance
    assert f"transformer_2 x{2 * (30 - len(high))}" in prediction.schedule
    assert counts and not prediction.schedule_assumed
    # each expert is onloaded once a call: the chain switches once, at the boundary
    onloads = [e.component for e in prediction.events if e.call == 2 and e.action == "onload"]
    assert onloads.count("transformer") == onloads.count("transformer_2") == 1
