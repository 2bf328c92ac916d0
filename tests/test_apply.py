"""apply / remove / plan on live tiny pipelines: state ownership, errors, trace, exceptions."""

import json
from pathlib import Path

import pytest
import torch

import offloadkit
from offloadkit.errors import DeviceError, PipelineError, PolicyError
from offloadkit.testing import tiny_pipeline

from helpers import (
    assert_same_images,
    hook_structure,
    hooked_submodules,
    model_components,
    run,
    textual_inversion_case,
)

GOLDEN = Path(__file__).parent / "golden"


def test_remove_restores_the_pipeline():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    base_class = type(pipe)
    devices = {n: next(m.parameters()).device for n, m in model_components(pipe).items()}
    forwards = {n: m.forward for n, m in model_components(pipe).items()}

    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    assert type(pipe) is not base_class and isinstance(pipe, base_class)
    assert type(pipe).__name__ == base_class.__name__
    run(pipe)
    handle.remove()

    assert type(pipe) is base_class
    assert hooked_submodules(pipe) == []
    assert not hasattr(pipe, "_offloadkit_handle")
    assert {n: next(m.parameters()).device for n, m in model_components(pipe).items()} == devices
    for name, module in model_components(pipe).items():
        assert module.forward == forwards[name]
    assert_same_images(run(pipe), reference)
    handle.remove()  # a second remove is harmless
    offloadkit.remove(pipe)  # so is removing from a pipeline without a policy


def test_offloadkit_remove_is_handle_remove():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    offloadkit.remove(pipe)
    assert not handle.active
    assert hooked_submodules(pipe) == []


def test_apply_again_replaces_the_policy():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    first = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    second = offloadkit.apply(pipe, "vae-resident", device="cpu")
    assert not first.active and second.active
    assert pipe._offloadkit_handle is second
    assert not hasattr(pipe.vae, "_hf_hook")
    assert pipe.unet._hf_hook is second.hook("unet")
    assert type(pipe).__mro__[1].__name__ == "StableDiffusionXLPipeline"  # subclassed once, not twice
    assert_same_images(run(pipe), reference)
    second.remove()
    assert hooked_submodules(pipe) == []


def test_resident_components_do_not_travel_per_call():
    """A resident model is placed once at apply and never moved by a call."""
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    moves = []
    original_to = pipe.vae.to
    pipe.vae.to = lambda *a, **k: (moves.append(a), original_to(*a, **k))[1]
    for _ in range(3):
        assert_same_images(run(pipe), reference)
    assert moves == []
    assert all(e.component != "vae" for e in handle.trace)
    assert pipe._execution_device == torch.device("cpu", 0)



def test_trace_records_moves_per_call():
    pipe = tiny_pipeline("sdxl")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    run(pipe)
    run(pipe)
    assert handle.trace.calls == 2
    for call in (1, 2):
        events = [(e.component, e.action) for e in handle.trace.for_call(call)]
        assert events == [
            ("text_encoder", "onload"), ("text_encoder", "offload"),
            ("text_encoder_2", "onload"), ("text_encoder_2", "offload"),
            ("unet", "onload"), ("unet", "offload"),
            ("vae", "onload"), ("vae", "offload"),
        ]
    sizes = {c.name: c.bytes for c in handle.plan.components}
    for event in handle.trace:
        assert event.bytes == sizes[event.component] > 0
        assert event.seconds >= 0
    assert handle.trace.bytes_moved(1) == 2 * sum(sizes.values())
    data = json.loads(handle.trace.to_json())
    assert data["calls"] == 2 and len(data["events"]) == 16
    assert "16 moves" in handle.trace.summary()


