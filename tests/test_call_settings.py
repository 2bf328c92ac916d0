"""Call settings are checked against what the pipeline family takes (issue 15): a clear CallSettingsError saying
what to write, before any prediction is made for a call the pipeline would refuse or change."""

from types import SimpleNamespace

import pytest

from offloadkit.errors import CallSettingsError
from offloadkit.prediction.schedule import SIZE_RULES, CallSettings, check_settings, pipeline_family


@pytest.mark.parametrize("pipeline, settings, message", [
    ("StableDiffusionXLPipeline", CallSettings(height=1020),
     "height 1020 is not a multiple of 8, which SDXL needs (the pipeline refuses it). Use 1016 or 1024 "
     "(--height 1016)"),
    ("StableDiffusionPipeline", CallSettings(width=4), "width 4 is not a multiple of 8, which Stable Diffusion "
                                                       "needs (the pipeline refuses it). Use 8 (--width 8)"),
    ("StableDiffusion3Pipeline", CallSettings(height=1000), "height 1000 is not a multiple of 16, which SD3 needs"),
    ("FluxPipeline", CallSettings(height=1000),
     "height 1000 is not a multiple of 16, which Flux needs (the pipeline would resize it to 992, another image "
     "than the one predicted). Use 992 or 1008 (--height 992)"),
    ("QwenImagePipeline", CallSettings(width=1000), "width 1000 is not a multiple of 16, which Qwen-Image needs"),
    ("WanPipeline", CallSettings(height=470), "height 470 is not a multiple of 16, which Wan needs (the pipeline "
                                              "refuses it). Use 464 or 480"),
    ("StableDiffusionXLPipeline", CallSettings(num_frames=81),
     "SDXL makes images; --frames (`num_frames`) is for video pipelines such as Wan. Leave it out"),
    ("FluxPipeline", CallSettings(num_frames=1), "Flux makes images; --frames"),
    ("WanPipeline", CallSettings(num_frames=80),
     "Wan takes 4k+1 frames (1, 5, 9, ...), not 80: the pipeline would round it to 81. Use 77 or 81 (--frames 77)"),
    ("WanPipeline", CallSettings(num_frames=2), "not 2: the pipeline would round it to 1. Use 1 or 5"),
    ("StableDiffusionXLPipeline", CallSettings(height=0), "height must be a whole number of pixels above 0, not 0"),
    ("WanPipeline", CallSettings(num_frames=-3), "num_frames must be a whole number of frames above 0, not -3"),
    ("AnyOtherPipeline", CallSettings(steps=0), "steps must be a whole number above 0, not 0. Write e.g. 30"),
    ("AnyOtherPipeline", CallSettings(batch=0), "batch must be a whole number above 0, not 0. Write e.g. 1"),
])
def test_a_call_the_pipeline_would_refuse_or_change_is_an_error(pipeline, settings, message):
    with pytest.raises(CallSettingsError) as info:
        settings.resolved(pipeline_family(pipeline))
    assert message in str(info.value)


@pytest.mark.parametrize("pipeline, settings", [
    ("StableDiffusionXLPipeline", CallSettings(height=1000, width=1016)),  # multiples of 8: SDXL takes them
    ("StableDiffusionPipeline", CallSettings()),
    ("FluxPipeline", CallSettings(height=1008)),
    ("WanPipeline", CallSettings(height=480, width=832, num_frames=81)),
    ("WanPipeline", CallSettings(num_frames=1)),
    ("AnyOtherPipeline", CallSettings(height=1001, num_frames=3)),  # constraints unknown: only positivity
])
def test_calls_the_pipeline_takes_are_left_alone(pipeline, settings):
    resolved = settings.resolved(pipeline_family(pipeline))
    assert resolved.height == (settings.height or resolved.height) and resolved.steps == settings.steps


def test_the_family_defaults_pass_their_own_checks():
    for family in (*SIZE_RULES, "generic"):
        resolved = CallSettings().resolved(family)
        check_settings(resolved, family)


def test_a_factor_read_from_the_pipeline_replaces_the_familys():
    check_settings(CallSettings(height=36), "sd3", size_multiple=4)  # a tiny SD3: 2x VAE times patch 2
    with pytest.raises(CallSettingsError, match="not a multiple of 4"):
        check_settings(CallSettings(height=34), "sd3", size_multiple=4)
    with pytest.raises(CallSettingsError, match="takes 8k\\+1 frames"):
        check_settings(CallSettings(num_frames=85), "wan", frame_step=8)


@pytest.mark.parametrize("pipeline_class, args", [
    ("StableDiffusionPipeline", ("p",)), ("StableDiffusionXLPipeline", ("p", None)),
    ("StableDiffusion3Pipeline", ("p", None, None)), ("WanPipeline", ("p", None)),
])
def test_the_refused_sizes_are_the_ones_diffusers_refuses(pipeline_class, args):
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    rule = SIZE_RULES[pipeline_family(pipeline_class)]
    pipe = SimpleNamespace(vae_scale_factor=8, patch_size=2)  # the shipped models' VAE and patch
    extra = {"callback_steps": 1} if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionXLPipeline") \
        else {}
    bad = 1024 + rule.multiple // 2
    with pytest.raises(CallSettingsError):
        check_settings(CallSettings(height=bad), pipeline_family(pipeline_class))
    with pytest.raises(ValueError, match="divisible by"):
        cls.check_inputs(pipe, *args, height=bad, width=1024, **extra)


def test_predict_and_the_cli_refuse_such_calls(capsys):
    from offloadkit.cli import main
    from offloadkit.prediction.replay import predict

    with pytest.raises(CallSettingsError, match="SDXL makes images"):
        predict("sdxl", "diffusers-default", settings=CallSettings(num_frames=81))
    assert main(["plan", "diffusers-default", "--pipeline", "sdxl", "--height", "1020"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: height 1020 is not a multiple of 8, which SDXL needs") and "Traceback" not in err
