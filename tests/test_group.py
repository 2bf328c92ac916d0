"""The `group` strategy: diffusers' group offloading engine configured from the policy."""

import pytest

import offloadkit
from offloadkit.errors import PolicyError
from offloadkit.testing import tiny_pipeline

from helpers import assert_same_images, run


def group_enabled(module):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return _is_group_offload_enabled(module)


def test_mixed_policy_encoders_model_unet_group_vae_resident():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    policy = {"version": 1, "components": {
        "unet": {"strategy": "group", "offload_type": "block_level", "num_blocks_per_group": 1},
        "vae": {"strategy": "resident"}}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert handle.plan.sequence == ("text_encoder", "text_encoder_2")
    assert handle.plan.component("unet").offloaded_by == "after each group"
    assert group_enabled(pipe.unet) and not group_enabled(pipe.text_encoder)
    for _ in range(2):
        assert_same_images(run(pipe), reference)
    # the chain runs in plan order, then the UNet's groups stream (summed into one event per call)
    assert [(e.component, e.action) for e in handle.trace.for_call(2)] == [
        ("text_encoder", "onload"), ("text_encoder", "offload"),
        ("text_encoder_2", "onload"), ("text_encoder_2", "offload"), ("unet", "stream")]
    unet_bytes, vae_bytes = handle.plan.component("unet").bytes, handle.plan.component("vae").bytes
    stream = handle.trace.for_call(2)[-1]
    assert stream.bytes == 2 * unet_bytes  # two denoising steps: every group loaded once per step
    # residency as planned: the VAE stays on the device throughout, the UNet never whole
    assert all(e.resident_bytes >= vae_bytes for e in handle.trace.for_call(2))
    assert set(handle.trace.resident) == {"vae"}
    # while denoising, the VAE plus one group at a time (never the whole UNet) is on the device
    denoise_peak = handle.trace.calls_summary()[1].stage_peak_bytes["denoise"]
    assert vae_bytes < denoise_peak < vae_bytes + unet_bytes
    handle.remove()
    assert not group_enabled(pipe.unet)
    assert_same_images(run(pipe), reference)


@pytest.mark.parametrize("rule", [
    {"strategy": "group", "offload_type": "leaf_level"},
    {"strategy": "group", "offload_type": "block_level", "num_blocks_per_group": 2},
    {"strategy": "group", "block_modules": ["encoder"]},
])
def test_group_options_keep_outputs(rule):
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    offloadkit.apply(pipe, {"version": 1, "components": {"text_encoder": rule, "unet": {**rule, "block_modules": None}}},
                     device="cpu")
    assert group_enabled(pipe.text_encoder) and group_enabled(pipe.unet)
    assert_same_images(run(pipe), reference)


def test_streams_of_a_gpu_policy_are_off_on_the_cpu_and_refused_in_a_cpu_policy():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    policy = {"version": 1, "components": {"unet": {"strategy": "group", "use_stream": True, "record_stream": True}}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    unet = handle.plan.component("unet")
    assert unet.options["use_stream"] is unet.options["record_stream"] is False
    assert "on cpu: no side stream (`use_stream: false`, `record_stream: false`)" in unet.reason
    assert group_enabled(pipe.unet)
    assert_same_images(run(pipe), reference)
    assert handle.trace.notes == handle.plan.notes and "unet runs with stand-ins" in handle.plan.notes[0]
    handle.remove()
    # written for the CPU, a stream is a mistake in the policy: refused before anything is installed
    with pytest.raises(PolicyError, match="components.unet: 'unet': `use_stream: true` needs an accelerator"):
        offloadkit.apply(pipe, {**policy, "device": "cpu"})
    assert not group_enabled(pipe.unet)


def test_record_stream_without_stream_is_a_validation_error():
    with pytest.raises(PolicyError, match="`record_stream: true` needs `use_stream: true`"):
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "group", "record_stream": True}}})


def test_group_rule_options_are_validated():
    with pytest.raises(PolicyError) as info:
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "group", "num_blocks_per_group": 0,
                                                               "offload_typ": "leaf_level"}}})
    message = str(info.value)
    assert "components.unet.num_blocks_per_group" in message
    assert "unknown key 'offload_typ'. Did you mean 'offload_type'?" in message


def test_remove_takes_group_offloading_off_every_model_including_nested_block_modules():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "group"}}}, device="cpu")
    assert all(group_enabled(m) for m in (pipe.vae, pipe.unet, pipe.text_encoder))
    run(pipe)
    handle.remove()
    # the VAE's hooks sit on its encoder and decoder (its `block_modules`), not on the VAE itself
    assert not any(group_enabled(m) for m in (pipe.vae, pipe.unet, pipe.text_encoder))
    assert_same_images(run(pipe), reference)
    offloadkit.apply(pipe, "diffusers-default", device="cpu")  # a policy can be applied again
    assert_same_images(run(pipe), reference)


def test_block_modules_group_a_clip_encoder_layer_by_layer():
    """`[encoder]` makes CLIP's layers (text_encoder.encoder.layers) the groups; without it, one group."""
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    rule = {"strategy": "group", "block_modules": ["encoder"]}
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"text_encoder": rule}}, device="cpu")
    # one group a layer, plus one for the rest (embeddings, final norm)
    assert _groups(pipe.text_encoder) == len(pipe.text_encoder.encoder.layers) + 1
    assert_same_images(run(pipe), reference)
    handle.remove()
    offloadkit.apply(pipe, {"version": 1, "components": {"text_encoder": {"strategy": "group"}}}, device="cpu")
    assert _groups(pipe.text_encoder) == 1
    offloadkit.remove(pipe)
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"text_encoder": {"strategy": "group"}}}, device="cpu")
    assert "finds no blocks in CLIPTextModel" in plan.component("text_encoder").reason
    assert "`block_modules: [encoder]`" in plan.component("text_encoder").reason


@pytest.mark.parametrize("block_modules, message", [
    (["encoder.block"], "has a dot, but each entry names one child module at one level. "
                        "Write the path as entries: `block_modules: [encoder]`"),
    (["nonexistent"], "has no submodule 'nonexistent' where `block_modules` looks"),
    ([], "finds no blocks in T5EncoderModel"),
    (["encoder", "block"], "entry 'block' is itself a list of blocks"),
])
def test_block_modules_that_match_nothing_are_located_errors(tmp_path, block_modules, message):
    from offloadkit.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(with_t5=True)
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ncomponents:\n  text_encoder_3:\n    strategy: group\n"
                      f"    block_modules: [{', '.join(block_modules)}]\n")
    with pytest.raises(PolicyError) as caught:
        offloadkit.apply(pipe, str(policy), device="cpu")
    text = str(caught.value)
    assert "p.yaml:5:" in text and message.replace("one level. ", "one level (diffusers matches names, not paths). ") in text
    assert not group_enabled(pipe.text_encoder_3)


def _groups(module):
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    found = set()
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if isinstance(registry, HookRegistry) else None
        if hook is not None:
            found.add(id(hook.group))
    return len(found)