def test_exception_mid_call_leaves_the_pipeline_usable():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")

    def explode(pipeline, step, timestep, callback_kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run(pipe, callback_on_step_end=explode)
    # The policy's end of call ran anyway: nothing the chain onloaded is still on the device.
    assert not any(state.resident for state in handle._states.values())
    failed = handle.trace.for_call(1)
    assert ("unet", "offload") in [(e.component, e.action) for e in failed]
    assert pipe.unet._hf_hook is handle.hook("unet")
    assert_same_images(run(pipe), reference)
    assert_same_images(run(pipe), reference)


def test_execution_device_comes_from_the_policy():
    """diffusers asks the first component; here it is skipped (no hook), yet latents go to the policy's device."""
    pipe = tiny_pipeline("sd")
    assert next(iter(pipe.components)) == "vae"
    offloadkit.apply(pipe, {"version": 1, "components": {"vae": {"strategy": "skip"}}}, device="cpu")
    assert not hasattr(pipe.vae, "_hf_hook")
    assert pipe._execution_device == torch.device("cpu", 0)
    offloadkit.remove(pipe)
    assert pipe._execution_device == torch.device("cpu")


def test_plan_does_not_touch_the_pipeline():
    pipe = tiny_pipeline("controlnet")
    before = {n: (m.forward, next(m.parameters()).device) for n, m in model_components(pipe).items()}
    plan = offloadkit.plan(pipe, "controlnet-resident", device="cpu")
    assert hooked_submodules(pipe) == []
    assert not hasattr(pipe, "_offloadkit_handle")
    assert {n: (m.forward, next(m.parameters()).device) for n, m in model_components(pipe).items()} == before
    assert plan.sequence == ("text_encoder", "vae")
    assert plan.component("unet").strategy == "resident"
    assert plan.component("controlnet").strategy == "resident"
    assert plan.component("text_encoder").offloaded_by == "vae"
    text = str(plan)
    assert "offload chain: text_encoder -> vae" in text and "controlnet" in text


@pytest.mark.parametrize("name, policy", [("sdxl", "vae-resident"), ("controlnet", "diffusers-default")])  # = regenerate.CASES
def test_plan_to_dict_matches_golden(name, policy):
    """Checked-in plans: a change of diffusers or offloadkit that changes placement shows up as a diff."""
    plan = offloadkit.plan(tiny_pipeline(name), policy, device="cpu")
    golden = json.loads((GOLDEN / f"{name}-{policy}.json").read_text())
    assert plan.to_dict() == golden, "plan changed: if intended, run tests/golden/regenerate.py and review the diff"


def test_controlnet_outside_sequence_has_its_own_hook():
    pipe = tiny_pipeline("controlnet")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    assert handle.plan.component("controlnet").offloaded_by == "end of call"
    assert pipe.controlnet._hf_hook.prev_module_hook is None
    run(pipe)
    last = [(e.component, e.action) for e in handle.trace.for_call(1)][-1]
    assert last == ("controlnet", "offload")


def test_device_auto_without_accelerator_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    pipe = tiny_pipeline("sd")
    with pytest.raises(DeviceError, match="no accelerator \\(the policy's `device: auto`\\).*Pass device='cpu'"):
        offloadkit.apply(pipe, "diffusers-default")
    assert hooked_submodules(pipe) == []
    # a dry run plans it on the CPU instead, and says so
    plan = offloadkit.plan(pipe, "diffusers-default")
    assert plan.device == "cpu:0"
    assert plan.notes == ("this machine has no accelerator (the policy's `device: auto`): planned on the CPU "
                          "instead",)


@pytest.mark.parametrize("device, needle", [("cuda:7", "not available|does not exist"), ("cpu:1", "only index 0"),
                                            ("tpu", "invalid device")])
def test_bad_devices(device, needle):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("meaningful only without CUDA")
    with pytest.raises(DeviceError, match=needle):
        offloadkit.plan(tiny_pipeline("sd"), "diffusers-default", device=device)


def test_device_cpu_resolves_to_a_full_device():
    plan = offloadkit.plan(tiny_pipeline("sd"), {"version": 1, "device": "cpu"})
    assert plan.device == "cpu:0"


def test_names_are_checked_against_the_pipeline(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nsequence: [text_encoder, unet, image_encoder]\n"
                    "components:\n  unet2: {strategy: resident}\n  tokenizer: {strategy: resident}\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.plan(tiny_pipeline("sd"), str(path), device="cpu")
    message = str(info.value)
    assert f"{path}:4:3 components.unet2: StableDiffusionPipeline has no component 'unet2'. Did you mean 'unet'?" in message
    assert f"{path}:5:3 components.tokenizer: 'tokenizer' is a CLIPTokenizer, not a model" in message
    assert f"{path}:2:32 sequence.2: 'image_encoder' is not loaded in this pipeline" in message
    assert len(info.value.problems) == 3


def test_quantization_refuse_and_keep(monkeypatch):
    def quantized_sd():
        pipe = tiny_pipeline("sd")
        pipe.text_encoder.is_loaded_in_4bit = True
        pipe.text_encoder.quantization_method = "bitsandbytes"
        return pipe

    with pytest.raises(PolicyError, match="'text_encoder' is bitsandbytes 4-bit.*bnb_4bit: refuse"):
        offloadkit.plan(quantized_sd(), {"version": 1, "quantization": {"bnb_4bit": "refuse"}}, device="cpu")
    plan = offloadkit.plan(quantized_sd(), {"version": 1, "quantization": {"bnb_4bit": "keep-on-device"}},
                           device="cpu")
    assert plan.component("text_encoder").strategy == "skip"
    assert plan.sequence == ("unet", "vae")
    plan = offloadkit.plan(quantized_sd(), "diffusers-default", device="cpu")
    assert plan.component("text_encoder").strategy == "model"
    # a component rule overrides the quantization rule
    plan = offloadkit.plan(quantized_sd(), {"version": 1, "quantization": {"bnb_4bit": "refuse"},
                                            "components": {"text_encoder": {"strategy": "resident"}}}, device="cpu")
    assert plan.component("text_encoder").strategy == "resident"


def test_other_quantizers_are_detected():
    pipe = tiny_pipeline("sd")
    pipe.unet.hf_quantizer = object()
    with pytest.raises(PolicyError, match="'unet' is quantized.*other: refuse"):
        offloadkit.plan(pipe, {"version": 1, "quantization": {"other": "refuse"}}, device="cpu")


def test_foreign_accelerate_hooks_are_refused():
    from accelerate import cpu_offload

    pipe = tiny_pipeline("sd")
    cpu_offload(pipe.unet, execution_device="cpu")
    with pytest.raises(PipelineError, match="component 'unet' already has an Accelerate hook.*remove_all_hooks"):
        offloadkit.apply(pipe, "diffusers-default", device="cpu")
    assert not hasattr(pipe.text_encoder, "_hf_hook")  # nothing was installed
    # a component the policy leaves alone may keep its hooks
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"unet": {"strategy": "skip"}}}, device="cpu")
    assert handle.plan.sequence == ("text_encoder", "vae")


