"""Quantized components: detection, real sizes, the capability table, per-backend rules, declared precision.

Every backend here really runs on the CPU (torchao, optimum-quanto, bitsandbytes,
GGUF, diffusers' layerwise casting): the tiny SD pipeline's UNet is quantized with
it, and its outputs under each strategy the table allows equal the same quantized
pipeline without a policy. Each pair the table forbids is a validation error.
"""

import numpy as np
import pytest
import torch

import offloadkit
import offloadkit.runtime.precision
from offloadkit.plans import library_gates
from offloadkit.policy.capabilities import LIMITS, format_capabilities
from offloadkit.policy.rules import RULES as RULE_CLASSES, ModelRule
from offloadkit.errors import PipelineError, PolicyError
from offloadkit.plans.pipeline_spec import spec_from_pipeline
from offloadkit.tensor_bytes import module_bytes
from offloadkit.testing import tiny_call_kwargs, tiny_pipeline


def limit_for(backend, strategy, options):
    """The table's limit for a rule written as a strategy name and options."""
    return library_gates.limit_for(backend, RULE_CLASSES[strategy].model_validate({"strategy": strategy, **options}))

from helpers import assert_same_images, run
from quantized import REAL_BACKENDS, mark, needs, quantize

# One rule per strategy (and per `model` transfer that swaps `param.data`).
RULES = {
    "model": {"strategy": "model"},
    "model-copy-free": {"strategy": "model", "transfer": "copy-free"},
    "model-copy-free-prefetch": {"strategy": "model", "transfer": "copy-free", "prefetch": True},
    "group-block": {"strategy": "group"},
    "group-leaf": {"strategy": "group", "offload_type": "leaf_level"},
    "sequential": {"strategy": "sequential"},
    "disk": {"strategy": "disk"},
    "resident": {"strategy": "resident"},
    "stream": {"strategy": "stream", "resident": 1},
    "stream-disk": {"strategy": "stream", "resident": 0, "from": "disk"},
}


def _options(rule):
    return {k: v for k, v in rule.items() if k != "strategy"}


def quantized_sd(backend):
    pipe = tiny_pipeline("sd")
    quantize(pipe.unet, backend)
    return pipe


# --- detection and sizing ---------------------------------------------------------------------------

def _float_bytes(module):
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(module)[""]


def _expected_bytes(module, backend):
    """Stored bytes, counted per backend from the layers' shapes (independently of offloadkit.tensor_bytes)."""
    total = 0
    for sub in module.modules():
        for name, tensor in list(sub._parameters.items()) + list(sub._buffers.items()):
            if tensor is None:
                continue
            kind = type(tensor).__name__
            if name == "weight" and kind == "Int8Tensor":  # torchao: int8 + float32 scale + int8 zero point per row
                total += tensor.numel() + tensor.shape[0] * 4 + tensor.shape[0]
            elif name == "weight" and kind == "WeightQBytesTensor":  # quanto: int8 + one scale per output channel
                total += tensor.numel() + tensor.shape[0] * 4
            elif kind == "Int8Params":  # int8 + a float32 scale per row
                total += tensor.numel() + tensor.shape[0] * 4
            elif kind == "Params4bit":  # two weights a byte, plus absmax/code (nested) state
                state = tensor.quant_state
                total += tensor.numel() + state.absmax.numel() + state.code.numel() * 4 + 4 \
                    + state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4  # 4: the offset
            elif kind == "GGUFParameter":  # Q8_0: 34 bytes per block of 32 weights, stored as uint8
                total += tensor.numel()
            else:
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("backend", REAL_BACKENDS)
def test_each_backend_is_detected_and_sized_as_stored(backend):
    pipe = quantized_sd(backend)
    spec = spec_from_pipeline(pipe)
    unet = spec.get("unet")
    assert unet.quantization == backend
    assert spec.get("vae").quantization is None
    assert unet.bytes == module_bytes(pipe.unet) == _expected_bytes(pipe.unet, backend)
    assert unet.bytes < _float_bytes(tiny_pipeline("sd").unet)
    plan = offloadkit.plan(pipe, {"version": 1}, device="cpu")
    label = offloadkit.plans.quantization.BACKENDS[backend]
    assert plan.component("unet").weights.startswith(label)
    assert label in str(plan) and plan.component("unet").bytes == unet.bytes


