"""CPU CI for GPU policies: every shipped policy runs on a tiny pipeline of its family with device="cpu".

Options that need an accelerator (`transfer: pinned`, group streams) run as their rule's CPU stand-in
(`StrategyRule.on_device`); the plan and the trace say so, outputs equal no offload, and on the device
the policy was written for nothing changes.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import offloadkit
from offloadkit.errors import DeviceError, PolicyError
from offloadkit.plans.pipeline_spec import spec_from_class
from offloadkit.plans.resolve import resolve
from offloadkit.policy.rules import PRECISION_KEYS, RULES
from offloadkit.testing import tiny_call_kwargs, tiny_pipeline, tiny_wan_pipeline

from helpers import hooked_submodules

ROOT = Path(__file__).resolve().parent.parent
STAND_IN_NOTE = "run with stand-ins for the options that need it"


def _float16_sdxl():
    return tiny_pipeline("sdxl").to(torch.float16)


# Each shipped policy file and the tiny pipeline of the family it targets (`diffusers-default` and `sequential`
# fit any family: they take two others than the test_parity/test_sequential ones lean on, Wan among them).
FAMILIES = {
    "policies/diffusers-default.yaml": tiny_wan_pipeline,
    "policies/sequential.yaml": lambda: tiny_pipeline("sd"),
    "policies/vae-resident.yaml": lambda: tiny_pipeline("sdxl"),
    "policies/controlnet-resident.yaml": lambda: tiny_pipeline("controlnet"),
    "examples/flux1-dev-12gb.yaml": lambda: tiny_pipeline("flux"),
    "examples/sdxl-8gb.yaml": lambda: tiny_pipeline("sdxl"),
    "examples/sdxl-fp8-int8.yaml": _float16_sdxl,  # its `compute_dtype: float16` is for a float16 pipeline
    "examples/server-keep-denoiser.yaml": lambda: tiny_pipeline("sdxl"),
}


def output(pipe):
    result = pipe(**tiny_call_kwargs(pipe))
    return result.frames if hasattr(result, "frames") else result.images


def reference(build, plan):
    """What the pipeline gives without offload: with the plan's precision changes, every model resident."""
    pipe = build()
    changed = {c.name: {"strategy": "resident", **{k: v for k, v in c.options.items() if k in PRECISION_KEYS}}
               for c in plan.components if c.rule.precision_change}
    if changed:
        offloadkit.apply(pipe, {"version": 1, "components": changed}, device="cpu")
    return output(pipe)


def test_every_shipped_policy_file_has_a_family_here():
    shipped = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("policies/*.yaml"), *ROOT.glob("examples/*.yaml")]}
    assert shipped == set(FAMILIES), "add the new policy file and the tiny pipeline of its family to FAMILIES"


@pytest.mark.parametrize("path", sorted(FAMILIES))
def test_shipped_policies_run_on_the_cpu_with_outputs_of_no_offload(path):
    build = FAMILIES[path]
    pipe = build()
    handle = offloadkit.apply(pipe, str(ROOT / path), device="cpu")
    got = output(pipe)
    got_again = output(pipe)  # the policy survives the pipeline's end of call
    expected = reference(build, handle.plan)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_again, expected)
    # none of them needs an accelerator: no stand-in, so no note
    assert handle.plan.notes == () and handle.trace.notes == ()
    assert "notes" not in handle.plan.to_dict()
    assert not any("on cpu:" in c.reason for c in handle.plan.components)
    handle.remove()