def test_diffusers_model_offload_is_replaced():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    assert pipe._all_hooks == []
    assert pipe.unet._hf_hook is handle.hook("unet")
    assert_same_images(run(pipe), reference)


def test_group_offloaded_component_is_refused():
    pipe = tiny_pipeline("sd")
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(PipelineError, match="component 'unet' has diffusers group offloading"):
        offloadkit.apply(pipe, "diffusers-default", device="cpu")


def test_device_mapped_pipeline_is_refused():
    pipe = tiny_pipeline("sd")
    object.__setattr__(pipe, "hf_device_map", {"unet": "cuda:0", "text_encoder": "cuda:1"})
    with pytest.raises(PipelineError, match="device map.*reset_device_map"):
        offloadkit.apply(pipe, "diffusers-default", device="cpu")


def test_diffusers_switches_cannot_silently_replace_the_policy():
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "diffusers-default", device="cpu")
    with pytest.raises(PipelineError, match="under the offloadkit policy 'diffusers-default'"):
        pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(PipelineError, match="enable_sequential_cpu_offload"):
        pipe.enable_sequential_cpu_offload(device="cpu")


def test_loader_style_hook_removal_puts_the_policy_back():
    """diffusers' LoRA loaders remove offload hooks, load, then call enable_model_cpu_offload()."""
    from accelerate.hooks import remove_hook_from_module

    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    for module in model_components(pipe).values():
        remove_hook_from_module(module)
    pipe.enable_model_cpu_offload()
    assert pipe.unet._hf_hook is handle.hook("unet")
    assert not hasattr(pipe.vae, "_hf_hook")
    assert_same_images(run(pipe), reference)