def test_accelerate_counts_torchao_and_quanto_at_their_float_size_offloadkit_does_not():
    for backend in ("torchao", "quanto"):
        pipe = quantized_sd(backend)
        assert _float_bytes(pipe.unet) >= _float_bytes(tiny_pipeline("sd").unet)  # why offloadkit counts itself
        assert module_bytes(pipe.unet) < _float_bytes(pipe.unet)


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_assigning_param_data_leaves_a_wrapper_subclass_unchanged(backend):
    """Why copy-free and pinned transfers move torchao and quanto weights by their inner tensors, not `.data`."""
    first, second = (quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), backend)[0] for _ in range(2))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before, target = first(x), second(x)
        first.weight.data = second.weight.data
        assert torch.equal(first(x), before) and not torch.equal(before, target)


@pytest.mark.parametrize("backend", ["bnb_8bit", "bnb_4bit", "torchao", "quanto", "gguf", "other"])
def test_loader_attributes_alone_are_detected(backend):
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, backend)
    found = offloadkit.plans.quantization.detect(pipe.unet)
    assert (found.backend, found.found_by) == (backend, "attributes")


# --- the capability table ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", REAL_BACKENDS)
@pytest.mark.parametrize("rule_name", RULES)
def test_allowed_strategies_give_the_outputs_of_the_quantized_pipeline_without_offload(backend, rule_name):
    rule = RULES[rule_name]
    limit = limit_for(backend, rule["strategy"], _options(rule))
    pipe = quantized_sd(backend)
    policy = {"version": 1, "components": {"unet": rule}}
    if limit is not None:
        with pytest.raises(PolicyError) as info:
            offloadkit.apply(pipe, policy, device="cpu")
        message = str(info.value)
        assert "components.unet: 'unet' is " + offloadkit.plans.quantization.BACKENDS[backend] in message
        assert f"cannot use strategy {limit.what}" in message and limit.reason in message
        assert "Use " in message and limit.seen in message
        assert not hasattr(pipe, "_offloadkit_handle") and getattr(pipe.unet, "_hf_hook", None) is None
        return
    reference = run(pipe)
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert handle.plan.component("unet").strategy == rule["strategy"]
    assert_same_images(run(pipe), reference)
    assert_same_images(run(pipe), reference)
    if rule["strategy"] in ("sequential", "disk"):  # these really move on the CPU: meta between uses
        assert any(p.device.type == "meta" for p in pipe.unet.parameters())
    if rule["strategy"] == "stream":  # it computed from its pool: bytes streamed
        assert handle.trace.calls_summary()[-1].streams["unet"]["bytes"] > 0
    handle.remove()
    assert_same_images(run(pipe), reference)
    assert spec_from_pipeline(pipe).get("unet").quantization == backend


@pytest.mark.parametrize("backend, rule_name", [
    (backend, name) for backend in ("torchao", "bnb_8bit", "gguf", "layerwise_casting")
    for name in ("group-leaf", "sequential", "disk")
    if limit_for(backend, RULES[name]["strategy"], _options(RULES[name])) is None])
def test_a_quantized_transformers_text_encoder_streams_too(backend, rule_name):
    """The same for a transformers model (CLIP), under the allowed strategies that stream it piece by piece."""
    rule = RULES[rule_name]
    pipe = tiny_pipeline("sd")
    if backend == "layerwise_casting":  # a transformers model: through offloadkit's own selection
        offloadkit.runtime.precision._cast_layers(pipe.text_encoder, "float8_e4m3fn", "float32")
    else:
        quantize(pipe.text_encoder, backend)
    assert spec_from_pipeline(pipe).get("text_encoder").quantization == backend
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"text_encoder": rule}}, device="cpu")
    assert_same_images(run(pipe), reference)
    assert_same_images(run(pipe), reference)
    handle.remove()
    assert_same_images(run(pipe), reference)


