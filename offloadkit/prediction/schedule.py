"""Which model components one pipeline call runs, in what order, how many times.

The planner replays this list against a plan to predict what moves when. The
order matters as much as the counts: in a chain, a model that runs again after
its successor is onloaded again. The rules below are read off the installed
diffusers pipelines' `encode_prompt` and denoising loops:

- SD 1.x / 2.x (and their ControlNet, img2img, ... variants): the text encoder
  runs for the prompt, and again for the negative prompt under classifier-free
  guidance; the UNet runs once a step (conditional and unconditional halves in
  one batch), after the ControlNet when there is one.
- SDXL: both text encoders, in turn, for the prompt; for the negative prompt
  only when one is given or the pipeline's `force_zeros_for_empty_prompt` is
  false (otherwise the negative embeddings are zeros).
- SD3: the three text encoders in turn, again for the negative prompt under
  guidance (an absent T5 is not called).
- Flux: CLIP then T5, once; the transformer once a step (guidance is
  distilled). "True CFG" (a negative prompt) doubles both.
- Flux.1 Kontext (image editing): as Flux, and the VAE encodes the input image after the
  prompt, before the loop (`prepare_latents`); the transformer sees its latents beside the
  generated ones (twice the image tokens, when the input is at the output's size).
- Qwen-Image: Qwen2.5-VL once; the transformer once a step. Its "true CFG" needs a negative
  prompt (`true_cfg_scale` > 1 alone does nothing): then both run twice, as Flux's.
- Wan: the T5 encoder, again for the negative prompt under guidance; the
  transformer runs twice a step under guidance (conditional and unconditional
  as separate forwards).
- The VAE decodes once at the end (a safety checker, where loaded, runs after it).

Which models encode, denoise and decode is `offloadkit.plans.stages`' vocabulary (by
class first): in other pipelines every denoising model runs its own loop of `steps`
in offload-sequence order (a prior, then a decoder UNet), and every decoding model
(VAE, MoVQ, VQGAN, vocoder) runs once at the end.

These rules were checked for the text-to-image (text-to-video) classes in
`CHECKED`. Other classes of the same families (img2img, inpainting, ...: they also
run the VAE's encoder) get their family's rule, and pipelines outside these
families the generic one (encoders in `model_cpu_offload_seq` order, once, twice
under guidance; the denoiser once a step; the VAE once); for both the schedule is
marked assumed, and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plans.stages import DECODE, DENOISE, ENCODE, stage_of

# Models that run in the denoising loop but are not its denoiser: the ControlNet runs beside it each
# step, the safety checker after the decode.
_BESIDE_THE_DENOISER = ("controlnet", "safety_checker")
CHECKED = frozenset({"StableDiffusionPipeline", "StableDiffusionControlNetPipeline", "StableDiffusionXLPipeline",
                     "StableDiffusionXLControlNetPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                     "WanPipeline", "QwenImagePipeline", "FluxKontextPipeline"})
# Pipelines whose VAE encodes an input image after the prompt, before the denoising loop.
_ENCODES_INPUT_IMAGE = frozenset({"FluxKontextPipeline"})


@dataclass(frozen=True)
class CallSettings:
    """What a pipeline call is asked to do. `None` means the pipeline family's usual value."""

    height: int | None = None
    width: int | None = None
    steps: int = 30
    batch: int = 1  # images (videos) per call
    guidance: bool = True  # classifier-free guidance (guidance_scale > 1)
    negative_prompt: bool = False
    num_frames: int | None = None  # video pipelines
    dtype: str | None = None  # weights' dtype when built from configs; None: as the configs say

    def resolved(self, family: str, *, size_multiple: int | None = None,
                 frame_step: int | None = None) -> "CallSettings":
        """Defaults of the family filled in (SD 1.x 512 px, SDXL/SD3/Flux 1024 px, Wan 480x832 x 81 frames), after
        checking the settings are a call the family's pipeline takes as asked (`CallSettingsError` otherwise).

        `size_multiple` and `frame_step` replace the family's factors where the caller read them from the
        pipeline's own VAE (`SizeRule`); the defaults are those of the shipped models' 8x VAEs.
        """
        check_settings(self, family, size_multiple=size_multiple, frame_step=frame_step)
        height, width, frames = _DEFAULT_SIZE.get(family, (1024, 1024, None))
        return CallSettings(
            height=self.height or height, width=self.width or width, steps=self.steps, batch=self.batch,
            guidance=self.guidance, negative_prompt=self.negative_prompt,
            num_frames=self.num_frames or frames, dtype=self.dtype)


