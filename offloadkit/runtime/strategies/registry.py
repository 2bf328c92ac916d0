"""Installers keyed by rule class: the runtime half of a strategy.

A strategy's rule class (its options and planning facts) lives in
`offloadkit.policy.rules`; its installer registers here under that class. Both
`install(handle, name, module, rule, previous)` and `uninstall(handle, name, module)`
receive the `OffloadHandle`, the one owner of hook state, and go through its methods.
`install` returns what the next chained component needs (or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...policy.rules import RULES, StrategyRule


@dataclass(frozen=True)
class Installer:
    rule: type[StrategyRule]
    install: Callable
    uninstall: Callable | None = None


INSTALLERS: dict[type[StrategyRule], Installer] = {}


def register_installer(rule: type[StrategyRule], install: Callable, uninstall: Callable | None = None) -> Installer:
    """Register the installer of a registered rule class (once per class)."""
    if RULES.get(getattr(rule, "name", "")) is not rule:
        raise ValueError(f"{getattr(rule, '__name__', rule)!r} is not a registered rule class: register it with "
                         "@register_rule in offloadkit.policy.rules first")
    if rule in INSTALLERS:
        raise ValueError(f"strategy {rule.name!r} has two installers")
    if not callable(install) or (uninstall is not None and not callable(uninstall)):
        raise TypeError(f"the installer of strategy {rule.name!r} must be callable")
    INSTALLERS[rule] = installer = Installer(rule, install, uninstall)
    return installer


def installer_for(rule: StrategyRule) -> Installer:
    return INSTALLERS[type(rule)]


def check_complete() -> None:
    """Every registered rule class has an installer (checked once the strategy modules are imported)."""
    missing = [name for name, rule in RULES.items() if rule not in INSTALLERS]
    if missing:
        raise RuntimeError(f"strategies without an installer: {', '.join(missing)}. Add a module to "
                           "offloadkit/runtime/strategies that calls register_installer for each")