@pytest.mark.parametrize("limit", LIMITS, ids=lambda lim: f"{lim.backend}-{lim.rule.name}-{'-'.join(lim.options)}")
def test_every_forbidden_pair_is_refused_on_the_detection_path(limit, monkeypatch):
    """Every row of the table, from the loader's attributes alone (what a GPU-only backend leaves on a model)."""
    gates = {"bnb_8bit": "bnb_8bit_movable", "torchao": "group_offloading_swaps_torchao"}
    if limit.gate:
        monkeypatch.setattr(library_gates, gates[limit.backend], lambda: False)
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, limit.backend)
    rule = {"strategy": limit.rule.name, **{k: v[0] for k, v in limit.options.items()}}
    with pytest.raises(PolicyError) as info:
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": rule}}, device="cpu")
    message = str(info.value)
    assert f"components.unet: 'unet' is {offloadkit.plans.quantization.BACKENDS[limit.backend]}" in message
    assert f"cannot use strategy {limit.what}" in message and limit.reason in message and "Use " in message
    if limit.gate:  # with libraries that can move the weights, the same rule is fine
        monkeypatch.setattr(library_gates, gates[limit.backend], lambda: True)
        assert offloadkit.plan(pipe, {"version": 1, "components": {"unet": rule}}, device="cpu")


def test_the_table_covers_every_backend_and_strategy_and_prints():
    text = format_capabilities()
    for limit in LIMITS:
        assert limit.reason in text
        for instead in limit.instead:  # an alternative is never itself refused for that backend
            assert instead is limit.rule or library_gates.limit_for(limit.backend, instead.default()) is None, \
                (limit, instead)
    rows = dict(offloadkit.policy.capabilities.capability_rows())
    assert rows["quanto"]["group"] == "no" and rows["torchao"]["group"].startswith("yes, except with a diffusers")
    assert rows["gguf"]["group"] == "yes" and rows["bnb_8bit"]["group"] == "no"
    assert rows["bnb_4bit"]["model"] == "yes" and rows["torchao"]["model"] == "yes"  # lifted by packed moves
    assert all(cells["stream"] == "yes" for cells in rows.values())
    assert all(list(cells) == list(RULE_CLASSES) for cells in rows.values())


# --- per-backend rules in the policy ----------------------------------------------------------------

def test_auto_replaces_a_strategy_the_backend_cannot_run_and_says_so():
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "bnb_4bit")
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": "sequential"}}}, device="cpu")
    unet = plan.component("unet")
    assert unet.strategy == "model" and "cannot run 'sequential'" in unet.reason
    assert plan.component("vae").strategy == "sequential"
    # `offload` means "the rule every other model gets", so the same pair is an error there
    with pytest.raises(PolicyError, match="quantization.bnb_4bit: 'unet' is bitsandbytes 4-bit and cannot use "
                                          "strategy 'sequential'"):
        offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": "sequential"}},
                               "quantization": {"bnb_4bit": "offload"}}, device="cpu")


@pytest.mark.parametrize("backend", ["torchao", "quanto", "bnb_8bit", "bnb_4bit"])
def test_copy_free_transfers_are_kept_for_quantized_weights_and_move_them_packed(backend):
    """Once refused (`.data` cannot move wrapper tensors or bitsandbytes' state): now packed, one buffer."""
    from offloadkit.runtime.transfers import PackedCopy

    pipe = quantized_sd(backend)
    policy = {"version": 1, "components": {"*": {"strategy": "model", "transfer": "copy-free"}}}
    plan = offloadkit.plan(pipe, policy, device="cpu")
    assert plan.component("unet").options["transfer"] == "copy-free"
    handle = offloadkit.apply(pipe, policy, device="cpu")
    assert isinstance(handle.residency("unet").host_copy, PackedCopy)
    assert not isinstance(handle.residency("vae").host_copy, PackedCopy)  # plain weights: as before
    handle.remove()


