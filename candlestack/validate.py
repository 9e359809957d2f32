"""Row validation of incoming candles: bad rows are refused with a reason, never written."""

from __future__ import annotations

import logging

import polars as pl

from candlestack.schema import MINUTE_MS, RAW_CANDLES, REJECTED

log = logging.getLogger(__name__)

PRICES = ("open", "high", "low", "close")


def validate(raw: pl.DataFrame, start_ms: int, end_ms: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw candles into (clean, rejected) for the window [start_ms, end_ms).

    Clean rows are sorted and unique by ts. Identical repeats (pagination overlap)
    collapse to one row; repeats with different values are all refused, since
    nothing tells which one is right: that minute becomes a gap to re-request.
    """
    frame = raw.select(pl.col(c).cast(t, strict=False) for c, t in RAW_CANDLES.items())
    frame = frame.unique(maintain_order=True)
    conflicting = pl.col("ts").is_duplicated()
    frame = frame.with_columns(
        reason=pl.when(
            pl.col("ts").is_null()
            | pl.any_horizontal(
                pl.col(c).is_null() | ~pl.col(c).is_finite() for c in (*PRICES, "volume")
            )
        )
        .then(pl.lit("non-finite value"))
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
