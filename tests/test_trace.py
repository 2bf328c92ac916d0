"""Per-call totals, per-stage peaks from parameter sizes, and the budget check."""

import json
import warnings

import pytest
import torch

import offloadkit
from offloadkit.errors import BudgetExceededError, BudgetWarning, PolicyError
from offloadkit.units import parse_bytes
from offloadkit.testing import tiny_pipeline

from helpers import run


def sizes(handle):
    return {c.name: c.bytes for c in handle.plan.components}


def test_per_call_totals_and_stage_peaks_are_exact():
    pipe = tiny_pipeline("sdxl")
    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    size = sizes(handle)
    run(pipe)
    (summary,) = handle.trace.calls_summary()
    moved = size["text_encoder"] + size["text_encoder_2"] + size["unet"]
    assert summary.bytes_moved == 2 * moved  # each chained model on and off once
    # the VAE is resident all along; at most one chained model is on the device with it
    assert summary.stage_peak_bytes == {
        "encode": size["vae"] + max(size["text_encoder"], size["text_encoder_2"]),
        "denoise": size["vae"] + size["unet"],
    }
    assert summary.peak_resident_bytes == size["vae"] + size["unet"]
    assert summary.device_peak_bytes is None  # CPU: no allocator statistics
    assert handle.trace.resident == {"vae": size["vae"]}  # after the call only the resident VAE
    data = json.loads(handle.trace.to_json())
    assert data["per_call"][0]["peak_resident_bytes"] == summary.peak_resident_bytes
    assert "denoise" in handle.trace.summary()


def test_decode_stage_is_counted_when_the_vae_moves():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    run(pipe)
    size = sizes(handle)
    peaks = handle.trace.calls_summary()[0].stage_peak_bytes
    assert peaks == {"encode": size["text_encoder"], "denoise": size["unet"], "decode": size["vae"]}


def test_budget_warns_or_raises_when_resident_weights_exceed_it():
    pipe = tiny_pipeline("sd")
    unet_bytes = offloadkit.plan(pipe, "diffusers-default", device="cpu").component("unet").bytes
    tight = {"version": 1, "extends": "diffusers-default", "budget": {"device_memory": unet_bytes - 1}}
    handle = offloadkit.apply(pipe, tight, device="cpu")
    with pytest.warns(BudgetWarning, match="over the policy's budget.*unet"):
        run(pipe)
    offloadkit.apply(pipe, {**tight, "budget": {"device_memory": unet_bytes - 1, "on_exceed": "error"}},
                     device="cpu")
    with pytest.raises(BudgetExceededError, match="'unet' was onloaded"):
        run(pipe)
    # the failed call still ran the policy's end of call: nothing is left on the device
    assert pipe._offloadkit_handle.trace.resident == {}
    offloadkit.apply(pipe, {**tight, "budget": {"device_memory": "1GiB"}}, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(pipe)
    assert handle is not pipe._offloadkit_handle


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("7.5 GB", 7_500_000_000), ("512MiB", 2**29),
                                            (1024, 1024), ("100", 100)])
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["8 gigs", "-1GiB", 0, True, "GiB"])
def test_bad_sizes_are_policy_errors(bad):
    with pytest.raises(PolicyError, match="budget.device_memory"):
        offloadkit.load({"version": 1, "budget": {"device_memory": bad}})


@pytest.mark.parametrize("rule, tier", [({"strategy": "sequential"}, "cpu"), ({"strategy": "disk"}, "disk"),
                                        ({"strategy": "disk", "granularity": "block"}, "disk")])
def test_streamed_components_report_their_layer_loads_per_call(rule, tier):
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"unet": rule}}, device="cpu")
    run(pipe)
    run(pipe)
    unet_bytes = handle.plan.component("unet").bytes
    for call in (1, 2):
        (event,) = [e for e in handle.trace.for_call(call) if e.component == "unet"]
        assert event.action == "stream" and event.source == tier and event.target == "cpu:0"
        # two denoising steps with classifier-free guidance in one batch: the UNet's weights load twice
        assert event.bytes == 2 * unet_bytes
        assert event.seconds > 0
    assert "unet" not in handle.trace.resident
    assert handle.trace.calls_summary()[1].bytes_moved >= 2 * unet_bytes


class _MaterialisedWeights(torch.overrides.TorchFunctionMode):
    """Ground truth for streamed peaks: at every torch op, the bytes of streamed tensors not on `meta`.

    Streamed tensors are the (submodule, name) slots that hold meta tensors while idle; Accelerate
    puts new tensor objects in those slots when it materialises a layer, so slots are re-read each op.
    """

    def __init__(self, pipe):
        from offloadkit.runtime.trace import stage_of

        super().__init__()
        self.slots = []  # (stage, the submodule's _parameters or _buffers dict, key)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                for sub in component.modules():
                    for table in (sub._parameters, sub._buffers):
                        self.slots += [(stage_of(name), table, key) for key, tensor in table.items()
                                       if tensor is not None and tensor.device.type == "meta"]
        self.peaks = {}  # stage -> most bytes materialised at once

    def __torch_function__(self, func, types, args=(), kwargs=None):
        by_stage = {}
        for stage, table, key in self.slots:
            tensor = table.get(key)
            if tensor is not None and not tensor.is_meta:
                by_stage[stage] = by_stage.get(stage, 0) + tensor.nbytes
        for stage, total in by_stage.items():
            if total > self.peaks.get(stage, 0):
                self.peaks[stage] = total
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rule", [{"strategy": "sequential"}, {"strategy": "disk"},
                                  {"strategy": "disk", "granularity": "block"}])
def test_streamed_stage_peaks_equal_the_weights_materialised_at_once(rule):
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": rule}}, device="cpu")
    observed = _MaterialisedWeights(pipe)
    assert observed.slots, "every component streams: idle weights are meta tensors"
    with observed:
        run(pipe, num_inference_steps=1)
    (summary,) = handle.trace.calls_summary()
    assert set(observed.peaks) == {"encode", "denoise", "decode"}
    assert summary.stage_peak_bytes == observed.peaks
    assert summary.peak_resident_bytes == max(observed.peaks.values())
    # one piece at a time, not the whole model
    assert observed.peaks["denoise"] < handle.plan.component("unet").bytes
