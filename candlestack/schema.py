"""Polars schemas of every frame that crosses a module boundary, declared once."""

from __future__ import annotations

from datetime import UTC, date, datetime

import polars as pl

MINUTE_MS = 60_000
DAY_MS = 86_400_000
MINUTES_PER_DAY = 1_440

TS = pl.Datetime("ms", "UTC")

# What a source hands over: open time in UTC milliseconds, unvalidated prices.
RAW_CANDLES = pl.Schema(
    {
        "ts": pl.Int64,
        "open": pl.Float64,
        "high": pl.Float64,
        "low": pl.Float64,
        "close": pl.Float64,
        "volume": pl.Float64,
    }
)

# Open time and prices as stored for every timeframe.
_OHLCV = {"ts": TS, **{c: pl.Float64 for c in ("open", "high", "low", "close", "volume")}}

# What the lake stores for 1-minute candles.
CANDLES_1M = pl.Schema({**_OHLCV, "imputed": pl.Boolean})

# Exact volume: exchanges publish at most 8 decimals, and integer-backed decimal sums are
# associative, so a bar's volume is the same whichever intermediate bars it was built from.
VOLUME_EXACT = pl.Decimal(38, 8)

# Resampled bars (every timeframe but 1m): n_source counts the 1-minute candles present
# (real or imputed), n_imputed the imputed ones and n_zero_volume the real ones that traded
# nothing; complete means every minute of the period is there and real.
BARS = pl.Schema(
    {
        **_OHLCV,
        "volume_exact": VOLUME_EXACT,
        "n_source": pl.Int64,
        "n_imputed": pl.Int64,
        "n_zero_volume": pl.Int64,
        "complete": pl.Boolean,
    }
)

# Rows refused by validation, kept for reports (never written to the candle files).
REJECTED = pl.Schema({**RAW_CANDLES, "reason": pl.String})

# One row per run of consecutive missing minutes found in a partition.
GAPS = pl.Schema(
    {
        "gap_start": TS,
        "gap_end": TS,  # open time of the last missing minute (inclusive)
        "minutes": pl.Int64,
        "refetched": pl.Int64,  # minutes recovered by re-requesting them
        "imputed": pl.Int64,  # minutes filled as flat candles
        "missing": pl.Int64,  # minutes left missing (no earlier close known)
    }
)

# A stored real candle the source later delivered with other values: both kept, for audit.
REVISIONS = pl.Schema(
    {
        "ts": TS,
        **{f"old_{c}": pl.Float64 for c in ("open", "high", "low", "close", "volume")},
        **{c: pl.Float64 for c in ("open", "high", "low", "close", "volume")},
        "revised_at": TS,
    }
)

# One row per ingested partition: the figures behind metadata, checks and coverage.
PARTITION_REPORT = pl.Schema(
    {
        "expected": pl.Int64,  # closed minutes the day had when it was ingested
        "rows": pl.Int64,
        "missing_found": pl.Int64,
        "refetched": pl.Int64,
        "imputed": pl.Int64,
        "missing": pl.Int64,
        "rejected": pl.Int64,
        "real": pl.Int64,  # minutes with a candle from the source (not imputed)
        "zero_volume": pl.Int64,  # real minutes that traded nothing
        "kept": pl.Int64,  # stored real minutes the source no longer delivered, kept
        "revised": pl.Int64,  # stored real minutes the source now delivers with other values
        "first_ts": TS,
        "last_ts": TS,
        "content_hash": pl.String,
        "source": pl.String,
        "day_closed": pl.Boolean,
    }
)

MARKETS = pl.Schema(
    {
        "symbol": pl.String,
        "market_id": pl.String,
        "base": pl.String,
        "quote": pl.String,
        "active": pl.Boolean,
        "amount_step": pl.Float64,
        "price_tick": pl.Float64,
        "min_amount": pl.Float64,
        "max_amount": pl.Float64,
        "min_cost": pl.Float64,
        "maker_fee": pl.Float64,
        "taker_fee": pl.Float64,
    }
)


def day_start_ms(day: date) -> int:
    """Open time of a UTC day's first minute, in epoch milliseconds."""
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
