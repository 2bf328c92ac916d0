"""Strategy x quantization pairs that cannot work are refused when the policy is resolved."""

import pytest

import offloadkit
from offloadkit.compatibility import INCOMPATIBLE
from offloadkit.errors import PolicyError
from offloadkit.testing import tiny_pipeline


def mark(module, quantization):
    """Set the attributes the quantization loaders set (detection path; the backends need a GPU or are absent)."""
    if quantization in ("bnb_4bit", "bnb_8bit"):
        module.quantization_method = "bitsandbytes"
        setattr(module, f"is_loaded_in_{quantization[4:]}", True)
    else:
        module.quantization_method = quantization


@pytest.mark.parametrize("strategy, quantization", sorted(INCOMPATIBLE))
def test_every_forbidden_pair_is_refused_with_reason_and_alternative(strategy, quantization):
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, quantization)
    why, instead = INCOMPATIBLE[(strategy, quantization)]
    with pytest.raises(PolicyError) as info:
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": strategy}}}, device="cpu")
    message = str(info.value)
    assert f"components.unet: 'unet' is quantized" in message
    assert f"cannot use strategy {strategy!r}" in message and why in message and instead in message


def test_wildcard_rules_are_checked_too_and_a_named_rule_fixes_it():
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "quanto")
    with pytest.raises(PolicyError, match="components.\\*: 'unet' is quantized \\(quanto\\)"):
        offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": "group"}}}, device="cpu")
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": "group"},
                                                               "unet": {"strategy": "model"}}}, device="cpu")
    assert plan.component("unet").strategy == "model"


@pytest.mark.parametrize("quantization", ["bnb_4bit", "quanto", "torchao"])
def test_allowed_pairs_pass(quantization):
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, quantization)
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "model"}}}, device="cpu")
    assert plan.component("unet").strategy == "model"