def test_parameterless_module_gets_a_working_hook():
    from offloadkit.runtime.strategies.model import ChainOffloadHook, ComponentState
    from offloadkit.runtime.trace import Trace
    from accelerate.hooks import add_hook_to_module

    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 2

    module = Scale()
    trace = Trace()
    add_hook_to_module(module, ChainOffloadHook(torch.device("cpu", 0), None, ComponentState("scale", "denoise", 0, trace)))
    assert torch.equal(module(torch.ones(2)), torch.full((2,), 2.0))
    assert [(e.component, e.action) for e in trace] == [("scale", "onload")]


def test_apply_accepts_a_policy_object_and_path(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nname: mine\ndevice: cpu\ncomponents:\n  vae: {strategy: resident}\n")
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, str(path))
    assert handle.plan.policy == "mine" and handle.plan.device == "cpu:0"
    handle = offloadkit.apply(pipe, offloadkit.load(str(path)))
    assert handle.plan.component("vae").strategy == "resident"


def test_pipe_to_device_under_a_policy_is_refused_but_dtype_is_allowed():
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "diffusers-default", device="cpu")
    for call in (lambda: pipe.to("cpu"), lambda: pipe.to(device="cpu"), lambda: pipe.to("cpu", torch.float32)):
        with pytest.raises(PipelineError, match="pipe.to\\(device\\) would silently undo it"):
            call()
    assert pipe.to(torch.float32) is pipe
    assert pipe.unet._hf_hook is pipe._offloadkit_handle.hook("unet")
    offloadkit.remove(pipe)
    assert pipe.to("cpu") is pipe


def test_textual_inversion_keeps_the_model_policy():
    embedding, expected = textual_inversion_case()
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    pipe.load_textual_inversion({"<cat>": embedding.clone()}, token="<cat>")
    assert pipe.text_encoder._hf_hook is handle.hook("text_encoder")
    assert not hasattr(pipe.vae, "_hf_hook")
    assert_same_images(run(pipe, prompt="a <cat>"), expected)


def test_reinstall_plans_components_a_loader_added():
    """load_ip_adapter registers an image encoder between stripping hooks and re-enabling offload."""
    from accelerate.hooks import remove_hook_from_module
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    for module in model_components(pipe).values():
        remove_hook_from_module(module)
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16)).eval()
    pipe.register_modules(image_encoder=encoder)
    pipe.enable_model_cpu_offload()
    assert handle.plan.sequence == ("text_encoder", "image_encoder", "unet", "vae")
    assert pipe.image_encoder._hf_hook is handle.hook("image_encoder")
    assert pipe.unet._hf_hook.prev_module_hook.model is encoder


def test_failed_apply_leaves_nothing_behind():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    original_to = pipe.vae.to

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    pipe.vae.to = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        offloadkit.apply(pipe, "vae-resident", device="cpu")
    assert hooked_submodules(pipe) == []
    assert not hasattr(pipe, "_offloadkit_handle")
    pipe.vae.to = original_to
    offloadkit.apply(pipe, "vae-resident", device="cpu")  # a retry is not refused
    assert_same_images(run(pipe), reference)


def test_remove_gives_back_diffusers_model_offload():
    pipe = tiny_pipeline("sd")
    pipe.enable_model_cpu_offload(device="cpu")
    before = hook_structure(pipe)
    handle = offloadkit.apply(pipe, "vae-resident", device="cpu")
    assert hook_structure(pipe) != before
    handle.remove()
    assert hook_structure(pipe) == before and len(pipe._all_hooks) == 3


def test_pickling_or_copying_under_a_policy_is_a_clear_error():
    import copy
    import pickle

    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "diffusers-default", device="cpu")
    with pytest.raises(PipelineError, match="cannot be pickled or copied"):
        pickle.dumps(pipe)
    with pytest.raises(PipelineError, match="cannot be pickled or copied"):
        copy.deepcopy(pipe)
    offloadkit.remove(pipe)
    assert pickle.loads(pickle.dumps(pipe)).unet is not None


