"""Sizes of pipelines without weights: built-in architectures, local folders, loaded pipelines."""

from __future__ import annotations

import json

import pytest
import torch

from offloadkit.prediction import sizing
from offloadkit.errors import DtypeError, ModelSourceError
from offloadkit.plans.pipeline_spec import module_bytes

# Parameter counts per component. "public": the widely published figure for the model;
# "build": what the meta build from the shipped config gives (a regression guard, with
# the arithmetic that ties it to a public figure where there is one).
CLIP_L = 123_060_480  # public: CLIP ViT-L/14 text model
CLIP_L_PROJ = CLIP_L + 768 * 768  # build: CLIP-L text model + its 768x768 text projection (SD3 uses it)
CLIP_BIGG_PROJ = 694_659_840  # public: OpenCLIP bigG text model with projection
T5_XXL = 4_762_310_656  # public: T5 v1.1 XXL encoder
UMT5_XXL = 5_680_910_336  # build: UMT5-XXL encoder (256384-token vocabulary): "5.7B"
SD_VAE = 83_653_863  # public: SD / SDXL VAE
VAE_16CH = 83_819_683  # build: the 16-channel VAE of SD3 and Flux (no quant convs)
WAN_VAE = 126_892_531  # build: Wan 2.1 VAE ("127M")

