"""GPU checks: skipped without CUDA (see conftest.py). Run on a CUDA machine with `pytest -m gpu`."""

import numpy as np
import pytest
import torch

import offloadkit
from offloadkit.testing import TINY_PIPELINES, tiny_pipeline

from helpers import run

pytestmark = pytest.mark.gpu

MiB = 1024 * 1024


def allocated_at_rest() -> int:
    """Device bytes held after offloading, cuBLAS workspaces included.

    Call after a pipeline has run on the device: torch keeps a cuBLAS workspace per handle in its
    caching allocator (33 MiB on an H100), which counts in `memory_allocated` but is not weights.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


@pytest.mark.parametrize("name", TINY_PIPELINES)
def test_outputs_equal_and_memory_lower_on_cuda(name):
    pipe = tiny_pipeline(name).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reference = run(pipe)
    peak_all = torch.cuda.max_memory_allocated()
    resident_all = allocated_at_rest()  # weights + workspaces
    pipe.to("cpu")
    torch.cuda.empty_cache()

    handle = offloadkit.apply(pipe, "diffusers-default", device="cuda")
    assert handle.plan.device == "cuda:0"
    assert pipe._execution_device == torch.device("cuda", 0)
    resident_offloaded = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    images = [run(pipe) for _ in range(2)]
    peak_offloaded = torch.cuda.max_memory_allocated()

    for image in images:
        np.testing.assert_allclose(image, reference, atol=1e-5)
    assert resident_offloaded < resident_all
    assert peak_offloaded < peak_all
    # after a call everything the chain onloaded is back in host RAM
    assert torch.cuda.memory_allocated() <= resident_offloaded
    assert any(e.target == "cuda:0" for e in handle.trace)
    handle.remove()


def test_device_auto_picks_cuda():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default")
    assert handle.plan.device.startswith("cuda:")
    handle.remove()


def test_parity_with_diffusers_on_cuda():
    ours = tiny_pipeline("sdxl")
    offloadkit.apply(ours, "diffusers-default", device="cuda")
    theirs = tiny_pipeline("sdxl")
    theirs.enable_model_cpu_offload(device="cuda")
    assert ours._execution_device == theirs._execution_device
    np.testing.assert_array_equal(run(ours), run(theirs))


def test_a_model_moved_by_hand_is_still_offloaded():
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "diffusers-default", device="cuda")
    pipe.text_encoder.to("cuda")  # outside the policy's knowledge
    run(pipe)
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"


@pytest.mark.parametrize("transfer", ["copy-free", "pinned"])
def test_fast_transfers_on_cuda(transfer):
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe.to("cuda"))
    pipe.to("cpu")
    at_rest = allocated_at_rest()
    handle = offloadkit.apply(pipe, {"version": 1, "device": "cuda", "components": {
        "*": {"strategy": "model", "transfer": transfer}}})
    for _ in range(3):
        np.testing.assert_allclose(run(pipe), reference, atol=1e-5)
    assert allocated_at_rest() - at_rest < MiB  # nothing left on the device between calls
    if transfer == "pinned":
        assert next(pipe.unet.parameters()).is_pinned()
    handle.remove()
    assert not next(pipe.unet.parameters()).is_pinned()


def test_group_with_streams_on_cuda():
    pipe = tiny_pipeline("sd")
    reference = run(pipe.to("cuda"))
    pipe.to("cpu")
    offloadkit.apply(pipe, {"version": 1, "device": "cuda", "components": {"unet": {
        "strategy": "group", "use_stream": True, "record_stream": True}}})
    np.testing.assert_allclose(run(pipe), reference, atol=1e-5)


def test_prefetch_on_a_side_stream_on_cuda():
    pipe = tiny_pipeline("sdxl")
    reference = run(pipe.to("cuda"))
    pipe.to("cpu")
    at_rest = allocated_at_rest()
    handle = offloadkit.apply(pipe, {"version": 1, "device": "cuda", "components": {
        "*": {"strategy": "model", "transfer": "pinned", "prefetch": True}}})
    assert isinstance(pipe.unet._hf_hook.stream, torch.cuda.Stream)
    for _ in range(3):
        np.testing.assert_allclose(run(pipe), reference, atol=1e-5)
    actions = [(e.component, e.action) for e in handle.trace.for_call(3)]
    assert ("unet", "prefetch") in actions and ("unet", "onload") not in actions
    assert allocated_at_rest() - at_rest < MiB  # nothing left on the device between calls
    handle.remove()


def test_prefetched_vae_survives_sdxl_upcasting_it_before_decode():
    # SDXL casts an fp16 VAE to float32 between the UNet and the decode: that cast must not read (or free)
    # the prefetched weights before their side-stream copies are done.
    pipe = tiny_pipeline("sdxl").to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    reference = run(pipe.to("cuda"))
    pipe.to("cpu")
    pipe.vae.to(torch.float16)
    offloadkit.apply(pipe, {"version": 1, "device": "cuda", "components": {
        "unet": {"strategy": "model", "transfer": "pinned"},
        "vae": {"strategy": "model", "transfer": "pinned", "prefetch": True}}})
    for _ in range(2):
        np.testing.assert_allclose(run(pipe), reference, atol=1e-3)


# --- quantized components on CUDA (the table's rows that need an accelerator to show) ---------------

QUANT_CUDA_RULES = {
    "model": {"strategy": "model"},
    "pinned": {"strategy": "model", "transfer": "pinned"},
    "copy-free": {"strategy": "model", "transfer": "copy-free"},
    "pinned-prefetch": {"strategy": "model", "transfer": "pinned", "prefetch": True},
    "stream": {"strategy": "stream", "resident": 1, "prefetch": 2},
    "stream-disk": {"strategy": "stream", "resident": 0, "from": "disk"},
    "group": {"strategy": "group", "offload_type": "leaf_level"},
    "sequential": {"strategy": "sequential"},
}


@pytest.mark.parametrize("backend", ["torchao", "quanto", "bnb_8bit", "bnb_4bit", "gguf", "layerwise_casting"])
@pytest.mark.parametrize("rule_name", QUANT_CUDA_RULES)
def test_quantized_unet_under_each_allowed_strategy_on_cuda(backend, rule_name):
    """What the capability table allows runs on CUDA and gives the outputs of the quantized pipeline on CUDA."""
    from offloadkit.plans.library_gates import limit_for
    from offloadkit.policy.rules import RULES as RULE_CLASSES

    from quantized import quantize

    rule = QUANT_CUDA_RULES[rule_name]
    if limit_for(backend, RULE_CLASSES[rule["strategy"]].model_validate(rule)) is not None:
        pytest.skip("refused by the capability table (tested on CPU)")
    reference_pipe = tiny_pipeline("sd")
    quantize(reference_pipe.unet, backend, device="cuda")
    with torch.no_grad():
        reference = run(reference_pipe.to("cuda"))
    del reference_pipe
    at_rest = allocated_at_rest()  # cuBLAS workspaces; nothing of a pipeline
    # The same weights, quantized where a loader with a device_map would, then put under the policy.
    pipe = tiny_pipeline("sd")
    quantize(pipe.unet, backend, device="cuda")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"unet": rule}}, device="cuda")
    with torch.no_grad():
        for _ in range(2):
            np.testing.assert_allclose(run(pipe), reference, atol=2e-3)
    assert all(p.device.type != "cuda" for p in pipe.unet.parameters())  # offloaded after the call
    # and no second reference (bitsandbytes' `weight.CB` / `state.CB`, a quantization state) kept a device
    # copy alive: what a parent module's `.to()` does not move stays allocated here
    assert allocated_at_rest() - at_rest < MiB
    handle.remove()


def test_quanto_with_diffusers_group_offloading_fails_on_cuda_as_the_table_says():
    """The (quanto, group) row: diffusers' engine leaves quanto weights on the CPU (diffusers#12610)."""
    from diffusers.hooks import apply_group_offloading

    from quantized import quantize

    pipe = tiny_pipeline("sd")
    quantize(pipe.unet, "quanto")
    pipe.to("cuda")
    apply_group_offloading(pipe.unet, onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                           offload_type="leaf_level")
    with pytest.raises(RuntimeError), torch.no_grad():
        run(pipe)


