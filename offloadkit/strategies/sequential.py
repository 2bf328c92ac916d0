"""`sequential`: leaf-level offload, as `enable_sequential_cpu_offload` does it (Accelerate's `cpu_offload`).

Parameters live in a host-RAM state dict and on the `meta` device in the model;
each leaf module's weights are put on the device just before its forward and
dropped right after. Lowest device memory, slowest calls.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyRule, register


class SequentialRule(StrategyRule):
    """Stream each layer's weights to the device for its forward only."""

    strategy: Literal["sequential"]
    offload_buffers: Literal["auto"] | bool = Field(
        "auto",
        description="Offload buffers too. `auto`: as diffusers (when the model has parameters of its own).",
    )


def _execution_device(device):
    import torch

    # Accelerate's meta-device materialisation fails for `cpu:0` but works for `cpu`.
    return torch.device("cpu") if device.type == "cpu" else device


def install(ctx, name, module, rule, previous):
    from accelerate import cpu_offload

    offload_buffers = getattr(rule, "offload_buffers", "auto")
    if offload_buffers == "auto":
        offload_buffers = len(module._parameters) > 0
    weights = {key: tensor.to("cpu") for key, tensor in module.state_dict().items()}
    ctx.remember_weights(name, weights)
    cpu_offload(module, _execution_device(ctx.device), offload_buffers=offload_buffers, state_dict=weights)
    return None


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    weights = handle._weights.pop(name, None)
    if weights is not None:
        # Put the host copies back in place of the meta tensors.
        module.load_state_dict(weights, assign=True, strict=False)


STRATEGY = register(Strategy(
    name="sequential",
    rule=SequentialRule,
    summary="each layer's weights streamed to the device for its forward only",
    chained=False,
    placed=False,
    install=install,
    uninstall=uninstall,
    home="meta (host RAM)",
    offloaded_by="after each layer",
))
