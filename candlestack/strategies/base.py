"""What a strategy is: parameters, the features it needs, and entry/exit signals.

A strategy is a pydantic model whose fields are its parameters. It names the indicator
features it reads (computed by candlestack.features, the engine behind the features assets)
and returns two boolean polars expressions over the bars and those features: enter on the
close of a bar where `entry()` is true, exit on the close of a bar where `exit()` is true.
Sizing, market rules, fills, fees, stops and bookkeeping are the platform's.

Signals must only look back (shift(n) with n >= 0, rolling windows ending at the row):
candlestack.lookahead checks that.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from candlestack.errors import CandlestackError
from candlestack.features import FeatureSpec


class StrategyError(CandlestackError):
    """A strategy's signals cannot be evaluated (bad expression, missing column, ...)."""


class Strategy(BaseModel):
    """Subclass this; declare parameters as fields with pydantic constraints."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def features(self) -> list[FeatureSpec]:
        """The indicator features `entry` and `exit` read (none by default)."""
        return []

    def entry(self) -> pl.Expr:
        raise NotImplementedError

    def exit(self) -> pl.Expr:
        raise NotImplementedError


def feature(name: str, function: str, column: str = "close", **params: int | float) -> FeatureSpec:
    """A one-input TA-Lib feature, e.g. feature("sma_20", "SMA", timeperiod=20)."""
    return FeatureSpec(name=name, function=function, inputs={"price": column}, params=params)


def signals(strategy: Strategy, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit flags for each row of `frame` (null counts as false)."""
    name = type(strategy).__name__
    try:
        # As bytes, viewed as bools: no copy, where a Boolean column unpacks its bitmap.
        flags = (
            frame.lazy()
            .select(
                strategy.entry().cast(pl.Boolean).fill_null(False).cast(pl.UInt8).alias("entry"),
                strategy.exit().cast(pl.Boolean).fill_null(False).cast(pl.UInt8).alias("exit"),
            )
            .collect()
        )
    except (pl.exceptions.PolarsError, NotImplementedError) as exc:
        raise StrategyError(f"strategy {name}: cannot evaluate its signals: {exc}") from exc
    if flags.height != frame.height:
        raise StrategyError(
            f"strategy {name}: signals have {flags.height} rows for {frame.height} bars; "
            "entry() and exit() must be row-wise expressions"
        )
    return tuple(flags.get_column(c).to_numpy().view(np.bool_) for c in ("entry", "exit"))