@pytest.mark.parametrize("backend, rule", [
    ("bnb_8bit", {"strategy": "group"}),                          # row (k): the layer's `state.CB` stays behind
    ("bnb_4bit", {"strategy": "group", "offload_type": "leaf_level"}),  # row (l): quant_state stays on the host
])
def test_refused_pairs_that_need_an_accelerator_do_fail_on_cuda(backend, rule, monkeypatch):
    """The table's limits seen only in the libraries' source: forced past the table, they must misbehave here."""
    import offloadkit.policy.capabilities

    from quantized import quantize

    reference_pipe = tiny_pipeline("sd")
    quantize(reference_pipe.unet, backend, device="cuda")
    with torch.no_grad():
        reference = run(reference_pipe.to("cuda"))
    del reference_pipe
    at_rest = allocated_at_rest()
    pipe = tiny_pipeline("sd")
    quantize(pipe.unet, backend, device="cuda")
    monkeypatch.setattr(offloadkit.policy.capabilities, "LIMITS", ())  # forced past the table
    offloadkit.apply(pipe, {"version": 1, "components": {"unet": rule}}, device="cuda")
    try:
        with torch.no_grad():
            images = run(pipe)
    except RuntimeError as exc:  # a device mismatch (bitsandbytes 4-bit: asks for the stream of a host tensor)
        message = str(exc).lower()
        assert "device" in message or "cuda" in message or "getcurrentstream" in message, exc
        return
    # no error: then it computed wrongly, or left weights on the device after the call (nothing offloaded),
    # or kept device copies alive outside the parameters (bitsandbytes 8-bit's `state.CB`)
    left_on_device = any(p.device.type == "cuda" for p in pipe.unet.parameters())
    pipe_bytes = sum(t.numel() * t.element_size() for t in pipe.unet.parameters())
    held = allocated_at_rest() - at_rest
    assert left_on_device or held > pipe_bytes // 4 or not np.allclose(images, reference, atol=2e-3), \
        "the refused pair ran correctly on CUDA and freed the device: the limit should be lifted"


