"""`stream`: resident blocks plus a stream of the rest through a fixed pool, on the CPU's code path.

On the CPU the same code runs as on CUDA, without side streams or pinning: streamed blocks are
copied into pool slots for their forward and left on `meta` between uses, so outputs, weights
leaving, the pool's reuse and the layout are all observable here.
"""

import os

import numpy as np
import pytest
import torch

import offloadkit
from offloadkit.errors import PolicyError
from offloadkit.plans.pipeline_spec import spec_from_pipeline
from offloadkit.plans.resolve import resolve
from offloadkit.plans.stream_layout import Machine
from offloadkit.policy.loading import load
from offloadkit.testing import tiny_pipeline

from helpers import assert_same_images, run

DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def _policy(pipeline, **options):
    return {"version": 1, "components": {DENOISER[pipeline]: {"strategy": "stream", **options}}}


@pytest.mark.parametrize("pipeline, options", [
    ("flux", {"resident": 0}),
    ("flux", {"resident": 2, "prefetch": 2}),
    ("flux", {"resident": "50%", "placement": "first"}),
    ("flux", {"resident": 1, "placement": "last", "prefetch": 4}),
    ("sdxl", {"resident": 0}),
    ("sdxl", {"resident": 1, "prefetch": 3}),
    ("sd3", {"resident": 0, "keep_on_device": True}),
])
def test_outputs_equal_no_offload_over_two_calls_and_after_remove(pipeline, options):
    pipe = tiny_pipeline(pipeline)
    reference = run(pipe)
    denoiser = getattr(pipe, DENOISER[pipeline])
    handle = offloadkit.apply(pipe, _policy(pipeline, **options), device="cpu")
    layout = handle.plan.component(DENOISER[pipeline]).stream
    assert layout.streamed, "something streams"
    assert_same_images(run(pipe), reference)
    assert_same_images(run(pipe), reference)
    # between uses the streamed blocks' weights are their host copies again (the slot copy is dropped)
    stream = handle.residency(DENOISER[pipeline]).host_copy.blocks
    for path in layout.streamed:
        pack = stream.packs[path]
        assert all(pack.points_into(pack.host, p) for p in denoiser.get_submodule(path).parameters())
    summary = handle.trace.calls_summary()[-1].streams[DENOISER[pipeline]]
    assert summary["resident_blocks"] == len(layout.resident)
    assert summary["streamed_blocks"] == len(layout.streamed)
    assert summary["bytes"] > 0
    handle.remove()
    assert all(p.device.type == "cpu" for p in denoiser.parameters())
    assert_same_images(run(pipe), reference)


def test_streamed_blocks_run_from_the_pool_and_the_pool_is_reused():
    pipe = tiny_pipeline("flux")
    handle = offloadkit.apply(pipe, _policy("flux", resident=0, prefetch=1), device="cpu")
    layout = handle.plan.component("transformer").stream
    pool = handle.residency("transformer").host_copy.blocks
    slots_seen = {}

    def watch(path):
        def hook(module, args):
            pointer = next(module.parameters()).data_ptr()
            start = pool.pool.data_ptr()
            assert start <= pointer < start + pool.pool.numel(), f"{path} computes from its pool slot"
            slots_seen.setdefault(path, set()).add((pointer - start) // pool.slot_size)
        return hook

    blocks = [pipe.transformer.get_submodule(p) for p in layout.streamed]
    removable = [b.register_forward_pre_hook(watch(p)) for p, b in zip(layout.streamed, blocks)]
    run(pipe)
    for r in removable:
        r.remove()
    assert set(slots_seen) == set(layout.streamed)
    assert {s for slots in slots_seen.values() for s in slots} == {0, 1}  # 6 blocks through 2 buffers
    handle.remove()


def test_placement_chooses_which_blocks_stay():
    pipe = tiny_pipeline("flux")
    names = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(4)]

    def resident(**options):
        return offloadkit.plan(pipe, _policy("flux", **options), device="cpu").component("transformer").stream.resident

    assert resident(resident=2, placement="first") == tuple(names[:2])
    assert resident(resident=2, placement="last") == tuple(names[-2:])
    assert resident(resident=2) == (names[1], names[4])  # spread: the middle of each half
    assert resident(resident=3) == (names[1], names[3], names[5])
    assert resident(resident="50%", placement="first") == tuple(names[:3])
    assert resident(resident=0) == ()
    assert len(resident(resident=99)) == 6