def test_a_backend_rule_gives_the_strategy_and_a_component_rule_overrides_it():
    needs("torchao")
    pipe = quantized_sd("torchao")
    policy = {"version": 1, "quantization": {"torchao": {"strategy": "group", "offload_type": "leaf_level"}}}
    plan = offloadkit.plan(pipe, policy, device="cpu")
    assert plan.component("unet").strategy == "group" and plan.component("unet").options["offload_type"] == \
        "leaf_level"
    assert "policy `quantization.torchao` rule" in plan.component("unet").reason
    assert plan.component("vae").strategy == "model"
    plan = offloadkit.plan(pipe, {**policy, "components": {"unet": {"strategy": "resident"}}}, device="cpu")
    assert plan.component("unet").strategy == "resident"
    # unset backends fall back to `other`
    plan = offloadkit.plan(pipe, {"version": 1, "quantization": {"other": "keep-on-device"}}, device="cpu")
    assert plan.component("unet").strategy == "skip"
    with pytest.raises(PolicyError, match="quantization.torchao: 'unet' is torchao .* `torchao: refuse`"):
        offloadkit.plan(pipe, {"version": 1, "quantization": {"torchao": "refuse"}}, device="cpu")


def test_a_backend_rule_that_can_never_run_is_refused_when_the_policy_is_loaded():
    with pytest.raises(PolicyError, match="quantization.quanto: quanto models cannot use strategy 'group': .*Use "
                                          "'model'"):
        offloadkit.load({"version": 1, "quantization": {"quanto": {"strategy": "group"}}})
    # lifted: moved packed, with their quantization state
    offloadkit.load({"version": 1, "quantization": {"bnb_4bit": {"strategy": "model", "transfer": "copy-free"}}})
    with pytest.raises(PolicyError, match="quantization.gguf: `storage_dtype` changes float weights"):
        offloadkit.load({"version": 1, "quantization": {"gguf": {"strategy": "model", "storage_dtype": "bfloat16"}}})
    # a limit that depends on the installed libraries is checked against the pipeline, at the key
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "bnb_8bit")
    import offloadkit.plans.library_gates as compatibility

    policy = offloadkit.load({"version": 1, "quantization": {"bnb_8bit": {"strategy": "model"}}})
    original = compatibility.bnb_8bit_movable
    compatibility.bnb_8bit_movable = lambda: False
    try:
        with pytest.raises(PolicyError, match="quantization.bnb_8bit: 'unet' is bitsandbytes 8-bit and cannot use "
                                              "strategy 'model': With transformers < 4.58.0"):
            offloadkit.plan(pipe, policy, device="cpu")
    finally:
        compatibility.bnb_8bit_movable = original


def test_bnb_8bit_auto_keeps_it_in_place_on_old_stacks(monkeypatch):
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "bnb_8bit")
    monkeypatch.setattr(offloadkit.plans.library_gates, "bnb_8bit_movable", lambda: False)
    plan = offloadkit.plan(pipe, {"version": 1}, device="cpu")
    assert plan.component("unet").strategy == "skip"
    with pytest.raises(PolicyError, match="With transformers < 4.58.0 or bitsandbytes < 0.48.0"):
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "model"}}}, device="cpu")


# --- precision declared in the policy ---------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["model", "group", "sequential", "disk", "resident"])
def test_storage_dtype_matches_diffusers_layerwise_casting(strategy):
    ours = tiny_pipeline("sd")
    handle = offloadkit.apply(ours, {"version": 1, "components": {"unet": {
        "strategy": strategy, "storage_dtype": "float8_e4m3fn", "compute_dtype": "float32"}}}, device="cpu")
    theirs = tiny_pipeline("sd")
    theirs.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert handle.plan.component("unet").bytes == module_bytes(theirs.unet) < _float_bytes(tiny_pipeline("sd").unet)
    assert_same_images(run(ours), run(theirs))
    handle.remove()  # the weights keep their storage precision, and the casting that runs them
    assert_same_images(run(ours), run(theirs))
    assert spec_from_pipeline(ours).get("unet").quantization == "layerwise_casting"
    offloadkit.apply(ours, {"version": 1, "components": {"unet": {"strategy": strategy,
                                                                  "storage_dtype": "float8_e4m3fn"}}}, device="cpu")
    assert_same_images(run(ours), run(theirs))


