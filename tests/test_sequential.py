"""The `sequential` strategy and the built-in `sequential` policy against enable_sequential_cpu_offload."""

import pytest
import torch

import offloadkit
from offloadkit.testing import TINY_PIPELINES, tiny_pipeline

from helpers import assert_same_images, hooked_submodules, model_components, run, textual_inversion_case


def align_hooks(pipe):
    """Every Accelerate hook inside every model: (module path, hook kinds, offload flags, device type)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    found = set()
    for name, model in model_components(pipe).items():
        for sub_name, module in model.named_modules():
            hook = getattr(module, "_hf_hook", None)
            if hook is None:
                continue
            hooks = hook.hooks if isinstance(hook, SequentialHook) else (hook,)
            for h in hooks:
                assert isinstance(h, AlignDevicesHook)
                device = torch.device(h.execution_device).type if h.execution_device is not None else None
                found.add((f"{name}.{sub_name}", h.offload, h.offload_buffers, h.io_same_device, device))
    return found


@pytest.mark.parametrize("name", TINY_PIPELINES)
def test_hooks_match_enable_sequential_cpu_offload(name):
    ours = tiny_pipeline(name)
    offloadkit.apply(ours, "sequential", device="cpu")
    theirs = tiny_pipeline(name)
    theirs.enable_sequential_cpu_offload(device="cpu")  # builds the hooks; on CPU its calls fail (cpu:0)
    assert align_hooks(ours) == align_hooks(theirs)
    assert len(align_hooks(ours)) > 10


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_weights_are_on_meta_between_calls_and_outputs_equal(name):
    pipe = tiny_pipeline(name)
    reference = run(pipe)
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    handle = offloadkit.apply(pipe, "sequential", device="cpu")
    for _ in range(3):
        assert_same_images(run(pipe), reference)
        assert all(p.device.type == "meta" for p in pipe.unet.parameters())
    assert pipe._execution_device == torch.device("cpu", 0)
    handle.remove()
    assert hooked_submodules(pipe) == []
    restored = pipe.unet.state_dict()
    assert all(torch.equal(restored[k], v) and restored[k].device.type == "cpu" for k, v in weights.items())
    assert all(isinstance(p, torch.nn.Parameter) for p in pipe.unet.parameters())
    assert_same_images(run(pipe), reference)


def test_mixed_policy_model_sequential_resident():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    policy = {"version": 1, "components": {"unet": {"strategy": "sequential"}, "vae": {"strategy": "resident"}}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert handle.plan.sequence == ("text_encoder", "text_encoder_2")
    assert handle.plan.component("unet").offloaded_by == "after each layer"
    for _ in range(2):
        assert_same_images(run(pipe), reference)
    moved = {(e.component, e.action) for e in handle.trace}
    assert moved == {("text_encoder", "onload"), ("text_encoder", "offload"), ("text_encoder_2", "onload"),
                     ("text_encoder_2", "offload"), ("unet", "stream")}
    # replacing the policy takes our own sequential hooks away first
    offloadkit.apply(pipe, "diffusers-default", device="cpu")
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())
    assert_same_images(run(pipe), reference)


def test_wildcard_rule_yields_to_exclude_and_named_rules():
    pipe = tiny_pipeline("sd")
    policy = {"version": 1, "exclude": ["vae"],
              "components": {"*": {"strategy": "sequential"}, "text_encoder": {"strategy": "model"}}}
    plan = offloadkit.plan(pipe, policy, device="cpu")
    assert {c.name: c.strategy for c in plan.components} == {
        "text_encoder": "model", "unet": "sequential", "vae": "resident"}
    assert plan.component("unet").options == {"offload_buffers": "auto"}
    assert plan.sequence == ("text_encoder",)  # excluded and unchained models are left out of `auto`


def test_remove_puts_back_the_models_own_tensors_ties_and_dtype():
    from offloadkit.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(with_t5=True)
    t5 = pipe.text_encoder_3
    shared = t5.shared.weight
    assert t5.encoder.embed_tokens.weight is shared
    reference = run(pipe)
    handle = offloadkit.apply(pipe, "sequential", device="cpu")
    assert_same_images(run(pipe), reference)
    handle.remove()
    assert t5.shared.weight is shared and t5.encoder.embed_tokens.weight is shared
    assert_same_images(run(pipe), reference)

    # a dtype change made while the policy was applied survives remove()
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"transformer": {"strategy": "sequential"}}},
                              device="cpu")
    pipe.to(torch.float64)
    handle.remove()
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float64}
    run(pipe)  # no dtype mismatch


def test_textual_inversion_keeps_the_sequential_policy():
    """diffusers' loader strips the hooks, loads, and calls enable_sequential_cpu_offload(): the policy comes back."""
    embedding, expected = textual_inversion_case()

    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "sequential", device="cpu")
    pipe.load_textual_inversion({"<cat>": embedding.clone()}, token="<cat>")
    assert handle.active and handle.hooks_intact()
    assert all(p.device.type == "meta" for p in pipe.unet.parameters())
    assert_same_images(run(pipe, prompt="a <cat>"), expected)
    handle.remove()
    assert hooked_submodules(pipe) == []
    assert_same_images(run(pipe, prompt="a <cat>"), expected)


def test_save_pretrained_under_sequential_is_refused(tmp_path):
    from offloadkit.errors import PipelineError

    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "sequential", device="cpu")
    with pytest.raises(PipelineError, match="cannot be saved as they are.*offloadkit.remove"):
        pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
