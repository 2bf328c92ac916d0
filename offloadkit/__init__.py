"""offloadkit: declarative offload policies for diffusers pipelines.

Example::

    import offloadkit
    handle = offloadkit.apply(pipe, "sdxl.yaml")   # or a built-in name: "diffusers-default"
    image = pipe("a lighthouse at dusk").images[0]
    print(handle.trace.summary())

`load`, `Policy` and `Plan` do not import torch; `apply`, `plan`, `remove`,
`OffloadHandle`, `predict` and `synthesize` import torch, diffusers and accelerate
when first used.
"""

from __future__ import annotations

from .errors import (
    BudgetExceededError,
    BudgetWarning,
    DeviceError,
    HardwareError,
    OffloadkitError,
    PipelineError,
    PolicyError,
    Problem,
    SynthesisError,
)
from .plans.plan import ComponentPlan, Plan
from .policy.loading import builtin_policies, load
from .policy.schema import Policy

__version__ = "0.1.0"

# Imported when first used: these need torch (or, for the planner, its sizing machinery).
_LAZY = {"apply": "runtime.install", "plan": "runtime.install", "remove": "runtime.install",
         "OffloadHandle": "runtime.handle", "Trace": "runtime.trace", "TraceEvent": "runtime.trace",
         "predict": "prediction.replay", "Prediction": "prediction.replay", "CallSettings": "prediction.schedule",
         "synthesize": "prediction.synthesis", "Synthesis": "prediction.synthesis",
         "HardwareProfile": "prediction.hardware", "load_hardware": "prediction.hardware",
         "calibrate": "prediction.calibrate"}

__all__ = sorted([
    "BudgetExceededError", "BudgetWarning", "CallSettings", "ComponentPlan", "DeviceError", "HardwareError",
    "HardwareProfile", "OffloadHandle", "OffloadkitError", "PipelineError", "Plan", "Policy", "PolicyError",
    "Prediction", "Problem", "Synthesis", "SynthesisError", "Trace", "TraceEvent", "apply", "builtin_policies",
    "calibrate", "load", "load_hardware", "plan", "predict", "remove", "synthesize",
])


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offloadkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
