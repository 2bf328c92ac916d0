"""Synthesis: the policy predicted fastest among those that fit, written as readable YAML."""

import numpy as np
import pytest
import yaml

import offloadkit
from offloadkit.prediction.replay import predict
from offloadkit.prediction.synthesis import SynthesisError, _offload_seconds, synthesize
from offloadkit.testing import tiny_call_kwargs, tiny_pipeline

from helpers import run


@pytest.fixture(scope="module")
def sdxl_8gib():
    return synthesize("sdxl", budget="8GiB")


def test_the_synthesised_policy_fits_and_beats_the_built_ins_that_fit(sdxl_8gib):
    result = sdxl_8gib
    assert result.prediction.device_peak_bytes <= result.limit_bytes == 8 * 2**30
    assert 0 < result.fitting <= result.candidates
    # no built-in policy that fits the same limit is predicted faster
    hardware = "rtx-4090-24gb"  # the nominal rates synthesis uses without a profile
    compared = 0
    for builtin in offloadkit.builtin_policies():
        if builtin == "controlnet-resident":
            continue  # names a component SDXL does not have
        prediction = predict("sdxl", builtin, hardware=hardware)
        if prediction.device_peak_bytes <= result.limit_bytes:
            compared += 1
            assert _offload_seconds(result.prediction) <= _offload_seconds(prediction), builtin
    assert compared >= 2

def test_the_yaml_is_a_valid_policy_that_predicts_the_same(sdxl_8gib, tmp_path):
    result = sdxl_8gib
    path = tmp_path / "policy.yaml"
    result.write(path)
    data = yaml.safe_load(path.read_text())
    assert set(data["components"]) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    again = predict("sdxl", str(path), hardware="rtx-4090-24gb")
    assert again.device_peak_bytes == result.prediction.device_peak_bytes
    assert again.bytes_moved == result.prediction.bytes_moved
    # every model's line says why it got its strategy
    text = path.read_text()
    for name in data["components"]:
        assert f"# {result.reasons[name]}\n  {name}:" in text
    assert "Predicted: peak device memory" in text
    # an existing file is never overwritten unless asked
    with pytest.raises(SynthesisError, match="exists; it was left as it is"):
        result.write(path)
    assert yaml.safe_load(path.read_text()) == data


def test_a_roomy_budget_keeps_everything_resident_and_a_tight_one_streams():
    roomy = synthesize("sd15", budget="24GiB")
    assert {rule.strategy for rule in roomy.policy.components.values()} == {"resident"}
    assert roomy.prediction.bytes_moved == 0
    tight = synthesize("sd15", budget="1GiB")
    strategies = {rule.strategy for rule in tight.policy.components.values()}
    assert strategies & {"group", "sequential"}
    assert tight.prediction.device_peak_bytes <= 2**30


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(SynthesisError, match=r"no policy fits budget 1.0 MiB. The closest searched policy is still "
                                             r"over on device memory: .* on a budget of 1.0 MiB, over by .*Lower the "
                                             r"resolution or batch, or pass --allow-quantize"):
        synthesize("sd15", budget="1MiB")


def test_synthesize_from_a_loaded_pipeline_gives_a_policy_that_runs():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    kwargs = tiny_call_kwargs(pipe)
    call = offloadkit.CallSettings(height=kwargs["height"], width=kwargs["width"], steps=kwargs["num_inference_steps"])
    everything = predict(pipe, {"version": 1, "components": {"*": {"strategy": "resident"}}}, device="cpu",
                         settings=call)
    budget = everything.device_peak_bytes - 1  # one byte short of keeping every model on the device
    result = offloadkit.synthesize(pipe, budget=budget, device="cpu", settings=call)
    assert result.prediction.device_peak_bytes <= budget
    assert {rule.strategy for rule in result.policy.components.values()} != {"resident"}
    handle = offloadkit.apply(pipe, result.policy, device="cpu")
    assert np.array_equal(run(pipe), reference)
    assert handle.trace.calls_summary()[-1].peak_resident_bytes <= result.prediction.weights_peak_bytes <= budget