def test_save_pretrained_under_model_policy_saves_real_weights(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    offloadkit.apply(pipe, "diffusers-default", device="cpu")
    run(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert_same_images(run(loaded), reference)


def test_keep_on_device_stays_across_calls():
    """A server's denoiser: onloaded once, then neither the chain nor the end of a call sends it back."""
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    policy = {"version": 1, "components": {"unet": {"strategy": "model", "keep_on_device": True}}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert handle.plan.component("unet").offloaded_by == "never (kept after first use)"
    assert handle.plan.component("text_encoder").offloaded_by == "unet"
    for _ in range(3):
        assert_same_images(run(pipe), reference)
    unet_moves = [(e.call, e.action) for e in handle.trace if e.component == "unet"]
    assert unet_moves == [(1, "onload")]
    assert handle.trace.bytes_moved(3) < handle.trace.bytes_moved(1)
    assert {e.component for e in handle.trace.for_call(3)} == {"text_encoder", "vae"}
    handle.remove()
    assert hooked_submodules(pipe) == []
    assert_same_images(run(pipe), reference)


def test_copy_free_offload_drops_device_copies_instead_of_copying_back():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe)
    storages = {n: [p.untyped_storage().data_ptr() for p in m.parameters()] for n, m in model_components(pipe).items()}
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "model", "transfer": "copy-free"}}},
                              device="cpu")
    moves = []
    for name, module in model_components(pipe).items():
        original = module.to
        module.to = lambda *a, _name=name, _original=original, **k: (moves.append(_name), _original(*a, **k))[1]
    for _ in range(3):
        assert_same_images(run(pipe), reference)
    assert moves == []  # no module.to() either way: onload copies from the host copy, offload drops
    assert len(handle.trace.for_call(3)) == 8
    # after each call the parameters point at the very host tensors they started with
    assert {n: [p.untyped_storage().data_ptr() for p in m.parameters()]
            for n, m in model_components(pipe).items()} == storages
    handle.remove()
    assert hooked_submodules(pipe) == []
    assert_same_images(run(pipe), reference)


def test_pinned_transfer_runs_copy_free_on_the_cpu_and_is_refused_in_a_cpu_policy():
    policy = {"version": 1, "components": {"unet": {"strategy": "model", "transfer": "pinned"}}}
    plan = offloadkit.plan(tiny_pipeline("sd"), policy, device="cpu")  # written for `device: auto`
    unet = plan.component("unet")
    assert unet.options["transfer"] == "copy-free"
    assert unet.reason == "policy `components` rule; on cpu: `transfer: copy-free` in place of 'pinned'"
    assert plan.notes == ("the policy is written for an accelerator; on cpu:0, unet runs with stand-ins for the "
                          "options that need it (see the reasons): the same outputs, not the same timings",)
    # a policy written for the CPU means what it says there: pinned memory is a mistake in it
    with pytest.raises(PolicyError, match="`transfer: pinned` needs an accelerator"):
        offloadkit.plan(tiny_pipeline("sd"), {**policy, "device": "cpu"})


def test_copy_free_follows_a_dtype_change_made_during_the_call():
    """SDXL's pipeline upcasts an fp16 VAE to float32 mid-call (force_upcast); the host copy must follow."""
    results = {}
    for transfer in ("standard", "copy-free"):
        pipe = tiny_pipeline("sdxl").to(torch.float16)
        pipe.vae.register_to_config(force_upcast=True)
        handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "model",
                                                                             "transfer": transfer}}}, device="cpu")
        results[transfer] = [run(pipe) for _ in range(2)]
        assert next(pipe.vae.parameters()).dtype == torch.float16  # the pipeline casts it back at the end
        handle.remove()
    assert_same_images(results["copy-free"][0], results["standard"][0])
    assert_same_images(results["copy-free"][1], results["standard"][1])


def test_switches_are_refused_under_a_policy_without_hooks():
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "resident"}}}, device="cpu")
    with pytest.raises(PipelineError, match="enable_model_cpu_offload\\(\\) would silently replace it"):
        pipe.enable_model_cpu_offload(device="cpu")