@pytest.mark.filterwarnings("ignore::offloadkit.errors.BudgetWarning")  # the small budget is for the denoiser
def test_resident_as_a_size_and_auto_under_a_budget():
    pipe = tiny_pipeline("flux")
    plan = offloadkit.plan(pipe, _policy("flux", resident=0), device="cpu")
    layout = plan.component("transformer").stream
    sizes = dict(layout.blocks)
    two = sizes["transformer_blocks.0"] + sizes["transformer_blocks.1"]
    by_size = offloadkit.plan(pipe, _policy("flux", resident=f"{two}B", placement="first"), device="cpu")
    assert by_size.component("transformer").stream.resident == ("transformer_blocks.0", "transformer_blocks.1")

    # auto: the most blocks whose rest + resident blocks + pool fit the budget
    budget = layout.rest_bytes + sizes["transformer_blocks.0"] + 2 * layout.slot_bytes + 4096
    policy = {**_policy("flux", placement="first"), "budget": {"device_memory": budget}}
    chosen = offloadkit.plan(pipe, policy, device="cpu").component("transformer").stream
    assert chosen.device_bytes <= budget
    assert len(chosen.resident) >= 1
    assert "fits the budget of" in chosen.reason
    bigger = offloadkit.plan(pipe, {**policy, "budget": {"device_memory": budget * 4}}, device="cpu")
    assert len(bigger.component("transformer").stream.resident) > len(chosen.resident)
    text = str(offloadkit.plan(pipe, policy, device="cpu"))
    assert f"{len(chosen.resident)} of 6 blocks resident (fits the budget of" in text
    # the trace's peak for the denoiser is what the layout holds on the device
    handle = offloadkit.apply(pipe, policy, device="cpu")
    run(pipe)
    assert handle.trace.calls_summary()[-1].stage_peak_bytes["denoise"] == chosen.device_bytes
    handle.remove()


def test_auto_on_a_gpu_machine_uses_free_memory_less_headroom_and_the_pinned_cap():
    """The plan's layout for a CUDA machine, from the resolution alone (no GPU needed to plan)."""
    pipe = tiny_pipeline("flux")
    spec = spec_from_pipeline(pipe)
    base = resolve(load(_policy("flux", resident=0)), spec, "cuda:0").component("transformer").stream
    sizes = dict(base.blocks)
    room = base.device_bytes + sum(sizes.values())  # free memory for every block
    policy = load(_policy("flux", headroom=base.device_bytes))
    plan = resolve(policy, spec, "cuda:0", machine=Machine(device_free=room, device_total=room * 2,
                                                           host_ram=1 << 30, system="Linux"))
    layout = plan.component("transformer").stream
    assert 0 < len(layout.resident) < 6 and layout.device_bytes <= room - base.device_bytes
    assert "headroom" in layout.reason
    assert layout.pinned == layout.streamed and layout.core_pinned  # 50% of 1 GiB pins everything
    # a pinned cap of one block: the first streamed block pinned, the others pageable, and the plan says so
    one = max(sizes.values()) + 4096
    capped = resolve(load({**_policy("flux", resident=0), "pinned_memory": one}), spec, "cuda:0",
                     machine=Machine(host_ram=1 << 30, system="Linux")).component("transformer").stream
    assert len(capped.pinned) == 1 and len(capped.pageable) == 5 and not capped.core_pinned
    assert "pageable RAM (5:" in capped.summary()
    # no CUDA: nothing pinned
    cpu = resolve(load(_policy("flux", resident=0)), spec, "cpu", machine=Machine(host_ram=1 << 30))
    assert cpu.component("transformer").stream.pinned == ()


def test_the_stream_component_is_in_the_chain_and_keep_on_device_keeps_it():
    pipe = tiny_pipeline("flux")
    handle = offloadkit.apply(pipe, _policy("flux", resident=1), device="cpu")
    assert handle.plan.sequence == ("text_encoder", "text_encoder_2", "transformer", "vae")
    assert handle.plan.component("transformer").offloaded_by == "vae"
    run(pipe)
    moves = [(e.component, e.action) for e in handle.trace.for_call(1)]
    assert moves.index(("text_encoder_2", "offload")) < moves.index(("transformer", "onload"))
    assert ("transformer", "offload") in moves and ("transformer", "stream") in moves
    handle.remove()

    handle = offloadkit.apply(pipe, _policy("flux", resident=1, keep_on_device=True), device="cpu")
    run(pipe)
    run(pipe)
    second = [(e.component, e.action) for e in handle.trace.for_call(2)]
    assert ("transformer", "onload") not in second and ("transformer", "stream") in second
    handle.remove()