_DEFAULT_SIZE = {"sd": (512, 512, None), "sdxl": (1024, 1024, None), "sd3": (1024, 1024, None),
                 "flux": (1024, 1024, None), "qwen": (1024, 1024, None), "wan": (480, 832, 81), "generic": (1024, 1024, None)}


@dataclass(frozen=True)
class SizeRule:
    """What a family's pipeline takes for a call's size, read off its `check_inputs` / `prepare_latents`.

    `multiple`: height and width must be multiples of it; `resizes`: the pipeline rounds another size down
    with a warning instead of refusing it (the image would not be the one predicted); `frame_step`: video
    frame counts are `frame_step * k + 1` (the VAE's temporal factor; None: an image pipeline).
    """

    label: str
    multiple: int
    resizes: bool = False
    frame_step: int | None = None


# SD / SDXL check `height % 8` whatever their VAE; SD3 `vae_scale_factor * patch_size` (8 * 2); Flux and
# Qwen-Image `vae_scale_factor * 2` and resize; Wan checks `% 16` and rounds frames to 4k+1.
SIZE_RULES = {"sd": SizeRule("Stable Diffusion", 8), "sdxl": SizeRule("SDXL", 8), "sd3": SizeRule("SD3", 16),
              "flux": SizeRule("Flux", 16, resizes=True), "qwen": SizeRule("Qwen-Image", 16, resizes=True),
              "wan": SizeRule("Wan", 16, frame_step=4)}


