"""Registered strategies. A new strategy is one new module here plus one import below."""

from .base import STRATEGIES, Strategy, StrategyRule, register
from . import disk, group, model, resident, sequential, skip  # noqa: F401  (each module registers itself)

__all__ = ["STRATEGIES", "Strategy", "StrategyRule", "register"]
