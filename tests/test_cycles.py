"""Weights are bit-identical after 50 onload/offload cycles of every strategy."""

import pytest
import torch

import offloadkit
from offloadkit.strategies import STRATEGIES
from offloadkit.testing import tiny_pipeline

from helpers import run


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fifty_cycles_leave_weights_bit_identical(strategy):
    pipe = tiny_pipeline("sd")
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("text_encoder", "unet", "vae")}
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": strategy}}}, device="cpu")
    for _ in range(50):
        run(pipe, num_inference_steps=1)
    if strategy == "model":
        assert handle.trace.calls == 50 and len(handle.trace.for_call(50)) == 6  # 3 models on and off
    handle.remove()
    for name, weights in before.items():
        after = getattr(pipe, name).state_dict()
        for key, value in weights.items():
            assert torch.equal(after[key], value), f"{strategy}: {name}.{key} changed"