@pytest.fixture(scope="module")
def synthesised_for_a_gpu(tmp_path_factory):
    """A policy synthesised for CUDA on the tiny SDXL (half the memory of everything resident), as written to
    a file by `offloadkit synthesize`."""
    from offloadkit.prediction.replay import predict

    pipe = tiny_pipeline("sdxl")
    kwargs = tiny_call_kwargs(pipe)
    call = offloadkit.CallSettings(height=kwargs["height"], width=kwargs["width"], steps=kwargs["num_inference_steps"])
    everything = predict(pipe, {"version": 1, "components": {"*": {"strategy": "resident"}}}, device="cuda",
                         settings=call)
    result = offloadkit.synthesize(pipe, budget=everything.device_peak_bytes // 2, device="cuda", settings=call)
    path = tmp_path_factory.mktemp("synth") / "synth.yaml"
    result.write(path)
    return result.policy, path


def test_a_policy_synthesised_for_a_gpu_runs_on_the_cpu_with_stand_ins(synthesised_for_a_gpu):
    policy, path = synthesised_for_a_gpu
    pinned = {n for n, r in policy.components.items() if getattr(r, "transfer", None) == "pinned"}
    assert pinned, f"the synthesised policy no longer uses `transfer: pinned`; pick a budget that does: {policy}"
    assert offloadkit.load(str(path)).device == "cuda"
    expected = output(tiny_pipeline("sdxl"))

    pipe = tiny_pipeline("sdxl")
    handle = offloadkit.apply(pipe, str(path), device="cpu")
    np.testing.assert_array_equal(output(pipe), expected)
    np.testing.assert_array_equal(output(pipe), expected)
    plan = handle.plan
    for name in pinned:
        assert plan.component(name).options["transfer"] == "copy-free"
        assert "on cpu: `transfer: copy-free` in place of 'pinned'" in plan.component(name).reason
    (note,) = plan.notes
    assert note.startswith(f"the policy is written for {policy.device!r}; on cpu:0, ") and STAND_IN_NOTE in note
    assert all(name in note for name in pinned)
    assert plan.to_dict()["notes"] == [note]
    assert str(plan).splitlines()[1] == f"note: {note}"  # under the header
    assert handle.trace.notes == (note,)
    assert handle.trace.summary().splitlines()[0] == f"note: {note}"
    assert '"notes"' in handle.trace.to_json()
    # what the policy says is untouched: the rules are those of the file
    assert offloadkit.load(str(path)).components == policy.components


GPU_POLICY = {"version": 1, "device": "cuda", "components": {
    "unet": {"strategy": "model", "transfer": "pinned"},
    "vae": {"strategy": "model", "transfer": "pinned", "prefetch": True},
    "text_encoder_2": {"strategy": "group", "use_stream": True, "record_stream": True},
    "text_encoder": {"strategy": "group", "use_stream": True, "low_cpu_mem_usage": True,
                     "block_modules": ["encoder"]},
}}


def test_every_stand_in_at_once_keeps_outputs_and_is_said_in_each_reason():
    expected = output(tiny_pipeline("sdxl"))
    pipe = tiny_pipeline("sdxl")
    handle = offloadkit.apply(pipe, GPU_POLICY, device="cpu")
    np.testing.assert_array_equal(output(pipe), expected)
    plan = handle.plan
    unet, vae, te2, te = (plan.component(n) for n in ("unet", "vae", "text_encoder_2", "text_encoder"))
    assert unet.options["transfer"] == vae.options["transfer"] == "copy-free"
    assert vae.options["prefetch"] is True  # copy-free prefetches too: at once, on the CPU
    assert "on cpu: `transfer: copy-free` in place of 'pinned'; prefetched while unet runs" in vae.reason
    assert te2.options["use_stream"] is te2.options["record_stream"] is False
    assert te.options["use_stream"] is te.options["low_cpu_mem_usage"] is False
    assert "no side stream (`use_stream: false`, `record_stream: false`)" in te2.reason
    assert "no side stream (`use_stream: false`, `low_cpu_mem_usage: false`)" in te.reason
    assert plan.notes == ("the policy is written for 'cuda'; on cpu:0, vae, text_encoder, text_encoder_2, unet run "
                          "with stand-ins for the options that need it (see the reasons): the same outputs, not the "
                          "same timings",)


def test_on_the_device_it_was_written_for_a_policy_means_what_it_says():
    policy = offloadkit.load(GPU_POLICY)
    spec = spec_from_class("StableDiffusionXLPipeline")
    for device in ("cuda", "cuda:1"):
        plan = resolve(policy, spec, device)
        assert plan.notes == ()
        for name, rule in policy.components.items():
            assert plan.component(name).rule == rule
            assert "on cuda" not in plan.component(name).reason
    # `device: auto` is written for any accelerator
    auto = offloadkit.load({**GPU_POLICY, "device": "auto"})
    plan = resolve(auto, spec, "cuda")
    assert plan.notes == () and plan.component("unet").options["transfer"] == "pinned"
    # a policy written for the CPU that asks for pinned memory is wrong, not stood in for
    with pytest.raises(PolicyError, match="`transfer: pinned` needs an accelerator"):
        resolve(offloadkit.load({**GPU_POLICY, "device": "cpu"}), spec, "cpu")


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_strategy_searched_for_cuda_has_a_stand_in_the_cpu_accepts(name):
    cls = RULES[name]
    for rule in [cls.fastest("cuda"), *cls.search_forms("cuda")]:
        stand_in, change = rule.on_device("cpu")
        assert stand_in.device_problem("cpu") is None, f"{name}: declare its CPU stand-in in `on_device`"
        assert (change is None) == (stand_in == rule) == (rule.device_problem("cpu") is None)
        assert rule.on_device("cuda") == (rule, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plan_without_a_device_plans_on_the_cpu_and_apply_refuses():
    pipe = tiny_pipeline("sdxl")
    plan = offloadkit.plan(pipe, GPU_POLICY)
    assert plan.device == "cpu:0"
    assert plan.notes[0] == "this machine has no 'cuda' device (the policy's `device:`): planned on the CPU instead"
    assert STAND_IN_NOTE in plan.notes[1]
    assert plan.component("unet").options["transfer"] == "copy-free"
    # the same plan as asking for the CPU, less the note on the missing device
    assert offloadkit.plan(pipe, GPU_POLICY, device="cpu").notes == plan.notes[1:]
    with pytest.raises(DeviceError, match="no 'cuda' device.*Pass device='cpu' to offloadkit.apply to test it "
                                          "on the CPU"):
        offloadkit.apply(pipe, GPU_POLICY)
    assert hooked_submodules(pipe) == []
    # asked for by name, a missing device stays an error for `plan` too
    with pytest.raises(DeviceError, match="not available"):
        offloadkit.plan(pipe, GPU_POLICY, device="cuda")


def test_an_architectures_name_gives_its_familys_tiny_pipeline_and_a_typo_a_suggestion():
    from offloadkit.testing import ARCHITECTURE_ALIASES, tiny_pipeline
    from offloadkit.prediction.sizing import architecture_names

    assert set(ARCHITECTURE_ALIASES) <= set(architecture_names())  # every alias is a real architecture
    assert type(tiny_pipeline("sd15")) is type(tiny_pipeline("sd"))
    with pytest.raises(ValueError, match="Did you mean 'sdxl'"):
        tiny_pipeline("sdx")
