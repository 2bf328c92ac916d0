"""The installers of every strategy, one module each, registered by rule class (see `registry`)."""

from . import disk, group, model, resident, sequential, skip, stream  # noqa: F401  (each module registers itself)
from .registry import INSTALLERS, Installer, check_complete, installer_for, register_installer

check_complete()

__all__ = ["INSTALLERS", "Installer", "check_complete", "installer_for", "register_installer"]