def test_a_quantized_model_is_searched_only_with_strategies_its_backend_runs():
    from quantized import quantize

    pipe = tiny_pipeline("sd")
    quantize(pipe.unet, "quanto")  # quanto: no group, sequential or disk; `model` with the standard transfer
    reference = run(pipe)
    kwargs = tiny_call_kwargs(pipe)
    call = offloadkit.CallSettings(height=kwargs["height"], width=kwargs["width"], steps=kwargs["num_inference_steps"])
    # a budget only streaming everything (or a quanto UNet with group/sequential) would meet is not met
    result = offloadkit.synthesize(pipe, budget="64MiB", device="cpu", settings=call)
    unet = result.policy.components["unet"]
    assert unet.strategy in ("resident", "model") and getattr(unet, "transfer", "standard") == "standard"
    offloadkit.apply(pipe, result.policy, device="cpu")
    assert np.array_equal(run(pipe), reference)
    # the tightest budget for the others: the UNet still gets a strategy quanto can run
    tight = predict(pipe, {"version": 1, "components": {"*": {"strategy": "sequential"},
                                                         "unet": {"strategy": "model"}}}, device="cpu",
                    settings=call).device_peak_bytes
    result = offloadkit.synthesize(pipe, budget=tight, device="cpu", settings=call)
    assert result.policy.components["unet"].strategy in ("resident", "model")
    assert result.prediction.device_peak_bytes <= tight
    # one byte less and no policy a quanto UNet can run fits: said so, not answered with a refused strategy
    with pytest.raises(SynthesisError, match="no policy fits"):
        offloadkit.synthesize(pipe, budget=tight - 1, device="cpu", settings=call)


@pytest.mark.parametrize("architecture", ["flux1-dev", "wan21-t2v-14b", "qwen-image"])
def test_a_12gb_card_with_32gb_of_ram_gets_a_policy_that_fits_every_limit(architecture):
    """Issue 13's new user: the policy written for an RTX 3060 12 GB with 32 GB of RAM fits every limit, with the
    profile's headroom kept free, and `plan` of the written file says so."""
    result = synthesize(architecture, hardware="rtx-3060-12gb")
    assert result.prediction.fits
    limits = {c.limit: c for c in result.prediction.limits}
    assert limits["device memory"].headroom > 0 and limits["host RAM"].headroom > 0
    assert limits["device memory"].needed <= 12 * 2**30 - limits["device memory"].headroom
    assert limits["host RAM"].needed <= 32 * 2**30 - limits["host RAM"].headroom
    transformer = result.policy.components["transformer"]
    assert transformer.strategy == "stream"  # the denoiser does not fit whole
    # the count the plan found is written down (at apply, `auto` could not know the VAE decode's working memory)
    assert isinstance(transformer.resident, int) and transformer.resident > 0
    if architecture == "qwen-image":  # 38 GiB of bf16 weights beside 15 GiB of text encoder: not in 32 GiB of RAM
        assert transformer.source == "disk"
    assert "fits" in result.text and "OVER" not in result.text
    again = predict(architecture, result.policy, hardware="rtx-3060-12gb")
    assert again.fits and again.device_peak_bytes == result.prediction.device_peak_bytes


def test_quantize_is_searched_only_when_allowed_and_fp8_storage_after_the_exact_options():
    from offloadkit.prediction.synthesis import _options
    from offloadkit.prediction.sizing import spec_from_folder

    unet = spec_from_folder("sd15").get("unet")
    plain = _options(unet, "cuda", allow_quantize=False)
    assert not any("quantize" in rule for _, rule in plain)
    assert [penalty for penalty, _ in plain] == sorted(penalty for penalty, _ in plain)  # exact ones first
    assert any(rule.get("storage_dtype") == "float8_e4m3fn" for _, rule in plain)
    allowed = _options(unet, "cuda", allow_quantize=True)
    assert any(rule.get("quantize") == "int8" for penalty, rule in allowed if penalty == 2)
    assert {rule["strategy"] for _, rule in plain} >= {"resident", "model", "stream", "group", "sequential", "disk"}
