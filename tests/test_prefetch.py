"""`model` with `prefetch`: the next model's upload starts when the model before it in the chain runs.

On CPU there is no side stream, so the upload happens at once; what these tests check (order of
moves, residency, stage peaks, the end of call, validation) is the same on CUDA, where
tests/test_gpu.py runs the side-stream copies.
"""

import pytest

import offloadkit
from offloadkit.errors import PolicyError
from offloadkit.testing import tiny_pipeline

from helpers import assert_same_images, run

PREFETCH_ALL = {"version": 1, "components": {"*": {"strategy": "model", "transfer": "copy-free", "prefetch": True}}}


def moves(handle, call):
    return [(e.component, e.action) for e in handle.trace.for_call(call)]


def test_each_model_is_uploaded_while_the_one_before_it_runs():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, PREFETCH_ALL, device="cpu")
    plan = handle.plan
    assert plan.sequence == ("text_encoder", "text_encoder_2", "unet", "vae")
    # the first model has nothing before it: the plan says so rather than failing the `*` rule
    assert plan.component("text_encoder").options["prefetch"] is False
    assert "not prefetched" in plan.component("text_encoder").reason
    assert "prefetched while text_encoder_2 runs" in plan.component("unet").reason
    for call in (1, 2):
        assert_same_images(run(pipe), reference)
        assert moves(handle, call) == [
            ("text_encoder", "onload"), ("text_encoder_2", "prefetch"),
            ("text_encoder", "offload"), ("unet", "prefetch"),
            ("text_encoder_2", "offload"), ("vae", "prefetch"),
            ("unet", "offload"), ("vae", "offload")]
    size = {c.name: c.bytes for c in plan.components}
    summary = handle.trace.calls_summary()[-1]
    # a prefetch counts for the stage that is running when it starts
    assert summary.stage_peak_bytes == {
        "encode": size["text_encoder_2"] + size["unet"],
        "denoise": size["unet"] + size["vae"],
        "decode": size["vae"],
    }
    assert handle.trace.resident == {}


def test_a_prefetched_model_that_is_not_used_is_offloaded_at_the_end_of_the_call():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "vae": {"strategy": "model", "transfer": "copy-free", "prefetch": True}}}, device="cpu")
    run(pipe, output_type="latent")  # the VAE never runs
    assert [m for m in moves(handle, 1) if m[0] == "vae"] == [("vae", "prefetch"), ("vae", "offload")]
    assert handle.trace.resident == {}


def test_the_next_model_is_prefetched_again_each_call_after_a_kept_one():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "unet": {"strategy": "model", "keep_on_device": True},
        "vae": {"strategy": "model", "transfer": "copy-free", "prefetch": True}}}, device="cpu")
    run(pipe)
    run(pipe)
    # the UNet stays on the device; the VAE is uploaded during its first step of each call
    assert ("vae", "prefetch") in moves(handle, 2) and ("unet", "onload") not in moves(handle, 2)
    assert set(handle.trace.resident) == {"unet"}


@pytest.mark.parametrize("rules, needle", [
    ({"text_encoder": {"strategy": "model", "transfer": "copy-free", "prefetch": True}},
     "components.text_encoder.prefetch: 'text_encoder' is first in `sequence`"),
    ({"unet": {"strategy": "model", "transfer": "copy-free", "prefetch": True}, "text_encoder": {"strategy": "resident"},
      "vae": {"strategy": "resident"}},
     "'unet' is first in `sequence`"),
])
def test_prefetch_without_a_model_before_it_is_refused(rules, needle):
    pipe = tiny_pipeline("sd")
    with pytest.raises(PolicyError, match=needle):
        offloadkit.apply(pipe, {"version": 1, "components": rules}, device="cpu")
    assert not hasattr(pipe.unet, "_hf_hook")


def test_prefetch_needs_a_kept_host_copy():
    with pytest.raises(PolicyError, match="`prefetch: true` needs `transfer: pinned`"):
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "model", "prefetch": True}}})


def test_a_prefetched_model_counts_against_the_budget():
    pipe = tiny_pipeline("sd")
    size = {c.name: c.bytes for c in offloadkit.plan(pipe, "diffusers-default", device="cpu").components}
    assert size["vae"] > size["text_encoder"]
    # room for the text encoder with the UNet prefetched beside it, not for the UNet with the VAE beside it
    budget = size["text_encoder"] + size["unet"]
    offloadkit.apply(pipe, {**PREFETCH_ALL, "budget": {"device_memory": budget, "on_exceed": "error"}}, device="cpu")
    with pytest.raises(offloadkit.BudgetExceededError, match="after 'vae' was onloaded.*unet .*vae "):
        run(pipe)
