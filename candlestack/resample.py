"""Deterministic resampling of 1-minute candles into UTC-aligned bars labelled by open time.

A bar is first open, max high, min low, last close and the exact sum of volume of the
minutes it covers. Volumes are summed as 128-bit decimals (8 places, the most exchanges
publish), so a 10m bar built from two 5m bars is bit for bit the bar built from its ten
minutes; float sums differ in the last bit for ~40 % of such bars on real Binance data.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from candlestack.schema import BARS, CANDLES_1M, MINUTE_MS, TS, VOLUME_EXACT

TIMEFRAME_MINUTES = {
    "1m": 1,
    "3m": 3,
    "5m": 5,
    "10m": 10,
    "15m": 15,
    "1h": 60,
    "4h": 240,
    "1d": 1440,
}
# The lineage operators expect: each timeframe from the one it is usually derived from.
SOURCE_TIMEFRAME = {
    "3m": "1m",
    "5m": "1m",
    "15m": "1m",
    "1h": "1m",
    "10m": "5m",
    "4h": "1h",
    "1d": "1h",
}
BAR_TIMEFRAMES = tuple(SOURCE_TIMEFRAME)
MAX_GRID_WIDTH = 15


def bars_per_day(timeframe: str) -> int:
    return TIMEFRAME_MINUTES["1d"] // TIMEFRAME_MINUTES[timeframe]


def minute_bars(candles: pl.DataFrame) -> pl.DataFrame:
    """1-minute candles seen as bars of one minute each, the input of every resample."""
    return candles.match_to_schema(CANDLES_1M).select(
        "ts",
        "open",
        "high",
        "low",
        "close",
        "volume",
        pl.col("volume").cast(VOLUME_EXACT).alias("volume_exact"),
        pl.lit(1, pl.Int64).alias("n_source"),
        pl.col("imputed").cast(pl.Int64).alias("n_imputed"),
        (~pl.col("imputed") & (pl.col("volume") == 0)).cast(pl.Int64).alias("n_zero_volume"),
        (~pl.col("imputed")).alias("complete"),
    )


def _per_bar(reduce: np.ufunc, values: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """`reduce` over each bar's rows. When every bar has the same few rows (`width`, 0 if
    they differ), reducing across the columns of the transposed grid is vectorised and 3-8x
    faster than reduceat (measured for 3 to 15 rows; reduceat wins above). Both are exact:
    a max or a min involves no rounding."""
    if 0 < width <= MAX_GRID_WIDTH:
        return reduce.reduce(np.ascontiguousarray(values.reshape(-1, width).T), axis=0)
    return reduce.reduceat(values, starts)


class _Source:
    """Running sums of one source frame, computed once and shared by every timeframe built
    from it: a bar's volume and counts are then differences of two running values (exact:
    the volume's are 128-bit decimals), and only high and low need a per-bar reduction."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.ts_ms = frame["ts"].dt.epoch("ms").to_numpy()
        self.volume = frame["volume_exact"].cum_sum()
        self.n_source = np.cumsum(frame["n_source"].to_numpy())
        self.n_imputed = np.cumsum(frame["n_imputed"].to_numpy())
        self.n_zero_volume = np.cumsum(frame["n_zero_volume"].to_numpy())

    def _starts(self, rows: int, bar_ms: int) -> tuple[np.ndarray, int]:
        """First row of each bar, and the rows every bar has (0 when they differ).
        Sorted input: each bar is a contiguous run of rows."""
        ts = self.ts_ms
        step = int(ts[1] - ts[0]) if rows > 1 else bar_ms
        width = bar_ms // step if step and bar_ms % step == 0 else 0
        dense = width and ts[rows - 1] - ts[0] == (rows - 1) * step
        if dense and ts[0] % bar_ms == 0 and rows % width == 0:
            # No row missing and aligned (most days): every bar has `width` rows.
            return np.arange(0, rows, width), width
        bucket = ts[:rows] // bar_ms
        return np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]]), 0

    def bars(self, timeframe: str, closed_end_ms: int | None) -> pl.DataFrame:
        minutes = TIMEFRAME_MINUTES[timeframe]
        bar_ms = minutes * MINUTE_MS
        rows = len(self.ts_ms)
        if closed_end_ms is not None:
            rows = int(np.searchsorted(self.ts_ms, closed_end_ms // bar_ms * bar_ms))
        if not rows:
            return pl.DataFrame(schema=BARS)
        starts, width = self._starts(rows, bar_ms)
        bucket = self.ts_ms[starts] // bar_ms
        ends = np.r_[starts[1:], rows] - 1
        volume_end = self.volume.gather(ends)
        volume_exact = (volume_end - volume_end.shift(1, fill_value=0)).cast(VOLUME_EXACT)
        n_source = np.diff(self.n_source[ends], prepend=0)
        n_imputed = np.diff(self.n_imputed[ends], prepend=0)
        frame = self.frame
        return pl.DataFrame(
            {
                "ts": pl.Series(bucket * bar_ms).cast(TS),
                "open": frame["open"].to_numpy()[starts],
                "high": _per_bar(np.maximum, frame["high"].to_numpy()[:rows], starts, width),
                "low": _per_bar(np.minimum, frame["low"].to_numpy()[:rows], starts, width),
                "close": frame["close"].to_numpy()[ends],
                "volume": volume_exact.cast(pl.Float64),
                "volume_exact": volume_exact,
                "n_source": n_source,
                "n_imputed": n_imputed,
                "n_zero_volume": np.diff(self.n_zero_volume[ends], prepend=0),
                # Every minute of the period there and real: imputed ones are not data.
                "complete": (n_source == minutes) & (n_imputed == 0),
            },
            schema=BARS,
        )


def resample(
    source: pl.DataFrame, timeframe: str, closed_end_ms: int | None = None
) -> pl.DataFrame:
    """Bars of `timeframe` from finer bars sorted by ts (`minute_bars` or a coarser BARS frame).

    Only closed periods are produced: with `closed_end_ms` (the end of the last closed
    minute), a bar whose period ends after it is left out. A period without any source
    minute has no bar: nothing honest could be said of its prices.
    """
    return _Source(source).bars(timeframe, closed_end_ms)


def resample_all(
    minutes: pl.DataFrame, closed_end_ms: int | None = None
) -> dict[str, pl.DataFrame]:
    """Every timeframe, each from its usual source (SOURCE_TIMEFRAME), from `minute_bars`."""
    frames = {"1m": minutes}
    sources: dict[str, _Source] = {}
    for timeframe, source in SOURCE_TIMEFRAME.items():
        if source not in sources:
            sources[source] = _Source(frames[source])
        frames[timeframe] = sources[source].bars(timeframe, closed_end_ms)
    return frames