def test_storage_dtype_on_a_transformers_text_encoder_keeps_its_reported_dtype():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    policy = {"version": 1, "components": {"text_encoder": {"strategy": "model", "storage_dtype": "bfloat16"}}}
    plan = offloadkit.plan(pipe, policy, device="cpu")
    offloadkit.apply(pipe, policy, device="cpu")
    assert module_bytes(pipe.text_encoder) == plan.component("text_encoder").bytes
    assert pipe.text_encoder.dtype == torch.float32  # the pipeline casts prompt embeddings to it
    assert any(p.dtype == torch.bfloat16 for p in pipe.text_encoder.parameters())
    images = run(pipe)
    assert np.abs(np.asarray(images[0], dtype=float) - np.asarray(reference[0], dtype=float)).max() <= 8


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_quantize_on_apply_equals_the_backend_and_is_planned_exactly(backend):
    needs(backend)
    rule = {"strategy": "model", "quantize": "int8", "quantize_with": backend}
    pipe = tiny_pipeline("sd")
    policy = {"version": 1, "components": {"unet": rule, "text_encoder": rule}}
    plan = offloadkit.plan(pipe, policy, device="cpu")
    assert plan.component("unet").weights == f"int8 ({backend}, on apply)"
    handle = offloadkit.apply(pipe, policy, device="cpu")
    theirs = tiny_pipeline("sd")
    for name in ("unet", "text_encoder"):
        quantize(getattr(theirs, name), backend, linear_only=True)
        assert module_bytes(getattr(pipe, name)) == plan.component(name).bytes == module_bytes(getattr(theirs, name))
    assert spec_from_pipeline(pipe).get("unet").quantization == backend
    with torch.no_grad():
        assert_same_images(run(pipe), run(theirs))
    handle.remove()
    offloadkit.apply(pipe, policy, device="cpu")  # already quantized by the first apply: left as it is
    with torch.no_grad():
        assert_same_images(run(pipe), run(theirs))


def test_quantize_auto_picks_a_backend_the_strategy_can_run():
    needs("torchao")
    pipe = tiny_pipeline("sd")
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "group", "quantize": "int8"}}},
                           device="cpu")
    assert plan.component("unet").options["quantize_with"] == "torchao"
    with pytest.raises(PolicyError, match="components.unet.quantize: 'unet': `quantize` cannot be served for "
                                          "strategy 'disk': torchao cannot run with 'disk'.*Use another strategy"):
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "disk", "quantize": "int8"}}},
                        device="cpu")
    with pytest.raises(PolicyError, match="quanto cannot run with 'group': diffusers' group offloading assigns"):
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "group", "quantize": "int8",
                                                                     "quantize_with": "quanto"}}}, device="cpu")


def test_precision_on_an_already_quantized_component_is_refused():
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "bnb_4bit")
    with pytest.raises(PolicyError, match="components.unet.storage_dtype: 'unet' is already quantized "
                                          "\\(bitsandbytes 4-bit\\); `storage_dtype` applies to float weights. Remove"):
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "model",
                                                                     "storage_dtype": "float8_e4m3fn"}}},
                        device="cpu")
    cast = tiny_pipeline("sd")
    cast.unet.enable_layerwise_casting(storage_dtype=torch.float8_e5m2, compute_dtype=torch.float32)
    with pytest.raises(PolicyError, match="'unet' is already stored as float8_e5m2 \\(layerwise casting\\); the "
                                          "rule asks for `storage_dtype: float8_e4m3fn`. Reload"):
        offloadkit.plan(cast, {"version": 1, "components": {"unet": {"strategy": "model",
                                                                     "storage_dtype": "float8_e4m3fn"}}},
                        device="cpu")


@pytest.mark.parametrize("bad, message", [
    ({"storage_dtype": "float8_e4m3fn", "quantize": "int8"}, "cannot both be set"),
    ({"compute_dtype": "bfloat16"}, "Set `storage_dtype` too"),
    ({"quantize_with": "torchao"}, "Set `quantize: int8` too"),
    ({"storage_dtype": "int4"}, "storage_dtype"),
])
def test_precision_options_are_validated(bad, message):
    with pytest.raises(PolicyError, match=message):
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "model", **bad}}})


