"""`sequential` and `disk` on pipelines whose models read weights outside the forward of the layer that owns them.

Before: `inf`/garbage with no error (weight-norm VAEs: LongCat, StableAudio3, AceStep), or a crash in the middle
of the call (HunyuanDiT's attention pool, SigLIP's `nn.MultiheadAttention` head, EasyAnimate's
`text_encoder.device`, AceStep's `condition_encoder.silence_latent`). Each output must equal no offload exactly.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import offloadkit
from offloadkit import tiny_exotic

from helpers import hooked_submodules, model_components


def _hunyuan_call(**extra):
    return lambda: dict(prompt="a squirrel", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                        use_resolution_binning=False, output_type="np", **extra)


CASES = {  # name: (builder, call kwargs, output attribute)
    "longcat-audio-dit": (tiny_exotic.tiny_longcat_audio_dit_pipeline, lambda: dict(
        prompt="soft ocean ambience", audio_duration_s=0.1, num_inference_steps=2, guidance_scale=1.0,
        output_type="pt"), "audios"),
    "stable-audio-3": (tiny_exotic.tiny_stable_audio_3_pipeline, lambda: dict(
        prompt="a hammer on wood", duration=1.0, num_inference_steps=2, output_type="pt"), "audios"),
    "hunyuan-dit": (tiny_exotic.tiny_hunyuan_dit_pipeline, _hunyuan_call(), "images"),
    "hunyuan-dit-pag": (lambda seed=0: tiny_exotic.tiny_hunyuan_dit_pipeline(seed=seed, pag=True),
                        _hunyuan_call(pag_scale=3.0), "images"),
    "hunyuan-dit-controlnet": (
        lambda seed=0: tiny_exotic.tiny_hunyuan_dit_pipeline(seed=seed, controlnet=True),
        lambda: _hunyuan_call(controlnet_conditioning_scale=0.5)() | {
            "control_image": torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))},
        "images"),
    "hunyuan-video-framepack": (tiny_exotic.tiny_hunyuan_video_framepack_pipeline, lambda: dict(
        image=Image.new("RGB", (32, 32)), prompt="dance", prompt_template={"template": "{}", "crop_start": 0},
        num_inference_steps=2, guidance_scale=4.5, height=32, width=32, num_frames=9, latent_window_size=3,
        max_sequence_length=16, output_type="pt"), "frames"),
    "motif-video-image2video": (tiny_exotic.tiny_motif_video_image2video_pipeline, lambda: dict(
        image=Image.new("RGB", (16, 16)), prompt="a test video", negative_prompt="bad quality",
        num_inference_steps=2, height=16, width=16, num_frames=9, max_sequence_length=16, output_type="np"),
        "frames"),
    "easyanimate": (tiny_exotic.tiny_easyanimate_pipeline, lambda: dict(
        prompt="dance monkey", negative_prompt="", num_inference_steps=2, guidance_scale=6.0, height=16, width=16,
        num_frames=5, output_type="pt"), "frames"),
    "ace-step": (tiny_exotic.tiny_ace_step_pipeline, lambda: dict(
        prompt="a piano piece", lyrics="[verse]\nsoft notes", audio_duration=0.4, num_inference_steps=2,
        max_text_length=32), "audios"),
}


def call(pipe, name):
    _, kwargs, attribute = CASES[name]
    output = getattr(pipe(**kwargs(), generator=torch.Generator("cpu").manual_seed(0)), attribute)
    return torch.as_tensor(np.asarray(output)) if not isinstance(output, torch.Tensor) else output


def assert_equal(output, reference):
    assert torch.isfinite(reference).all()
    assert torch.equal(output, reference), f"outputs differ: max abs diff {(output - reference).abs().max()}"


@pytest.mark.parametrize("name", CASES)
def test_sequential_and_disk_compute_exactly(name, tmp_path):
    build = CASES[name][0]
    reference = call(build(seed=0), name)
    policies = {"sequential": "sequential",
                "disk": {"version": 1, "components": {"*": {"strategy": "disk", "folder": str(tmp_path)}}}}
    for strategy, policy in policies.items():
        pipe = build(seed=0)
        handle = offloadkit.apply(pipe, policy, device="cpu")
        assert_equal(call(pipe, name), reference)
        # the weights really stream: between calls every streamed model keeps (almost) nothing off meta
        for model in model_components(pipe).values():
            on_meta = [p.device.type == "meta" for p in model.parameters()]
            assert sum(on_meta) >= len(on_meta) * 0.5, (strategy, type(model).__name__)
        handle.remove()
        assert hooked_submodules(pipe) == []
        assert_equal(call(pipe, name), reference)


def test_weight_norm_pre_hooks_run_after_the_weights_arrive_and_come_back_on_remove():
    from torch.nn.utils import weight_norm

    torch.manual_seed(0)
    conv = weight_norm(torch.nn.Conv1d(2, 3, 3))
    reference = conv(torch.ones(1, 2, 5))
    model = torch.nn.Sequential(conv)

    class Holder:
        pass

    from offloadkit.runtime import read_safe_streaming

    handle = Holder()
    handle.device, handle.pipe = torch.device("cpu"), Holder()
    handle.set_hook = lambda *_: None
    read_safe_streaming.stream_layers(handle, "model", model, "auto", dict(model.state_dict()))
    assert not conv._forward_pre_hooks and conv.weight_v.device.type == "meta"
    before = conv.weight
    assert torch.equal(model(torch.ones(1, 2, 5)), reference)
    assert conv.weight is before and conv.weight_v.device.type == "meta"  # the computed weight is not kept
    read_safe_streaming.undo(model)
    assert len(conv._forward_pre_hooks) == 1


def test_modules_reading_their_childrens_weights_are_streamed_whole():
    from offloadkit.runtime.direct_reads import whole_classes

    class Reads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)

        def forward(self, x):
            return x @ self.proj.weight.T  # the child's weight, without calling the child

    class Calls(Reads):
        def forward(self, x):
            return self.proj(x).to(self.proj.weight.dtype)  # a call and a dtype read: per-layer hooks serve both

    assert whole_classes(torch.nn.Sequential(Reads(), Calls())) == ["Reads"]
    assert whole_classes(torch.nn.MultiheadAttention(4, 2)) == ["MultiheadAttention"]  # reads out_proj.weight
