"""Finding missing minutes and filling what the exchange does not have.

Rule: a missing minute is re-requested; if still missing, it becomes a flat
candle at the last real close known before it (volume 0, imputed = true).
Minutes with no real close in the lookback before them stay missing.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from candlestack.schema import CANDLES_1M, GAPS, MINUTE_MS, TS

# An exchange's -0.0 volume stored as 0.0: a signed zero makes equal candles hash and compare
# differently. (`volume + 0.0` would do, but polars simplifies it away outside a lazy query.)
_UNSIGNED_VOLUME = pl.when(pl.col("volume") == 0).then(0.0).otherwise(pl.col("volume"))
_UNSIGNED_VOLUME = _UNSIGNED_VOLUME.alias("volume")

# How far back a close may come from to fill a leading gap (one day).
PREVIOUS_CLOSE_LOOKBACK_MS = 86_400_000


def missing_runs(ts_ms: np.ndarray, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """Runs [first, last] (open times, inclusive) of minutes absent from sorted unique ts_ms."""
    present = ts_ms[(ts_ms >= start_ms) & (ts_ms < end_ms)]
    bounds = np.concatenate(([start_ms - MINUTE_MS], present, [end_ms]))
    steps = np.diff(bounds)
    where = np.flatnonzero(steps > MINUTE_MS)
    return [(int(bounds[i] + MINUTE_MS), int(bounds[i + 1] - MINUTE_MS)) for i in where]


def request_windows(runs: list[tuple[int, int]], max_minutes: int) -> list[tuple[int, int]]:
    """Merge nearby gaps into [start, end) windows of at most max_minutes each.

    Illiquid markets have thousands of one-minute gaps a day: one request per page,
    not per gap, keeps a re-fetch pass within the exchange's rate limits.
    """
    windows: list[tuple[int, int]] = []
    for first, last in runs:
        end = last + MINUTE_MS
        if windows and end - windows[-1][0] <= max_minutes * MINUTE_MS:
            windows[-1] = (windows[-1][0], end)
            continue
        while end - first > max_minutes * MINUTE_MS:
            windows.append((first, first + max_minutes * MINUTE_MS))
            first += max_minutes * MINUTE_MS
        windows.append((first, end))
    return windows


def fill(
    clean: pl.DataFrame, start_ms: int, end_ms: int, previous_close: float | None
) -> pl.DataFrame:
    """Candles for every minute of [start_ms, end_ms) that has a real or imputed value.

    `clean` holds validated raw candles of the window; `previous_close` is the last
    real close before start_ms, if one is known.
    """
    if clean.height == (end_ms - start_ms) // MINUTE_MS:
        # Nothing missing (most days): no grid to join.
        return clean.with_columns(
            pl.col("ts").cast(TS), _UNSIGNED_VOLUME, imputed=pl.lit(False)
        ).match_to_schema(CANDLES_1M)
    grid = pl.DataFrame({"ts": pl.int_range(start_ms, end_ms, MINUTE_MS, eager=True)})
    joined = grid.join(clean, on="ts", how="left", maintain_order="left")
    carried = pl.col("close").forward_fill()
    if previous_close is not None:
        carried = carried.fill_null(previous_close)
    return (
        joined.with_columns(imputed=pl.col("open").is_null(), carried=carried)
        .filter(pl.col("carried").is_not_null())
        .select(
            pl.col("ts").cast(TS),
            *(pl.coalesce(c, "carried").alias(c) for c in ("open", "high", "low", "close")),
            _UNSIGNED_VOLUME.fill_null(0.0),
            "imputed",
        )
        .match_to_schema(CANDLES_1M)
    )


def gap_report(
    first_pass_runs: list[tuple[int, int]], final_ts_ms: np.ndarray, imputed_ts_ms: np.ndarray
) -> pl.DataFrame:
    """One row per gap found on the first pass: how it was resolved."""
    rows = []
    for first, last in first_pass_runs:
        minutes = (last - first) // MINUTE_MS + 1
        lo, hi = first, last + MINUTE_MS
        present = int(np.count_nonzero((final_ts_ms >= lo) & (final_ts_ms < hi)))
        imputed = int(np.count_nonzero((imputed_ts_ms >= lo) & (imputed_ts_ms < hi)))
        rows.append((first, last, minutes, present - imputed, imputed, minutes - present))
    frame = pl.DataFrame(rows, schema=list(GAPS.names()), orient="row")
    return frame.with_columns(pl.col("gap_start", "gap_end").cast(TS)).match_to_schema(GAPS)