def test_a_missing_quantize_backend_is_named(monkeypatch):
    import offloadkit.plans.precision as precision

    monkeypatch.setattr(precision, "_installed", lambda backend: False)
    with pytest.raises(PolicyError, match="torchao is not installed \\(pip install torchao\\); optimum-quanto is "
                                          "not installed"):
        offloadkit.plan(tiny_pipeline("sd"), {"version": 1, "components": {"unet": {"strategy": "model",
                                                                                    "quantize": "int8"}}},
                        device="cpu")
    # validating against a pipeline class (CI, no weights) does not need the packages: applying does
    from offloadkit.plans.pipeline_spec import spec_from_class
    from offloadkit.plans.resolve import resolve

    plan = resolve(offloadkit.load({"version": 1, "components": {"unet": {"strategy": "model", "quantize": "int8"}}}),
                   spec_from_class("StableDiffusionPipeline"), "cuda:0")
    assert plan.component("unet").options["quantize_with"] == "torchao"


def test_apply_refuses_a_different_storage_dtype_than_the_one_already_applied():
    pipe = tiny_pipeline("sd")
    offloadkit.runtime.precision.apply_precision("unet", pipe.unet, ModelRule(strategy="model",
                                                                             storage_dtype="float8_e5m2"))
    with pytest.raises(PipelineError, match="already layerwise casting \\(stored as float8_e5m2\\)"):
        offloadkit.runtime.precision.apply_precision("unet", pipe.unet, ModelRule(strategy="model",
                                                                                 storage_dtype="float8_e4m3fn"))


def test_a_policy_that_quantized_a_model_resolves_the_same_when_applied_again():
    """After `quantize`, the model is torchao; the policy's own rule still decides, not `quantization.torchao`."""
    needs("torchao")
    for setting in ("keep-on-device", "refuse"):
        pipe = tiny_pipeline("sd")
        policy = {"version": 1, "components": {"*": {"strategy": "model", "quantize": "int8"}},
                  "quantization": {"torchao": setting}}
        first = offloadkit.apply(pipe, policy, device="cpu").plan
        assert spec_from_pipeline(pipe).get("unet").quantization == "torchao"
        offloadkit.remove(pipe)
        handle = offloadkit.apply(pipe, policy, device="cpu")
        handle.reinstall()  # what diffusers' loaders trigger: the plan is resolved again
        for again in (handle.plan, offloadkit.plan(pipe, policy, device="cpu")):
            assert [(c.name, c.strategy, c.bytes) for c in again.components] == \
                [(c.name, c.strategy, c.bytes) for c in first.components]
    # a model quantized otherwise (here: marked torchao by its loader) is refused, not silently left as it is
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "torchao")
    with pytest.raises(PolicyError, match="'unet' is already quantized \\(torchao\\); `quantize` applies to "
                                          "float weights"):
        offloadkit.plan(pipe, {"version": 1, "components": {"unet": {"strategy": "model", "quantize": "int8"}}},
                        device="cpu")


def test_a_wildcard_precision_change_skips_models_already_quantized_and_says_so():
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "gguf")
    plan = offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": "model",
                                                                     "storage_dtype": "float8_e4m3fn"}}},
                           device="cpu")
    assert "storage_dtype" not in plan.component("unet").options
    assert "already quantized (GGUF): the `*` rule's `storage_dtype` is not applied to it" in \
        plan.component("unet").reason
    assert plan.component("vae").options["storage_dtype"] == "float8_e4m3fn"


def test_auto_falls_back_to_a_strategy_the_backend_can_run_or_keeps_it_in_place(monkeypatch):
    monkeypatch.setattr(offloadkit.plans.library_gates, "bnb_8bit_movable", lambda: False)
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "bnb_8bit")
    for strategy in ("sequential", "disk"):  # their alternatives (model, group) cannot move it either
        plan = offloadkit.plan(pipe, {"version": 1, "components": {"*": {"strategy": strategy}}}, device="cpu")
        assert plan.component("unet").strategy == "skip" and "kept where it was loaded" in \
            plan.component("unet").reason


