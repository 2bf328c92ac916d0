"""`diffusers-default` against pipelines whose own `enable_model_cpu_offload` is not the plain one.

Kandinsky priors (an exclusion inside the sequence), combined pipelines (one chain per sub-pipeline),
AudioLDM2 (an explicit list with submodules): each compared with the pipeline's own switch, on CPU,
in the same test: hooks, hooked submodules, hook order, outputs over three calls.
"""

import numpy as np
import pytest
import torch

import offloadkit
from offloadkit import tiny_multistage as tiny
from offloadkit.plans.pipeline_spec import spec_from_class
from offloadkit.plans.resolve import resolve

from helpers import hook_structure, hooked_submodules

CASES = {
    "kandinsky-prior": tiny.tiny_kandinsky_prior_pipeline,
    "kandinsky-v22-prior": tiny.tiny_kandinsky_v22_prior_pipeline,
    "kandinsky-v22-prior-emb2emb": lambda: tiny.tiny_kandinsky_v22_prior_pipeline(emb2emb=True),
    "kandinsky-combined": tiny.tiny_kandinsky_combined_pipeline,
    "kandinsky-img2img-combined": lambda: tiny.tiny_kandinsky_combined_pipeline(task="img2img"),
    "kandinsky-inpaint-combined": lambda: tiny.tiny_kandinsky_combined_pipeline(task="inpaint"),
    "kandinsky-v22-img2img-combined": lambda: tiny.tiny_kandinsky_v22_combined_pipeline(task="img2img"),
    "stable-cascade-combined": tiny.tiny_stable_cascade_combined_pipeline,
    "audioldm2": tiny.tiny_audioldm2_pipeline,
    # already right before issue 14 (prior_prior excluded outside the sequence): kept as guards
    "kandinsky-v22-combined": tiny.tiny_kandinsky_v22_combined_pipeline,
    "kandinsky-v22-inpaint-combined": lambda: tiny.tiny_kandinsky_v22_combined_pipeline(task="inpaint"),
}


def _outputs(pipe):
    out = pipe(**tiny.tiny_multistage_call_kwargs(pipe))
    for field in ("images", "audios", "image_embeds"):
        value = getattr(out, field, None)
        if value is not None:
            return np.asarray(value)
    raise AssertionError(f"no output field in {type(out).__name__}")


def _structure(pipe):
    # AudioLDM2's own switch builds torch.device("cpu") (no index) from "cpu" or "cpu:0": the same device
    return {name: None if entry is None else (entry[0], torch.device(entry[1].type, entry[1].index or 0), entry[2])
            for name, entry in hook_structure(pipe).items()}


def _link_names(pipe):
    """{id(module): "component" or "component.submodule"} for every module of the pipeline's models."""
    names = {}
    for name, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            for path, module in reversed(list(model.named_modules())):
                names[id(module)] = f"{name}.{path}" if path else name
    return names


def _diffusers_order(pipe):
    """The order diffusers' own switch hooked in: `_all_hooks`, the sub-pipelines' (combined pipelines'
    overrides), or the chain back from `final_offload_hook` (AudioLDM2's explicit list)."""
    hooks = list(getattr(pipe, "_all_hooks", None) or [])
    for sub in ("prior_pipe", "decoder_pipe"):
        hooks += list(getattr(getattr(pipe, sub, None), "_all_hooks", None) or [])
    if not hooks:
        hook = pipe.final_offload_hook
        while hook is not None:
            hooks.insert(0, hook)
            hook = hook.hook.prev_module_hook
    names = _link_names(pipe)
    return [names[id(h.model)] for h in hooks]


def _our_order(handle):
    plan = handle.plan
    chained = [link for chain in plan.chains or (plan.sequence,) for link in chain]
    return chained + [c.name for c in plan.components if c.chain_index is None and c.strategy == "model"]


@pytest.mark.parametrize("case", CASES)
def test_diffusers_default_matches_the_pipelines_own_switch(case):
    build = CASES[case]
    reference = _outputs(build())

    ours = build()
    handle = offloadkit.apply(ours, "diffusers-default", device="cpu")
    theirs = build()
    theirs.enable_model_cpu_offload(device="cpu")

    assert _structure(ours) == _structure(theirs)
    assert hooked_submodules(ours) == hooked_submodules(theirs)
    assert _our_order(handle) == _diffusers_order(theirs)
    assert ours._execution_device == torch.device("cpu", 0)

    hooks_after_apply = dict(handle._hooks)
    for call in range(3):
        mine = _outputs(ours)
        np.testing.assert_array_equal(mine, reference)
        np.testing.assert_array_equal(mine, _outputs(theirs))
        if call == 0:
            # no diffusers end of call (the pipeline's or a sub-pipeline's) swapped its own hooks in
            for pipe in (ours, getattr(ours, "prior_pipe", None), getattr(ours, "decoder_pipe", None)):
                assert not getattr(pipe, "_all_hooks", None)
    for name, hook in hooks_after_apply.items():
        assert ours.components[name]._hf_hook is hook
    assert _structure(ours) == _structure(theirs)

    handle.remove()
    assert hooked_submodules(ours) == []


