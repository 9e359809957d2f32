"""Strategies: declare parameters, the features read, and entry/exit signals."""

from candlestack.strategies.base import Strategy, StrategyError, feature, signals
from candlestack.strategies.builtin import BUILTIN, Breakout, MeanReversion, MovingAverageCross

__all__ = [
    "BUILTIN",
    "Breakout",
    "MeanReversion",
    "MovingAverageCross",
    "Strategy",
    "StrategyError",
    "feature",
    "signals",
]
