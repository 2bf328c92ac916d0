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
)
from .loading import builtin_policies, load
from .plans import ComponentPlan, Plan
from .schema import Policy

__version__ = "0.1.0"

_LAZY = {"apply": "install", "plan": "install", "remove": "install", "OffloadHandle": "install",
         "Trace": "trace", "TraceEvent": "trace", "predict": "prediction", "Prediction": "prediction",
         "CallSettings": "schedule", "synthesize": "synthesis", "Synthesis": "synthesis",
         "SynthesisError": "synthesis", "HardwareProfile": "hardware", "load_hardware": "hardware",
         "calibrate": "hardware"}

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
