"""Row validation of incoming candles: bad rows are refused with a reason, never written."""

from __future__ import annotations

import logging
from fractions import Fraction

import polars as pl

from candlestack.schema import MINUTE_MS, RAW_CANDLES, REJECTED

log = logging.getLogger(__name__)

PRICES = ("open", "high", "low", "close")

# Open times a candle can have, in epoch ms: none before Bitcoin's genesis block (2009-01-03,
# before any crypto exchange) nor from 2100 on. The span is narrow enough that the same
# instants written in seconds, ms, µs or ns fall in four ranges that never overlap.
EARLIEST_MS = 1_230_940_800_000
LATEST_MS = 4_102_444_800_000
# How many of each unit make a millisecond.
_UNITS = {
    "milliseconds": Fraction(1),
    "seconds": Fraction(1, 1000),
    "microseconds": Fraction(1000),
    "nanoseconds": Fraction(1_000_000),
}


def _written_in(ts: pl.Expr, per_ms: Fraction) -> pl.Expr:
    return ts.is_between(int(EARLIEST_MS * per_ms), int(LATEST_MS * per_ms), closed="left")


def timestamp_unit(ts: pl.Expr) -> pl.Expr:
    """The unit an epoch timestamp is written in ("milliseconds", "seconds", ...): null when
    it is off the epoch in every unit (or null)."""
    unit = pl.lit(None, pl.String)
    for name, per_ms in _UNITS.items():
        unit = pl.when(_written_in(ts, per_ms)).then(pl.lit(name)).otherwise(unit)
    return unit


def intended_epoch_ms(ts: pl.Expr) -> pl.Expr:
    """The epoch ms a timestamp stands for, whichever unit it is written in; unchanged when
    it is off the epoch. Sources route rows by it, so that a row in the wrong unit reaches
    the window it belongs to, and is refused there."""
    ms = ts
    for per_ms in _UNITS.values():
        in_ms = ts * per_ms.denominator // per_ms.numerator
        ms = pl.when(_written_in(ts, per_ms)).then(in_ms).otherwise(ms)
    return ms


def validate(raw: pl.DataFrame, start_ms: int, end_ms: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw candles into (clean, rejected) for the window [start_ms, end_ms).

    Clean rows are sorted and unique by ts. Identical repeats (pagination overlap)
    collapse to one row; repeats with different values are all refused, since
    nothing tells which one is right: that minute becomes a gap to re-request.
    A timestamp in another unit than ms, or off the epoch, is refused as such, before it
    could pass for a minute outside the window.
    """
    frame = raw.select(pl.col(c).cast(t, strict=False) for c, t in RAW_CANDLES.items())
    frame = frame.unique(maintain_order=True)
    conflicting = pl.col("ts").is_duplicated()
    unit = timestamp_unit(pl.col("ts"))
    frame = frame.with_columns(
        reason=pl.when(
            pl.col("ts").is_null()
            | pl.any_horizontal(
                pl.col(c).is_null() | ~pl.col(c).is_finite() for c in (*PRICES, "volume")
            )
        )
        .then(pl.lit("non-finite value"))
        .when(unit.is_null())
        .then(pl.lit("timestamp off the epoch"))
        .when(unit != "milliseconds")
        .then(pl.format("timestamp in {}", unit))
        .when(pl.col("ts") % MINUTE_MS != 0)
        .then(pl.lit("timestamp not on the minute"))
        .when((pl.col("ts") < start_ms) | (pl.col("ts") >= end_ms))
        .then(pl.lit("outside the requested range"))
        .when(conflicting)
        .then(pl.lit("duplicate timestamp with different values"))
        .when(pl.col("volume") < 0)
        .then(pl.lit("negative volume"))
        .when(pl.col("high") < pl.col("low"))
        .then(pl.lit("high < low"))
        .when(~pl.col("open").is_between(pl.col("low"), pl.col("high")))
        .then(pl.lit("open outside [low, high]"))
        .when(~pl.col("close").is_between(pl.col("low"), pl.col("high")))
        .then(pl.lit("close outside [low, high]"))
    )
    rejected = frame.filter(pl.col("reason").is_not_null()).select(REJECTED.names())
    clean = frame.filter(pl.col("reason").is_null()).drop("reason").sort("ts")
    if rejected.height:
        log.warning(
            "rejected %d of %d rows: %s",
            rejected.height,
            frame.height,
            describe_rejections(rejected, limit=3),
        )
    return clean, rejected


def describe_rejections(rejected: pl.DataFrame, limit: int = 5) -> str:
    """Counts per reason and the first offending rows, for logs and metadata."""
    if rejected.is_empty():
        return "none"
    counts = rejected.group_by("reason").len().sort("len", descending=True)
    summary = ", ".join(f"{r['len']} {r['reason']}" for r in counts.iter_rows(named=True))
    examples = "; ".join(
        f"ts={r['ts']} o={r['open']} h={r['high']} l={r['low']} c={r['close']} v={r['volume']}"
        f" ({r['reason']})"
        for r in rejected.head(limit).iter_rows(named=True)
    )
    return f"{summary}; e.g. {examples}"
