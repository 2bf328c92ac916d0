"""`model`: whole-component offload, as `enable_model_cpu_offload` does it.

The component lives in host RAM and moves to the device when its forward (or a
VAE's encode/decode) is called. Components in the sequence form a chain: each
one's onload offloads its predecessor. Components outside the sequence are
offloaded at the end of each call.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import PrecisionRule, Strategy, register


Transfer = Literal["standard", "copy-free", "pinned"]


class ModelRule(PrecisionRule):
    """Offload the whole component to host RAM between uses (diffusers' model offload)."""

    strategy: Literal["model"]
    keep_on_device: bool = Field(
        False,
        description="Once onloaded, stay on the device across calls: neither the next model in the chain nor "
        "the end of a call offloads it (until the policy is removed). For servers calling the same pipeline "
        "again and again.",
    )
    transfer: Transfer = Field(
        "standard",
        description="`standard`: module.to() both ways, as diffusers. `copy-free`: offload drops the device "
        "copies instead of copying unchanged weights back. `pinned`: copy-free with a page-locked host copy "
        "and non-blocking onloads (accelerators only).",
    )
    prefetch: bool = Field(
        False,
        description="Start this model's upload while the model before it in `sequence` computes (on a side "
        "stream on CUDA, so the copy overlaps that work; at once elsewhere). Both are on the device meanwhile. "
        "Needs `transfer: pinned` (or `copy-free`, which cannot overlap on CUDA).",
    )

    @model_validator(mode="after")
    def _prefetch_copies_from_the_host_copy(self):
        if self.prefetch and self.transfer == "standard":
            raise ValueError("`prefetch: true` needs `transfer: pinned` (the upload is copied from a kept host copy "
                             "on a side stream; pinned memory is what lets it overlap). Add `transfer: pinned`, or "
                             "'copy-free' on the CPU")
        return self


def install(ctx, name, module, rule, previous):
    from ..hooks import attach_chain_hook

    return attach_chain_hook(ctx, name, module, previous, keep=rule.keep_on_device, transfer=rule.transfer,
                             prefetch=rule.prefetch)


def check(rule: ModelRule, device_type: str) -> str | None:
    if rule.transfer == "pinned" and device_type == "cpu":
        return "`transfer: pinned` needs an accelerator (pinned memory speeds up host-to-device copies); " \
               "the device is the CPU. Use 'copy-free' or 'standard'"
    return None


def uninstall(handle, name, module):
    from accelerate.hooks import remove_hook_from_module

    hook = handle._hooks.get(name)
    if getattr(module, "_hf_hook", None) is hook:
        remove_hook_from_module(module)
    state = handle._states.get(name)
    if state is not None and state.host_copy is not None:
        state.host_copy.offload()
        state.host_copy.release()
        state.host_copy = None


STRATEGY = register(Strategy(
    name="model",
    rule=ModelRule,
    summary="whole component in host RAM, moved to the device when used",
    chained=True,
    placed=False,
    install=install,
    uninstall=uninstall,
    check=check,
))