def test_refuse_holds_for_excluded_models_too():
    pipe = tiny_pipeline("sd")
    mark(pipe.unet, "quanto")
    with pytest.raises(PolicyError, match="quantization.quanto: 'unet' is optimum-quanto and the policy says "
                                          "`quanto: refuse`"):
        offloadkit.plan(pipe, {"version": 1, "exclude": ["unet"], "quantization": {"quanto": "refuse"}},
                        device="cpu")
    plan = offloadkit.plan(pipe, {"version": 1, "exclude": ["unet"], "quantization": {"quanto": "keep-on-device"}},
                           device="cpu")
    assert plan.component("unet").strategy == "resident"  # `exclude` wins over keep-on-device


def test_pipe_to_dtype_is_refused_while_the_policy_sets_storage_precision():
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, {"version": 1, "components": {"unet": {"strategy": "model",
                                                                  "storage_dtype": "float8_e4m3fn"}}}, device="cpu")
    with pytest.raises(PipelineError, match="'unet' has its storage precision set by the policy .*pipe.to\\(dtype\\)"):
        pipe.to(torch.bfloat16)
    assert any(p.dtype == torch.float8_e4m3fn for p in pipe.unet.parameters())
    run(pipe)


def test_storage_dtype_on_an_upcast_vae_of_a_float16_pipeline_is_refused():
    pipe = tiny_pipeline("sdxl").to(torch.float16)
    assert pipe.vae.config.force_upcast
    for compute in ({}, {"compute_dtype": "float32"}):
        with pytest.raises(PolicyError, match="components.vae.storage_dtype: 'vae' is a VAE with `force_upcast` in "
                                              "a float16 pipeline"):
            offloadkit.plan(pipe, {"version": 1, "components": {"vae": {
                "strategy": "model", "storage_dtype": "float8_e4m3fn", **compute}}}, device="cpu")
    assert offloadkit.plan(pipe, {"version": 1, "components": {"unet": {
        "strategy": "model", "storage_dtype": "float8_e4m3fn"}}}, device="cpu")


def test_quantize_picks_a_backend_that_runs_on_the_device(monkeypatch):
    from offloadkit.plans.resolve import resolve

    spec = spec_from_pipeline(tiny_pipeline("sd"))

    def backend_on(device, **rule):
        policy = offloadkit.load({"version": 1, "components": {"unet": {"strategy": "model", "quantize": "int8",
                                                                         **rule}}})
        return resolve(policy, spec, device).component("unet").options["quantize_with"]

    needs("torchao")
    assert backend_on("mps:0") == "torchao" and backend_on("cpu:0") == "torchao"
    assert backend_on("cuda:0", quantize_with="quanto") == "quanto"
    with pytest.raises(PolicyError, match="for strategy 'model': quanto does not run on mps: quanto's int8 "
                                          "matmul .*has no MPS kernel"):
        backend_on("mps:0", quantize_with="quanto")
    monkeypatch.setattr(offloadkit.plans.precision, "_installed", lambda backend: backend == "quanto")
    assert backend_on("cuda:0") == "quanto"
    with pytest.raises(PolicyError, match="torchao is not installed .*; quanto does not run on mps"):
        backend_on("mps:0")


def test_a_compute_dtype_other_than_the_components_is_refused_at_apply(tmp_path):
    """Inputs come in the component's dtype: layers cast up to another one would fail in the first call."""
    pipe = tiny_pipeline("sd")  # float32
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\ncomponents:\n  unet:\n    strategy: model\n    storage_dtype: float8_e4m3fn\n"
                      "    compute_dtype: float16\n")
    offloadkit.load(str(policy))  # valid on its own: the dtype is known once a pipeline is loaded
    with pytest.raises(PolicyError) as caught:
        offloadkit.apply(pipe, str(policy), device="cpu")
    message = str(caught.value)
    assert "p.yaml:6:" in message and "float32 weights" in message and "Remove `compute_dtype`" in message
    assert not hasattr(pipe, "_offloadkit_handle")
    # the same dtype as the weights is accepted and computes
    policy.write_text("version: 1\ncomponents:\n  unet:\n    strategy: model\n    storage_dtype: float8_e4m3fn\n"
                      "    compute_dtype: float32\n")
    offloadkit.apply(pipe, str(policy), device="cpu")
    assert pipe(**tiny_call_kwargs(pipe)).images.shape[0] == 1
