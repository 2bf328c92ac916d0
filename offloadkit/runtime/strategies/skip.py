"""`skip`: offloadkit leaves the component alone: no hook, no move.

For components managed by something else (a quantized model loaded straight to
the device, a component the user places by hand).
"""

from __future__ import annotations

from ...policy.rules import SkipRule
from .registry import register_installer


def install(handle, name, module, rule, previous):
    return None


register_installer(SkipRule, install)