def test_blocks_are_checked_against_the_model(tmp_path):
    pipe = tiny_pipeline("flux")
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\ncomponents:\n  transformer:\n    strategy: stream\n"
                    "    blocks: [transformer_block]\n")
    with pytest.raises(PolicyError) as info:
        offloadkit.plan(pipe, str(path), device="cpu")
    message = str(info.value)
    assert "policy.yaml:5" in message and "no submodule 'transformer_block'" in message
    assert "Did you mean 'transformer_blocks'?" in message
    with pytest.raises(PolicyError, match="one inside the other"):
        offloadkit.plan(pipe, _policy("flux", blocks=["transformer_blocks", "transformer_blocks.0"]), device="cpu")
    with pytest.raises(PolicyError, match=r"no top-level ModuleList of blocks to stream. Name them with `blocks:`, "
                                          r"e.g. `blocks: \[encoder.down_blocks\]`"):
        offloadkit.plan(pipe, {"version": 1, "components": {"vae": {"strategy": "stream"}}}, device="cpu")
    # named blocks: the VAE's decoder, streamed
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {
        "vae": {"strategy": "stream", "blocks": ["decoder.up_blocks"], "resident": 0}}}, device="cpu")
    assert handle.plan.component("vae").stream.streamed == ("decoder.up_blocks.0", "decoder.up_blocks.1")
    assert_same_images(run(pipe), reference)
    handle.remove()


@pytest.mark.parametrize("bad, message", [
    ({"resident": "lots"}, "cannot read `resident: 'lots'`"),
    ({"resident": -1}, "cannot read `resident: -1`"),
    ({"resident": "120%"}, "0 to 100"),
    ({"prefetch": 0}, "must be at least 1, not 0. Write 1 or more"),
    ({"placement": "middle"}, "placement"),
    ({"folder": "/tmp/x"}, "`folder` is where `from: disk` puts its files"),
    ({"blocks": []}, "blocks"),
])
def test_options_are_validated(bad, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load(_policy("flux", **bad))


def test_a_pinned_cap_is_a_size_or_a_share():
    assert load({"version": 1, "pinned_memory": "40%"}).pinned_memory == "40%"
    assert load({"version": 1, "pinned_memory": "8GiB"}).pinned_memory == "8GiB"
    with pytest.raises(PolicyError, match="cannot read 'half'. Write `auto`, a size"):
        load({"version": 1, "pinned_memory": "half"})


def test_from_disk_streams_from_files_that_go_with_remove(tmp_path):
    pipe = tiny_pipeline("flux")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, _policy("flux", resident=2, **{"from": "disk"}, folder=str(tmp_path)),
                              device="cpu")
    files = [f for _, _, names in os.walk(tmp_path) for f in names]
    assert files, "the streamed blocks were written to the folder"
    assert_same_images(run(pipe), reference)
    assert_same_images(run(pipe), reference)
    assert handle.trace.for_call(2)[-1].component in ("vae", "transformer")
    assert any(e.action == "stream" and e.source == "disk" for e in handle.trace.for_call(2))
    handle.remove()
    assert not [f for _, _, names in os.walk(tmp_path) for f in names]
    assert_same_images(run(pipe), reference)


def test_weights_are_bit_identical_after_many_calls_and_remove():
    pipe = tiny_pipeline("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    handle = offloadkit.apply(pipe, _policy("flux", resident=2, prefetch=2), device="cpu")
    for _ in range(10):
        run(pipe, num_inference_steps=1)
    handle.remove()
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_block_order_other_than_declared_is_learned():
    """`blocks` listed in another order than they run: outputs exact, and prefetches follow the order seen."""
    pipe = tiny_pipeline("flux")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, _policy("flux", resident=0, blocks=["single_transformer_blocks",
                                                                       "transformer_blocks"]), device="cpu")
    stream = handle.residency("transformer").host_copy.blocks
    assert stream.order[0] == "single_transformer_blocks.0"
    assert_same_images(run(pipe), reference)
    assert stream.order[:3] == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0"]
    assert_same_images(run(pipe), reference)
    handle.remove()


def test_a_vae_the_pipeline_upcasts_is_refused_when_its_blocks_would_stream():
    pipe = tiny_pipeline("sdxl").to(torch.float16)
    rule = {"strategy": "stream", "blocks": ["decoder.up_blocks"], "resident": 0}
    with pytest.raises(PolicyError, match="'vae' is a VAE with `force_upcast` in a float16 pipeline.*"
                                          "`strategy: model`"):
        offloadkit.plan(pipe, {"version": 1, "components": {"vae": rule}}, device="cpu")
    assert offloadkit.plan(pipe, {"version": 1, "components": {"vae": {**rule, "resident": 2}}}, device="cpu")


def test_a_wildcard_stream_rule_moves_models_without_blocks_as_a_whole():
    pipe = tiny_pipeline("flux")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "stream", "resident": 1}}},
                              device="cpu")
    assert handle.plan.component("vae").stream.blocks == ()
    assert "moves as a whole" in handle.plan.component("vae").reason
    assert handle.plan.component("transformer").stream.streamed
    assert handle.plan.component("text_encoder").stream.blocks == ()  # its layers are nested: named with `blocks:`
    assert_same_images(run(pipe), reference)
    handle.remove()
    assert_same_images(run(pipe), reference)