def test_a_later_chain_offloads_the_earlier_one_as_the_sub_pipelines_end_of_call_does():
    """KandinskyV22Img2ImgCombined: the decoder's chain starts unlinked, and the prior's models are back on the
    host by the time its first model runs (diffusers: prior_pipe's own maybe_free_model_hooks)."""
    pipe = tiny.tiny_kandinsky_v22_combined_pipeline(task="img2img")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    assert handle.plan.chains == (("prior_text_encoder", "prior_image_encoder", "prior_prior"), ("unet", "movq"))
    assert handle.plan.component("prior_prior").offloaded_by == "unet"
    _outputs(pipe)
    moves = [(e.component, e.action) for e in handle.trace.for_call(handle.trace.calls)]
    assert moves.index(("prior_prior", "offload")) < moves.index(("unet", "onload"))


def test_applying_over_the_combined_pipelines_own_switch_replaces_it_in_its_sub_pipelines_and_gives_it_back():
    """The override switches on prior_pipe and decoder_pipe; left on, their end of call would put diffusers'
    chains back over the policy's after the first call."""
    pipe = tiny.tiny_kandinsky_v22_combined_pipeline(task="img2img")
    pipe.enable_model_cpu_offload(device="cpu")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    _outputs(pipe)
    assert handle.hooks_intact()
    assert not pipe.prior_pipe._all_hooks and not pipe.decoder_pipe._all_hooks
    handle.remove()
    assert len(pipe.prior_pipe._all_hooks) == 3 and len(pipe.decoder_pipe._all_hooks) == 2


@pytest.mark.parametrize("pipeline, chains, exclude", [
    ("KandinskyPriorPipeline", (("text_encoder", "prior"),), ()),
    ("KandinskyCombinedPipeline",
     (("text_encoder", "unet", "movq", "prior_prior", "prior_image_encoder", "prior_text_encoder"),), ()),
    ("KandinskyV22CombinedPipeline", (("prior_text_encoder", "prior_image_encoder", "unet", "movq"),),
     ("prior_prior",)),
    ("KandinskyV22Img2ImgCombinedPipeline",
     (("prior_text_encoder", "prior_image_encoder", "prior_prior"), ("unet", "movq")), ()),
    ("StableCascadeCombinedPipeline",
     (("prior_image_encoder", "prior_text_encoder", "prior_prior"), ("text_encoder", "decoder", "vqgan")), ()),
    ("WuerstchenCombinedPipeline", (("prior_text_encoder", "prior_prior"), ("text_encoder", "decoder", "vqgan")), ()),
    ("AudioLDM2Pipeline", (("text_encoder.text_model", "text_encoder.text_projection", "text_encoder_2",
                            "projection_model", "language_model", "unet", "vae", "vocoder", "text_encoder"),), ()),
    ("MusicLDMPipeline", (("text_encoder.text_model", "text_encoder.text_projection", "unet", "vae", "vocoder",
                           "text_encoder"),), ()),
])
def test_sequence_auto_is_the_order_the_pipelines_own_switch_hooks(pipeline, chains, exclude):
    """From the class alone (`offloadkit explain`): the chains, and the exclusions outside them."""
    spec = spec_from_class(pipeline)
    plan = resolve(offloadkit.load("diffusers-default"), spec, "cuda:0")
    assert (plan.chains or (plan.sequence,)) == chains
    assert spec.exclude == exclude
    assert plan.sequence == tuple(dict.fromkeys(link for chain in chains for link in chain if "." not in link))


def test_a_user_policy_over_sequence_auto_drops_what_it_takes_out_of_the_chains():
    policy = offloadkit.load({"version": 1, "extends": "diffusers-default",
                              "components": {"prior_prior": {"strategy": "resident"},
                                             "text_encoder": {"strategy": "resident"}}})
    plan = resolve(policy, spec_from_class("StableCascadeCombinedPipeline"), "cuda:0")
    assert plan.chains == (("prior_image_encoder", "prior_text_encoder"), ("decoder", "vqgan"))
    # AudioLDM2's CLAP text model links go with its text encoder
    policy = offloadkit.load({"version": 1, "extends": "diffusers-default",
                              "components": {"text_encoder": {"strategy": "resident"}}})
    plan = resolve(policy, spec_from_class("AudioLDM2Pipeline"), "cuda:0")
    assert plan.chains == ()
    assert plan.sequence == ("text_encoder_2", "projection_model", "language_model", "unet", "vae", "vocoder")


def test_a_pipeline_whose_switch_refuses_is_still_refused():
    """TextToVideoZero declares no sequence and has no override: diffusers' switch raises, and so does `auto`."""
    with pytest.raises(offloadkit.PolicyError, match="declares no model_cpu_offload_seq"):
        resolve(offloadkit.load("diffusers-default"), spec_from_class("TextToVideoZeroPipeline"), "cuda:0")


def test_a_user_sequence_chains_a_model_the_pipeline_excludes_as_diffusers_chains_one_in_its_own():
    """`exclude: auto` leaves out what the pipeline excludes outside the sequence, never a model the user lists."""
    from diffusers import StableDiffusionPipeline

    assert "safety_checker" in StableDiffusionPipeline._exclude_from_cpu_offload
    policy = {"version": 1, "sequence": ["text_encoder", "unet", "vae", "safety_checker"]}
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve

    class_plan = resolve(offloadkit.load(policy), spec_from_class("StableDiffusionPipeline"), "cpu")
    assert class_plan.sequence == ("text_encoder", "unet", "vae", "safety_checker")
    assert class_plan.component("safety_checker").strategy == "model"
