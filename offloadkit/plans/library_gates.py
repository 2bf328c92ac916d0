"""Whether the capability table's version-gated limits hold for the libraries installed here.

The table itself is data in `offloadkit.policy.capabilities`; asking the installed
diffusers, transformers and bitsandbytes is done here, where a plan is made for a
pipeline (the policy floor imports none of them).
"""

from __future__ import annotations

from ..policy import capabilities
from ..policy.capabilities import BNB_8BIT_STUCK, GROUP_LEAVES_TORCHAO, Limit
from ..policy.rules import StrategyRule


def bnb_8bit_movable() -> bool:
    """Whether the installed libraries can move bitsandbytes 8-bit weights (diffusers' own test)."""
    try:
        from diffusers.utils import is_bitsandbytes_version, is_transformers_version
    except ImportError:
        return True
    try:
        return not (is_transformers_version("<", "4.58.0") or is_bitsandbytes_version("<", "0.48.0"))
    except Exception:  # bitsandbytes not installed: nothing of it to move
        return True


def group_offloading_swaps_torchao() -> bool:
    """Whether the installed diffusers' group offloading moves torchao tensors (by `swap_tensors`)."""
    try:
        from diffusers.hooks import group_offloading
    except ImportError:
        return True
    return hasattr(group_offloading, "_swap_torchao_tensor")


GATES = {
    BNB_8BIT_STUCK: lambda: not bnb_8bit_movable(),
    GROUP_LEAVES_TORCHAO: lambda: not group_offloading_swaps_torchao(),
}


def holds(limit: Limit) -> bool:
    """Whether the limit applies with what is installed (always, for a limit without a gate)."""
    return not limit.gate_check or GATES[limit.gate_check]()


def limit_for(backend: str | None, rule: StrategyRule) -> Limit | None:
    """The limit that forbids `rule` for a component of `backend`, or None when it may run."""
    if backend is None:
        return None
    for limit in capabilities.LIMITS:  # read at each call: tests force a pair past the table
        if limit.backend == backend and limit.covers(rule) and holds(limit):
            return limit
    return None