def test_the_prediction_on_a_gpu_profile_gives_the_layout_and_its_pinned_host_ram():
    from offloadkit.plans.stream_layout import aligned
    from offloadkit.prediction.replay import predict

    pipe = tiny_pipeline("flux")
    prediction = predict(pipe, _policy("flux", resident=1), hardware="rtx-3060-12gb")
    layout = offloadkit.plan(pipe, _policy("flux", resident=1), device="cpu").component("transformer").stream
    # 32 GiB of host RAM on Linux: half may be pinned, which holds every streamed block and the rest
    assert prediction.pinned_host_bytes == sum(aligned(b) for p, b in layout.blocks if p in layout.streamed) \
        + aligned(layout.core_bytes)
    assert any(n.startswith("transformer: 1 of 6 blocks resident") and "from pinned RAM" in n
               for n in prediction.notes)
    assert "pinned host RAM" in str(prediction)


@pytest.mark.parametrize("backend", ["plain", "bnb_8bit", "bnb_4bit", "torchao", "quanto", "gguf"])
def test_no_reference_into_a_pool_slot_outlives_the_call(backend):
    """No reference into a device slot outlives the call (bitsandbytes 8-bit keeps `state.CB` of its own)."""
    import gc
    import weakref

    from quantized import quantize

    pipe = tiny_pipeline("sd")
    if backend != "plain":
        quantize(pipe.unet, backend)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"unet": {"strategy": "stream", "resident": 0}}},
                              device="cpu")
    stream = handle.residency("unet").host_copy.blocks
    seen = []
    first = pipe.unet.get_submodule(handle.plan.component("unet").stream.streamed[0])
    hook = first.register_forward_hook(lambda *_: seen.append(weakref.ref(stream.pool)))
    run(pipe)
    hook.remove()
    gc.collect()
    assert seen and all(ref() is None for ref in seen)
    # bitsandbytes 8-bit: the layer's own `state.CB`, taken from the weight at its first forward, is back
    # on the block's host copy too (not on a copy of a slot of its own)
    for path, pack in stream.packs.items():
        for module in pipe.unet.get_submodule(path).modules():
            state = getattr(module, "state", None)
            if getattr(state, "CB", None) is not None:
                assert pack.points_into(pack.host, state.CB), path
    handle.remove()


def test_bitsandbytes_4bit_repacked_at_its_first_forward_computes_the_same_every_time():
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight and state at its first forward and
    flags it; a packed copy made before that puts the flag back with the layout (else later forwards misread it)."""
    bnb = pytest.importorskip("bitsandbytes")
    from offloadkit.runtime.packed_weights import PackedWeights

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 128)
    layer = bnb.nn.LinearNF4(128, 128, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu").eval()
    x = torch.randn(4, 128)
    pack = PackedWeights([layer.weight, layer.bias], list(layer.modules()))
    slot = torch.empty(pack.size, dtype=torch.uint8)
    outputs = []
    with torch.no_grad():
        for _ in range(3):
            pack.copy_to(slot)
            pack.attach(slot)
            outputs.append(layer(x))
            pack.detach()
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("rule", [{"strategy": "group"}, {"strategy": "sequential"},
                                  {"strategy": "disk", "granularity": "block"}])
def test_text_encoders_leave_when_an_unchained_denoiser_starts(rule):
    """With the denoiser out of the chain, the text encoders' chain successor is the VAE: they used to stay on the
    device through every denoising step. They leave when the denoiser, a model of a later stage, starts."""
    from offloadkit.prediction.replay import predict
    from offloadkit.prediction.schedule import CallSettings

    pipe = tiny_pipeline("flux")
    reference = run(pipe)
    policy = {"version": 1, "components": {"transformer": rule}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert handle.plan.sequence == ("text_encoder", "text_encoder_2", "vae")
    during = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(  # inside the transformer's forward
        lambda *_: during.append(handle.residency("text_encoder_2").resident))
    assert_same_images(run(pipe), reference)
    hook.remove()
    assert during and not any(during)  # T5 was off the device for every transformer forward
    moves = [(e.component, e.action) for e in handle.trace.for_call(1)]
    assert moves.index(("text_encoder_2", "offload")) < moves.index(("vae", "onload"))
    # the prediction replays the same rule: its events equal the trace's
    handle.remove()
    handle = offloadkit.apply(pipe, policy, device="cpu")
    prediction = predict(pipe, policy, device="cpu", settings=CallSettings(steps=2))
    run(pipe)
    assert [(e.component, e.action, e.bytes) for e in prediction.events if e.call == 1] == \
        [(e.component, e.action, e.bytes) for e in handle.trace.for_call(1)]
    text = str(handle.plan)
    handle.remove()
    assert "transformer starts" in text
