"""`torch.compile` on a component under a policy compiles once: no hook is rebuilt per call and the
hooks' bookkeeping (residency flags, trace counters) is kept out of the graph, so nothing recompiles."""

import pytest
import torch

import offloadkit
from offloadkit.testing import tiny_pipeline

from helpers import assert_same_images, run


@pytest.mark.parametrize("rule", [{"strategy": "model"}, {"strategy": "group"}])
def test_compiled_denoiser_does_not_recompile_across_calls(rule):
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward  # run the captured graph as it is: only the count matters

    offloadkit.apply(pipe, {"version": 1, "components": {"unet": rule}}, device="cpu")
    pipe.unet.compile(backend=counting_backend)
    try:
        assert_same_images(run(pipe), reference)
        after_first_call = len(compiled)
        assert after_first_call > 0, "the UNet was compiled"
        for _ in range(2):
            assert_same_images(run(pipe), reference)
        assert len(compiled) == after_first_call
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("how", ["repeated-blocks", "whole-model"])
def test_a_streamed_model_compiles_once(how):
    """`stream`: the blocks' hooks run outside the graphs; blocks moving between meta and their pool slot
    (a different slot from call to call) recompile nothing."""
    pipe = tiny_pipeline("flux")
    reference = run(pipe)
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "transformer": {"strategy": "stream", "resident": 2, "prefetch": 2}}}, device="cpu")
    if how == "repeated-blocks":  # diffusers' regional compilation: each block class compiled once
        pipe.transformer.compile_repeated_blocks(backend=counting_backend)
    else:
        pipe.transformer.compile(backend=counting_backend)
    try:
        assert_same_images(run(pipe), reference)
        after_first_call = len(compiled)
        assert after_first_call > 0, "the transformer was compiled"
        for _ in range(2):
            assert_same_images(run(pipe), reference)
        assert len(compiled) == after_first_call
        assert handle.trace.calls_summary()[-1].streams["transformer"]["bytes"] > 0
    finally:
        torch._dynamo.reset()
        handle.remove()
