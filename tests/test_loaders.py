"""diffusers' LoRA loaders on a pipeline under a policy: the policy stays, results match diffusers without offload."""

import pytest
import torch

import offloadkit
from offloadkit.errors import PipelineError
from offloadkit.testing import tiny_pipeline

from helpers import assert_same_images, run

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_pipeline("sd")
    torch.manual_seed(3)
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(source.unet)))
    return folder


@pytest.fixture(scope="module")
def expected(lora_folder):
    plain = tiny_pipeline("sd")
    plain.load_lora_weights(lora_folder)
    return run(plain)


@pytest.mark.parametrize("policy", ["diffusers-default", "vae-resident", "sequential"])
def test_load_lora_keeps_the_policy(policy, lora_folder, expected):
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, policy, device="cpu")
    hooks_before = set(handle._hooks)
    pipe.load_lora_weights(lora_folder)
    assert handle.active and handle.hooks_intact() and set(handle._hooks) == hooks_before
    assert_same_images(run(pipe), expected)
    assert_same_images(run(pipe), expected)


def test_fuse_and_unload_lora_under_model_offload(lora_folder, expected):
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    pipe.load_lora_weights(lora_folder)
    pipe.fuse_lora()
    fused = run(pipe)
    assert abs(fused - expected).max() < 1e-5
    pipe.unload_lora_weights()  # fused weights stay fused, as in diffusers
    assert abs(run(pipe) - expected).max() < 1e-5
    assert handle.hooks_intact()


def test_fuse_lora_on_meta_weights_is_refused(lora_folder):
    pipe = tiny_pipeline("sd")
    offloadkit.apply(pipe, "sequential", device="cpu")
    pipe.load_lora_weights(lora_folder)
    with pytest.raises(PipelineError, match="fuse_lora\\(\\) would change the weights of .*'unet'"):
        pipe.fuse_lora()


def test_lora_then_storage_dtype_equals_diffusers_and_lora_after_is_refused(lora_folder):
    theirs = tiny_pipeline("sd")
    theirs.load_lora_weights(lora_folder)
    theirs.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ours = tiny_pipeline("sd")
    ours.load_lora_weights(lora_folder)
    policy = {"version": 1, "components": {"unet": {"strategy": "group", "storage_dtype": "float8_e4m3fn"}}}
    plan = offloadkit.plan(ours, policy, device="cpu")
    offloadkit.apply(ours, policy, device="cpu")
    from offloadkit.tensor_bytes import module_bytes

    assert plan.component("unet").bytes == module_bytes(ours.unet) == module_bytes(theirs.unet)
    assert_same_images(run(ours), run(theirs))
    with pytest.raises(PipelineError, match="'unet' stores its weights in a lower precision .*Load the LoRA into "
                                            "a freshly loaded component"):
        ours.load_lora_weights(lora_folder)
    assert_same_images(run(ours), run(theirs))
