"""The built-in strategies: mean reversion, breakout and moving-average cross."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from candlestack.features import FeatureSpec
from candlestack.strategies.base import Strategy, feature


class MeanReversion(Strategy):
    """Buy when the close is `threshold` (a fraction) below its `window`-bar simple moving
    average; sell when it reverts to the average (or earlier, at min_profit or a stop)."""

    window: int = Field(20, ge=2, le=10_000)
    threshold: float = Field(0.02, gt=0, lt=1)

    @property
    def _sma(self) -> str:
        return f"sma_{self.window}"

    def features(self) -> list[FeatureSpec]:
        return [feature(self._sma, "SMA", timeperiod=self.window)]

    def entry(self) -> pl.Expr:
        return pl.col("close") < pl.col(self._sma) * (1 - self.threshold)

    def exit(self) -> pl.Expr:
        return pl.col("close") >= pl.col(self._sma)


class Breakout(Strategy):
    """Buy when the close breaks above the highest high of the previous `entry_window` bars;
    sell when it falls below the lowest low of the previous `exit_window` bars (or by stop)."""

    entry_window: int = Field(20, ge=2, le=10_000)
    exit_window: int = Field(10, ge=2, le=10_000)

    def features(self) -> list[FeatureSpec]:
        return [
            feature(f"high_max_{self.entry_window}", "MAX", "high", timeperiod=self.entry_window),
            feature(f"low_min_{self.exit_window}", "MIN", "low", timeperiod=self.exit_window),
        ]

    def entry(self) -> pl.Expr:
        # The channel of the bars before this one: this bar's own high is never below its close.
        return pl.col("close") > pl.col(f"high_max_{self.entry_window}").shift(1)

    def exit(self) -> pl.Expr:
        return pl.col("close") < pl.col(f"low_min_{self.exit_window}").shift(1)


class MovingAverageCross(Strategy):
    """Buy when the `fast` moving average crosses above the `slow` one; sell when it crosses
    back below."""

    fast: int = Field(10, ge=1, le=10_000)
    slow: int = Field(50, ge=2, le=10_000)
    average: Literal["sma", "ema"] = "sma"

    @model_validator(mode="after")
    def _fast_below_slow(self) -> MovingAverageCross:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be shorter than slow ({self.slow})")
        return self

    def _name(self, period: int) -> str:
        return f"{self.average}_{period}"

    def features(self) -> list[FeatureSpec]:
        function = self.average.upper()
        return [feature(self._name(p), function, timeperiod=p) for p in (self.fast, self.slow)]

    def entry(self) -> pl.Expr:
        above = pl.col(self._name(self.fast)) > pl.col(self._name(self.slow))
        return above & ~above.shift(1)

    def exit(self) -> pl.Expr:
        below = pl.col(self._name(self.fast)) < pl.col(self._name(self.slow))
        return below & ~below.shift(1)


BUILTIN: dict[str, type[Strategy]] = {
    "mean_reversion": MeanReversion,
    "breakout": Breakout,
    "ma_cross": MovingAverageCross,
}