def test_storage_dtype_with_pinned_prefetch_on_cuda_equals_diffusers_layerwise_casting():
    ours = tiny_pipeline("sdxl")
    policy = {"version": 1, "components": {"*": {"strategy": "model", "transfer": "pinned", "prefetch": True},
                                           "unet": {"strategy": "model", "transfer": "pinned", "prefetch": True,
                                                    "storage_dtype": "float8_e4m3fn"}}}
    handle = offloadkit.apply(ours, policy, device="cuda")
    theirs = tiny_pipeline("sdxl")
    theirs.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    theirs.to("cuda")
    reference = run(theirs)
    for _ in range(2):
        np.testing.assert_allclose(run(ours), reference, atol=1e-5)
    moved = [e.bytes for e in handle.trace.for_call(2) if e.component == "unet" and e.action in ("onload", "prefetch")]
    assert moved and all(b == handle.plan.component("unet").bytes for b in moved)


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_quantize_on_apply_on_cuda_equals_the_backend(backend):
    from quantized import quantize

    ours = tiny_pipeline("sd")
    offloadkit.apply(ours, {"version": 1, "components": {"unet": {"strategy": "model", "quantize": "int8",
                                                                  "quantize_with": backend}}}, device="cuda")
    theirs = tiny_pipeline("sd")
    quantize(theirs.unet, backend, linear_only=True)
    with torch.no_grad():
        reference = run(theirs.to("cuda"))
        np.testing.assert_allclose(run(ours), reference, atol=2e-3)


# --- `stream` on CUDA: side stream, pinned blocks, the pool ------------------------------------------

def test_stream_on_cuda_equals_resident_with_a_flat_pool_and_pinned_blocks():
    reference_pipe = tiny_pipeline("flux").to("cuda")
    with torch.no_grad():
        reference = run(reference_pipe)
    del reference_pipe
    at_rest = allocated_at_rest()
    pipe = tiny_pipeline("flux")
    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "transformer": {"strategy": "stream", "resident": 2, "prefetch": 2}}}, device="cuda")
    stream = handle.residency("transformer").host_copy.blocks
    assert all(pack.host.is_pinned() for pack in stream.packs.values())
    peaks = []
    with torch.no_grad():
        for _ in range(3):
            torch.cuda.reset_peak_memory_stats()
            np.testing.assert_array_equal(run(pipe), reference)
            peaks.append(torch.cuda.max_memory_allocated())
    assert max(peaks) - min(peaks) < MiB  # the pool is reused: nothing allocated per block grows a peak
    figures = handle.trace.calls_summary()[-1].streams["transformer"]
    assert figures["bytes"] > 0 and figures["copy_seconds"] > 0 and figures["exposed_seconds"] >= 0
    assert all(p.device.type != "cuda" for p in pipe.transformer.parameters())  # offloaded after the call
    assert allocated_at_rest() - at_rest < MiB
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with torch.no_grad():
        for _ in range(50):
            run(pipe, num_inference_steps=1)
    handle.remove()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)  # bit-identical after 50 calls


def test_stream_under_a_pinned_cap_streams_the_rest_from_pageable_memory_on_cuda():
    pipe = tiny_pipeline("flux")
    reference = run(tiny_pipeline("flux").to("cuda"))
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"transformer": {"strategy": "stream", "resident": 0}},
                                  "pinned_memory": "1B"}, device="cuda")
    assert plan.component("transformer").stream.pinned == ()
    handle = offloadkit.apply(pipe, {"version": 1, "pinned_memory": "1B",
                                     "components": {"transformer": {"strategy": "stream", "resident": 0}}},
                              device="cuda")
    assert not any(p.host.is_pinned() for p in handle.residency("transformer").host_copy.blocks.packs.values())
    np.testing.assert_array_equal(run(pipe), reference)
    handle.remove()