def check_settings(settings: CallSettings, family: str, *, size_multiple: int | None = None,
                   frame_step: int | None = None) -> None:
    """Raise `CallSettingsError` saying what to write where the family's pipeline would refuse the call or
    run another one than asked (a resized image, rounded frames); `generic` pipelines get the positivity
    checks only (their constraints are not known here).

    Example::

        check_settings(CallSettings(height=1000), "sdxl")   # CallSettingsError: ... Use 992 or 1000
    """
    from ..errors import CallSettingsError

    for name, value, unit in (("height", settings.height, "pixels"), ("width", settings.width, "pixels"),
                              ("num_frames", settings.num_frames, "frames")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CallSettingsError(f"{name} must be a whole number of {unit} above 0, not {value!r}. Write e.g. "
                                    f"{81 if name == 'num_frames' else 1024}, or leave it unset for the "
                                    "pipeline's default")
    for name, value in (("steps", settings.steps), ("batch", settings.batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CallSettingsError(f"{name} must be a whole number above 0, not {value!r}. Write e.g. "
                                    f"{30 if name == 'steps' else 1}")
    rule = SIZE_RULES.get(family)
    if rule is None:
        return
    multiple = size_multiple or rule.multiple
    for name, value in (("height", settings.height), ("width", settings.width)):
        if value is not None and value % multiple:
            lower, upper = value - value % multiple, value - value % multiple + multiple
            what = (f"the pipeline would resize it to {lower or multiple}, another image than the one predicted"
                    if rule.resizes else "the pipeline refuses it")
            use = f"{lower} or {upper}" if lower else str(upper)
            raise CallSettingsError(f"{name} {value} is not a multiple of {multiple}, which {rule.label} needs "
                                    f"({what}). Use {use} (--{name} {lower or upper})")
    if settings.num_frames is None:
        return
    step = frame_step or rule.frame_step
    if step is None:
        raise CallSettingsError(f"{rule.label} makes images; --frames (`num_frames`) is for video pipelines such "
                                "as Wan. Leave it out")
    if settings.num_frames % step != 1 % step:
        lower = settings.num_frames - (settings.num_frames - 1) % step
        upper = lower + step
        rounded = settings.num_frames // step * step + 1  # WanPipeline's own rounding
        use = f"{lower} or {upper}" if lower >= 1 else str(upper)
        raise CallSettingsError(f"{rule.label} takes {step}k+1 frames (1, {1 + step}, {1 + 2 * step}, ...), not "
                                f"{settings.num_frames}: the pipeline would round it to {rounded}. Use {use} "
                                f"(--frames {lower if lower >= 1 else upper})")


def pipeline_family(class_name: str) -> str:
    """`sd`, `sdxl`, `sd3`, `flux`, `qwen`, `wan` or `generic`, from the pipeline class name."""
    for prefix, family in (("StableDiffusionXL", "sdxl"), ("StableDiffusion3", "sd3"), ("Flux", "flux"),
                           ("QwenImage", "qwen"), ("Wan", "wan"), ("StableDiffusion", "sd")):
        if class_name.startswith(prefix):
            return family
    return "generic"


@dataclass(frozen=True)
class CallSchedule:
    """The model forwards of one call, in order (a name per forward), and whether the rule is assumed."""

    forwards: tuple[str, ...]
    assumed: bool

    def count(self, name: str) -> int:
        return self.forwards.count(name)


def expert_steps(steps: int, boundary_ratio: float, flow_shift: float) -> int:
    """Steps the first of two experts runs (Wan 2.2 A14B): WanPipeline gives `transformer` every timestep at or
    above `boundary_ratio * num_train_timesteps` and `transformer_2` the rest; the timesteps are its UniPC
    scheduler's with flow sigmas shifted by `flow_shift`, computed here with diffusers' own scheduler."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=flow_shift)
    scheduler.set_timesteps(steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    return sum(1 for t in scheduler.timesteps if float(t) >= boundary)


def schedule(class_name: str, present: list[str], settings: CallSettings, *, offload_seq=(),
             force_zeros_for_empty_prompt: bool = True, stages: dict | None = None,
             boundary_ratio: float | None = None, flow_shift: float | None = None) -> CallSchedule:
    """The forwards of one call of a `class_name` pipeline whose loaded models are `present`.

    `stages` maps a model to its stage (`PipelineSpec` components know it from their class); a model
    not in it is staged by its name.

    Example::

        schedule("StableDiffusionPipeline", ["text_encoder", "unet", "vae"], CallSettings(steps=2)).forwards
        # ('text_encoder', 'text_encoder', 'unet', 'unet', 'vae')
    """
    family = pipeline_family(class_name)
    have = set(present)
    stage = {n: (stages or {}).get(n) or stage_of(n) for n in have}
    order = [n for n in dict.fromkeys(offload_seq) if n in have] + sorted(have - set(offload_seq))

    def only(*names):
        return [n for n in names if n in have]

    encoders = sorted((n for n in have if n.startswith("text_encoder")), key=_encoder_order)
    twice_encode = settings.guidance
    per_step = 1
    if family == "sdxl":
        twice_encode = settings.guidance and (settings.negative_prompt or not force_zeros_for_empty_prompt)
    elif family in ("flux", "qwen"):  # true CFG: only with a negative prompt, as separate forwards
        twice_encode = per_step_true_cfg = settings.guidance and settings.negative_prompt
        per_step = 2 if per_step_true_cfg else 1
    elif family == "wan":
        per_step = 2 if settings.guidance else 1
    elif family == "generic":
        encoders = [n for n in order if stage[n] == ENCODE and "image_encoder" not in n] or encoders
    forwards = list(encoders) * (2 if twice_encode else 1)
    if class_name in _ENCODES_INPUT_IMAGE:
        forwards += [n for n in order if stage[n] == DECODE]
    denoisers = [n for n in order if stage[n] == DENOISE and n not in _BESIDE_THE_DENOISER]
    experts = family == "wan" and boundary_ratio is not None and {"transformer", "transformer_2"} <= have
    if experts:  # two experts switching at a boundary timestep (Wan 2.2 A14B)
        first = expert_steps(settings.steps, boundary_ratio, flow_shift or 1.0)
        forwards += ["transformer"] * per_step * first + ["transformer_2"] * per_step * (settings.steps - first)
        denoisers = []
    elif family != "generic":
        denoisers = denoisers[:1]  # one denoiser a step (the checked families)
    for denoiser in denoisers:  # each runs its own loop: a prior's, then a decoder's
        forwards += (only("controlnet") + [denoiser] * per_step) * settings.steps
    forwards += [n for n in order if stage[n] == DECODE] + only("safety_checker")
    return CallSchedule(tuple(forwards), assumed=class_name not in CHECKED)


def _encoder_order(name: str) -> int:
    suffix = name.removeprefix("text_encoder").lstrip("_")
    return int(suffix) if suffix.isdigit() else 1
