"""Weights are bit-identical after 50 onload/offload cycles of every strategy."""

import pytest
import torch

import offloadkit
from offloadkit.policy.rules import strategy_names
from offloadkit.testing import tiny_pipeline

from helpers import run


RULES = [{"strategy": name} for name in strategy_names()] + [
    {"strategy": "model", "transfer": "copy-free"},
    {"strategy": "model", "keep_on_device": True},
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_fifty_cycles_leave_weights_bit_identical(rule):
    strategy = rule["strategy"]
    pipe = tiny_pipeline("sd")
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("text_encoder", "unet", "vae")}
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": rule}}, device="cpu")
    for _ in range(50):
        run(pipe, num_inference_steps=1)
    if rule == {"strategy": "model"} or rule.get("transfer"):
        assert handle.trace.calls == 50 and len(handle.trace.for_call(50)) == 6  # 3 models on and off
    handle.remove()
    for name, weights in before.items():
        after = getattr(pipe, name).state_dict()
        for key, value in weights.items():
            assert torch.equal(after[key], value), f"{strategy}: {name}.{key} changed"
