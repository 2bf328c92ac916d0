"""How much compute a call needs: FLOPs per forward of each model, counted on `meta` tensors.

Each model's forward (or a VAE's decode) is run on zeros of the shapes a pipeline gives it
(`activation_measurement.example_forward`: the same batch, guidance, text-length and frame
rules as the working-memory estimate) under torch's `FlopCounterMode`. On a model built on
`meta` nothing is computed: the kernels only propagate shapes, and the counter adds up the
FLOPs of matrix multiplies, convolutions and attention. Elementwise work is not counted.

Time is FLOPs over the hardware profile's `compute` rate times its `compute_efficiency` (the
share of the peak a diffusion forward reaches: an assumption in each profile, unless measured).
A loaded pipeline's models are not run (that would compute for real): no compute estimate.
"""

from __future__ import annotations

from .activations import _FAMILIES, _ROLES, REFERENCE_IMAGES, _describe


_COUNTED = None  # module -> {call settings: FLOPs}: built-in models are built once per process, counted once


def forward_flops(module, *, height: int, width: int, batch: int = 1, guidance: bool = True,
                  num_frames: int | None = None, reference_images: int = 0) -> int | None:
    """FLOPs of one forward of a model built on `meta` at these call settings; None when it cannot be counted."""
    import weakref

    global _COUNTED
    if _COUNTED is None:
        _COUNTED = weakref.WeakKeyDictionary()
    key = (height, width, batch, guidance, num_frames, reference_images)
    counted = _COUNTED.setdefault(module, {})
    if key not in counted:
        counted[key] = _count(module, height=height, width=width, batch=batch, guidance=guidance,
                              num_frames=num_frames, reference_images=reference_images)
    return counted[key]


def _count(module, *, height, width, batch, guidance, num_frames, reference_images) -> int | None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .activation_measurement import example_forward

    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "meta":
        return None
    family = _FAMILIES.get(_describe(module).class_name)
    if family is None:
        return None
    try:
        run, _ = example_forward(module, role=_ROLES[family], height=height, width=width, batch=batch,
                                 guidance=guidance, num_frames=num_frames, reference_images=reference_images)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
    except Exception:  # a forward that meta tensors cannot run: no estimate rather than a wrong one
        return None
    return int(counter.get_total_flops())


def component_flops(modules: dict, settings, pipeline_class: str = "") -> dict:
    """{component: FLOPs of one forward} for the models that can be counted. A VAE's forward is its decode,
    also where the pipeline encodes an input image with it (an encode costs less: an upper bound)."""
    references = REFERENCE_IMAGES.get(pipeline_class, 0)
    found = {}
    for name, module in modules.items():
        flops = forward_flops(module, height=settings.height, width=settings.width, batch=settings.batch,
                              guidance=settings.guidance, num_frames=settings.num_frames,
                              reference_images=references)
        if flops is not None:
            found[name] = flops
    return found
