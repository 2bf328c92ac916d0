"""`diffusers-default` against diffusers' own `enable_model_cpu_offload`, on CPU, in the same test."""

import pytest
import torch

import offloadkit
from offloadkit.testing import TINY_PIPELINES, tiny_pipeline

from helpers import assert_same_images, hook_structure, run


@pytest.mark.parametrize("name", TINY_PIPELINES)
def test_hooks_execution_device_and_outputs_match_diffusers(name):
    reference = run(tiny_pipeline(name))

    ours = tiny_pipeline(name)
    handle = offloadkit.apply(ours, "diffusers-default", device="cpu")
    theirs = tiny_pipeline(name)
    theirs.enable_model_cpu_offload(device="cpu")

    # Same hook kinds, same execution device, same chain (each hook's predecessor).
    assert hook_structure(ours) == hook_structure(theirs)
    assert ours._execution_device == theirs._execution_device == torch.device("cpu", 0)
    # Same chain order as diffusers' _all_hooks, then the models outside the sequence.
    diffusers_order = [next(n for n, m in theirs.components.items() if m is h.model) for h in theirs._all_hooks]
    assert [c.name for c in handle.plan.components if c.strategy == "model"] == diffusers_order

    hooks_after_apply = {n: h for n, h in handle._hooks.items()}
    for call in range(3):
        ours_images = run(ours)
        theirs_images = run(theirs)
        assert_same_images(ours_images, reference)
        assert_same_images(ours_images, theirs_images)
        if call == 0:
            # diffusers' maybe_free_model_hooks did not swap in its own chain, and nothing was rebuilt.
            assert hook_structure(ours) == hook_structure(theirs)
            assert getattr(ours, "_all_hooks", []) == []
    for name, hook in hooks_after_apply.items():
        assert getattr(ours.components[name], "_hf_hook") is hook
    assert hook_structure(ours) == hook_structure(theirs)


def test_bnb_8bit_rule_matches_diffusers_on_old_stacks(monkeypatch):
    """diffusers skips 8-bit bitsandbytes models when its libraries cannot move them; so does `auto`."""
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    import offloadkit.plans.library_gates

    def mark_8bit(pipe):
        # What bitsandbytes' loader sets; on old stacks such a model refuses `.to()`, so make it a no-op.
        model = pipe.text_encoder_2
        model.is_loaded_in_8bit = True
        model.quantization_method = "bitsandbytes"
        model.to = lambda *args, **kwargs: model
        return pipe

    monkeypatch.setattr(pipeline_utils, "is_bitsandbytes_version", lambda *a: True)
    monkeypatch.setattr(offloadkit.plans.library_gates, "bnb_8bit_movable", lambda: False)
    ours = mark_8bit(tiny_pipeline("sdxl"))
    handle = offloadkit.apply(ours, "diffusers-default", device="cpu")
    theirs = mark_8bit(tiny_pipeline("sdxl"))
    theirs.enable_model_cpu_offload(device="cpu")
    assert hook_structure(ours) == hook_structure(theirs)
    assert hook_structure(ours)["text_encoder_2"] is None
    assert handle.plan.component("text_encoder_2").strategy == "skip"
    assert hook_structure(ours)["unet"][2] == "text_encoder"  # the chain links over the skipped model
    assert_same_images(run(ours), run(theirs))

    # Where the libraries can move 8-bit weights, diffusers offloads them and so does `auto`.
    monkeypatch.setattr(offloadkit.plans.library_gates, "bnb_8bit_movable", lambda: True)
    plan = offloadkit.plan(mark_8bit(tiny_pipeline("sdxl")), "diffusers-default", device="cpu")
    assert plan.component("text_encoder_2").strategy == "model"
    assert plan.sequence == ("text_encoder", "text_encoder_2", "unet", "vae")