EXPECTED = {
    "sd15": {"unet": 859_520_964, "text_encoder": CLIP_L, "vae": SD_VAE,
             "safety_checker": 303_981_588},  # build: CLIP ViT-L/14 vision tower + projection + concept embeddings
    "sdxl": {"unet": 2_567_463_684, "text_encoder": CLIP_L, "text_encoder_2": CLIP_BIGG_PROJ, "vae": SD_VAE},
    "sd35-large": {"transformer": 8_056_627_520,  # build: "8.1B"
                   "text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_BIGG_PROJ, "text_encoder_3": T5_XXL,
                   "vae": VAE_16CH},
    "sd35-medium": {"transformer": 2_243_171_520,  # build: "2.5B" is the marketing figure incl. rounding
                    "text_encoder": CLIP_L_PROJ, "text_encoder_2": CLIP_BIGG_PROJ, "text_encoder_3": T5_XXL,
                    "vae": VAE_16CH},
    "flux1-dev": {"transformer": 11_901_408_320, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL,
                  "vae": VAE_16CH},
    # schnell has no guidance embedder: 3072*256 + 3072 + 3072*3072 + 3072 = 10,229,760 fewer
    # FLUX.1 Kontext [dev]: the FLUX.1-dev models in an image-editing pipeline ("12B")
    "flux1-kontext-dev": {"transformer": 11_901_408_320, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL,
                          "vae": VAE_16CH},
    "flux1-schnell": {"transformer": 11_901_408_320 - 10_229_760, "text_encoder": CLIP_L,
                      "text_encoder_2": T5_XXL, "vae": VAE_16CH},
    "wan21-t2v-1.3b": {"transformer": 1_418_996_800, "text_encoder": UMT5_XXL, "vae": WAN_VAE},  # build: "1.3B"
    "wan21-t2v-14b": {"transformer": 14_288_491_584, "text_encoder": UMT5_XXL, "vae": WAN_VAE},  # build: "14B"
    # two 14B experts ("A14B": 14B active of 27B), the 2.1 text encoder and VAE
    "wan22-t2v-a14b": {"transformer": 14_288_491_584, "transformer_2": 14_288_491_584, "text_encoder": UMT5_XXL,
                       "vae": WAN_VAE},
    # public: "20B" MMDiT (20,430,401,088 as published breakdowns count it), Qwen2.5-VL-7B-Instruct
    # (8,292,166,656 with its vision tower: "8.29B"), and Wan 2.1's VAE architecture
    "qwen-image": {"transformer": 20_430_401_088, "text_encoder": 8_292_166_656, "vae": WAN_VAE},
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@pytest.fixture(scope="module")
def built():
    """Every built-in architecture built once, in the dtypes its configs say."""
    return {name: sizing.pipeline_sizes(name) for name in sizing.architecture_names()}


def test_every_architecture_has_expectations():
    assert sorted(EXPECTED) == sizing.architecture_names()


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_parameter_counts_match_public_figures(built, arch):
    sizes = built[arch]
    assert {name: s.parameters for name, s in sizes.items()} == EXPECTED[arch]


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_groups_partition_each_component(built, arch):
    for name, size in built[arch].items():
        assert size.groups, name
        assert sum(g.bytes for g in size.groups) == size.bytes, name
        assert len({g.name for g in size.groups}) == len(size.groups), name
        assert 0 < size.largest_layer_bytes <= max(g.bytes for g in size.groups) <= size.bytes


def test_bytes_are_parameters_times_dtype_size():
    # fp32 everywhere: no module is kept in another dtype, so bytes = (params + buffers) x 4
    for name, module in sizing.build_components("sdxl", dtype="fp32").items():
        size = sizing.size_module(module, name)
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        assert size.bytes == size.parameters * 4 + buffers, name
    # the dtype the config names is the default; an override wins
    unet = sizing.pipeline_sizes("sd15")["unet"]
    assert unet.dtype == "float32" and unet.bytes == unet.parameters * 4
    text = sizing.pipeline_sizes("sdxl")["text_encoder_2"]
    assert text.dtype == "float16"
    unet16 = sizing.pipeline_sizes("sd15", dtype="bf16")["unet"]
    assert unet16.dtype == "bfloat16" and unet16.bytes == unet16.parameters * DTYPE_BYTES["bfloat16"]


def test_flux_transformer_bf16_is_about_24_gb():
    size = sizing.size_module(sizing.build_component("flux1-dev", "transformer", dtype="bf16"))
    assert size.bytes == 11_901_408_320 * 2
    # 19 double-stream + 38 single-stream blocks, plus the rest (embedders, norm_out, proj_out)
    names = [g.name for g in size.groups]
    assert names[:19] == [f"transformer_blocks_{i}_{i}" for i in range(19)]
    assert names[19:57] == [f"single_transformer_blocks_{i}_{i}" for i in range(38)]
    assert names[57:] == ["FluxTransformer2DModel_unmatched_group"]


def test_keep_in_fp32_modules_follow_the_libraries():
    # transformers keeps T5's `wo` in fp32 for fp16 only; bf16 casts everything
    fp16 = sizing.size_module(sizing.build_component("flux1-dev", "text_encoder_2", dtype="fp16"))
    bf16 = sizing.size_module(sizing.build_component("flux1-dev", "text_encoder_2", dtype="bf16"))
    assert bf16.bytes == T5_XXL * 2
    assert fp16.bytes == T5_XXL * 2 + 24 * 10240 * 4096 * 2  # 24 `wo` matrices at 4 bytes instead of 2
    # diffusers keeps Wan's norms/time embedder in fp32 for any dtype
    wan = sizing.build_component("wan21-t2v-1.3b", "transformer", dtype="bf16")
    assert wan.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert wan.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_models_are_on_meta():
    unet = sizing.build_component("sdxl", "unet")
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    assert {b.device.type for b in unet.buffers()} <= {"meta"}


def test_vae_groups_follow_its_block_modules(built):
    # AutoencoderKL names encoder/decoder/quant convs as blocks: groups are formed inside them
    names = [g.name for g in built["sdxl"]["vae"].groups]
    assert "encoder.down_blocks_0_0" in names and "decoder.up_blocks_3_3" in names
    assert "encoder.Encoder_unmatched_group" in names
    assert "quant_conv.Conv2d_unmatched_group" in names


def _save_folder(pipe, folder):
    """A model folder as diffusers writes one, without weights or tokenizer files."""
    index = {"_class_name": getattr(pipe, "_offloadkit_base_class", type(pipe)).__name__}
    for name, value in pipe.components.items():
        if value is None:
            index[name] = [None, None]
            continue
        index[name] = [type(value).__module__.split(".")[0], type(value).__name__]
        if isinstance(value, torch.nn.Module):
            if hasattr(value, "save_config"):
                value.save_config(folder / name)
            else:
                value.config.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl():
    from offloadkit.testing import tiny_pipeline

    return tiny_pipeline("sdxl")


def test_local_folder_matches_loaded_pipeline(tiny_sdxl, tmp_path):
    folder = _save_folder(tiny_sdxl, tmp_path)
    from_folder = sizing.pipeline_sizes(folder)
    from_pipe = sizing.pipeline_sizes(tiny_sdxl)
    models = {n: v for n, v in tiny_sdxl.components.items() if isinstance(v, torch.nn.Module)}
    assert set(from_folder) == set(from_pipe) == set(models)
    for name, module in models.items():
        assert from_folder[name].bytes == from_pipe[name].bytes == module_bytes(module), name
        assert from_folder[name].groups == from_pipe[name].groups, name
        assert from_folder[name].parameters == sum(p.numel() for p in module.parameters()), name


def test_groups_match_diffusers_group_offloading():
    # the groups diffusers' engine really forms (block_level, 1 block per group), measured from its hooks
    from diffusers.hooks import apply_group_offloading

    from offloadkit.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    for name in ("unet", "vae", "text_encoder_2"):
        module = getattr(pipe, name)
        predicted = sorted(g.bytes for g in sizing.size_module(module).groups)
        apply_group_offloading(module, onload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
        groups = {}
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            for hook in (registry.hooks.values() if registry is not None else ()):
                if getattr(hook, "group", None) is not None:
                    groups[id(hook.group)] = hook.group
        actual = []
        for group in groups.values():
            tensors = {id(t): t for m in group.modules for t in [*m.parameters(), *m.buffers()]}
            tensors.update((id(t), t) for t in [*(group.parameters or ()), *(group.buffers or ())])
            actual.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        assert predicted == sorted(actual), name


def test_spec_from_folder_feeds_the_resolver(tiny_sdxl, tmp_path):
    import offloadkit
    from offloadkit.plans.resolve import resolve

    folder = _save_folder(tiny_sdxl, tmp_path)
    spec = sizing.spec_from_folder(folder)
    assert spec.class_name == "StableDiffusionXLPipeline"
    assert spec.get("unet").bytes == module_bytes(tiny_sdxl.unet)
    assert spec.get("image_encoder").present is False  # [null, null] in model_index.json
    plan = resolve(offloadkit.load("diffusers-default"), spec, "cpu:0")
    assert plan.to_dict()  # resolves with sizes and no weights
    # a built-in architecture: the plan knows the real sizes
    big = sizing.spec_from_folder("sd15", dtype="fp16")
    assert big.get("unet").bytes == 859_520_964 * 2 and big.get("image_encoder").present is False
    assert sizing.spec_from_folder(tiny_sdxl).get("vae").bytes == module_bytes(tiny_sdxl.vae)


def test_dtype_on_a_loaded_pipeline_is_refused(tiny_sdxl):
    with pytest.raises(ModelSourceError, match="loaded pipeline"):
        sizing.pipeline_sizes(tiny_sdxl, dtype="fp16")


# ---- bad sources -----------------------------------------------------------------


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ModelSourceError, match="Did you mean 'sdxl'"):
        sizing.pipeline_sizes("sdxll")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelSourceError) as info:
        sizing.pipeline_sizes(tmp_path)
    assert "model_index.json not found" in str(info.value) and str(tmp_path) in str(info.value)


def test_unknown_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModle"]}))
    with pytest.raises(ModelSourceError) as info:
        sizing.pipeline_sizes(tmp_path)
    message = str(info.value)
    assert "model_index.json" in message and "'UNet2DConditionModle'" in message
    assert "Did you mean 'UNet2DConditionModel'" in message


def test_broken_json_names_file_and_position(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",\n "unet": [}')
    with pytest.raises(ModelSourceError, match=r"model_index\.json:2:\d+: not valid JSON"):
        sizing.pipeline_sizes(tmp_path)


def test_missing_component_config(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ModelSourceError, match=r"vae[/\\]config\.json not found"):
        sizing.pipeline_sizes(tmp_path)


def test_config_the_class_rejects(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(
        {"block_out_channels": [64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3}))
    with pytest.raises(ModelSourceError, match=r"vae[/\\]config\.json: AutoencoderKL cannot be built"):
        sizing.pipeline_sizes(tmp_path)


def test_bad_dtype():
    with pytest.raises(DtypeError, match="unknown dtype 'int3'"):
        sizing.pipeline_sizes("sd15", dtype="int3")
