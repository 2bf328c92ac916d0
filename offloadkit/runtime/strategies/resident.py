"""`resident`: the component stays on the execution device, with no hook.

For small components used every call (a VAE) or ones that must never wait on a
transfer. diffusers' `_exclude_from_cpu_offload` names become `resident`.
"""

from __future__ import annotations

from ...policy.rules import ResidentRule
from .registry import register_installer


def install(handle, name, module, rule, previous):
    handle.place(name, module)
    return None


register_installer(ResidentRule, install)
