"""Bars on the real recorded candles (gaps and imputed minutes included): exact by design."""

import csv
from datetime import date, timedelta
from decimal import Decimal

import polars as pl
import pytest

from candlestack.ingest import Ingestor, day_start_ms
from candlestack.lake import Lake
from candlestack.resample import (
    BAR_TIMEFRAMES,
    TIMEFRAME_MINUTES,
    bars_per_day,
    minute_bars,
    resample,
    resample_all,
)
from candlestack.schema import BARS, MINUTE_MS
from candlestack.sources.replay import ReplaySource
from tests.conftest import OHLCV

FILES = {
    "BTC/USDT": "tooyipjee_binance_BTCUSDT_1m.csv",  # the 284-minute maintenance gap
    "POWR/BTC": "freqtrade-testdata_bittrex_POWRBTC_1m.csv",  # illiquid: 2,421 missing
    "BTC/USD": "cl8550_binanceus_BTCUSDT_1m.csv",  # complete, 658 zero-volume minutes
}


@pytest.fixture(scope="module", params=FILES)
def recording(request, tmp_path_factory):
    """A recording through the real gap pass: 1m candles with imputed minutes, and the
    volume strings exactly as the exchange published them."""
    path = OHLCV / FILES[request.param]
    with open(path) as handle:
        published = {int(r["ts_ms"]): Decimal(r["volume"]) for r in csv.DictReader(handle)}
    first, last = min(published), max(published)
    days = [
        date.fromtimestamp(first // 1000) + timedelta(days=i)
        for i in range((last - first) // 86_400_000 + 1)
    ][:12]
    source = ReplaySource({request.param: path}, clock=lambda: 2e9)
    outcomes = Ingestor(source, Lake(tmp_path_factory.mktemp("lake"))).ingest(request.param, days)
    # The days' month files (one or two), each read once.
    candles = pl.concat([pl.read_parquet(p) for p in dict.fromkeys(o.path for o in outcomes)])
    assert candles.height == sum(o.report["rows"] for o in outcomes)
    assert candles["ts"].is_sorted() and candles["ts"].is_unique().all()
    return candles, published


def test_chained_bars_equal_bars_straight_from_minutes_bit_for_bit(recording):
    minutes = minute_bars(recording[0])
    chained = resample_all(minutes)
    for timeframe in BAR_TIMEFRAMES:
        direct = resample(minutes, timeframe)
        assert chained[timeframe].equals(direct), timeframe
        assert chained[timeframe].schema == BARS


def test_each_bar_is_the_ohlcv_of_its_minutes(recording):
    candles, published = recording
    minutes = minute_bars(candles)
    for timeframe, bars in resample_all(minutes).items():
        if timeframe == "1m":
            continue
        bar_ms = TIMEFRAME_MINUTES[timeframe] * MINUTE_MS
        expected = (
            candles.with_columns(ts_ms=pl.col("ts").dt.epoch("ms"))
            .group_by((pl.col("ts_ms") // bar_ms).alias("bucket"), maintain_order=True)
            .agg(
                pl.col("open").first(),
                pl.col("high").max(),
                pl.col("low").min(),
                pl.col("close").last(),
                pl.col("ts_ms"),
                pl.len().alias("n_source"),
                pl.col("imputed").sum().alias("n_imputed"),
                (~pl.col("imputed") & (pl.col("volume") == 0)).sum().alias("n_zero_volume"),
            )
        )
        for column in ("open", "high", "low", "close", "n_source", "n_imputed", "n_zero_volume"):
            assert bars[column].to_list() == expected[column].to_list(), (timeframe, column)
        # Complete: every minute of the period there and real.
        assert bars["complete"].to_list() == [
            n == TIMEFRAME_MINUTES[timeframe] and not imputed
            for n, imputed in zip(expected["n_source"], expected["n_imputed"], strict=True)
        ]
        # Volume: the exact sum of the volumes as published (imputed minutes add 0).
        exact = [sum(published.get(t, Decimal(0)) for t in ts) for ts in expected["ts_ms"]]
        assert [Decimal(str(v)) for v in bars["volume_exact"]] == exact, timeframe
        assert bars["volume"].to_list() == [float(v) for v in exact], timeframe


def test_bar_counts_per_day_are_exact(recording):
    candles, _ = recording
    bars = resample_all(minute_bars(candles))
    per_day = candles.group_by(pl.col("ts").dt.date().alias("day")).agg(
        pl.col("ts").dt.epoch("ms").alias("ts_ms")
    )
    for timeframe in BAR_TIMEFRAMES:
        bar_ms = TIMEFRAME_MINUTES[timeframe] * MINUTE_MS
        counts = dict(bars[timeframe].group_by(pl.col("ts").dt.date()).len().iter_rows())
        for day, ts_ms in per_day.iter_rows():
            periods = len({t // bar_ms for t in ts_ms})  # periods with any minute at all
            assert counts.get(day, 0) == periods, (timeframe, day)
            if len(ts_ms) == 1440:
                assert periods == bars_per_day(timeframe)


def test_maintenance_window_bars_are_whole_but_not_complete(tmp_path):
    day = date(2021, 4, 25)
    source = ReplaySource({"BTC/USDT": OHLCV / FILES["BTC/USDT"]}, clock=lambda: 2e9)
    (outcome,) = Ingestor(source, Lake(tmp_path)).ingest("BTC/USDT", [day])
    bars = resample(minute_bars(pl.read_parquet(outcome.path)), "4h")
    window = bars.filter(pl.col("ts").dt.hour() == 4).row(0, named=True)
    # Every minute is there, but 239 of them are invented: not a complete bar.
    assert window["n_source"] == 240 and not window["complete"]
    assert window["n_imputed"] == 240 - 1  # 04:01-07:59 imputed, 04:00 real
    assert bars_per_day("4h") == bars.height == 6


def test_only_closed_periods_become_bars(recording):
    candles, _ = recording
    minutes = minute_bars(candles)
    first = int(minutes["ts"].dt.epoch("ms")[0])
    closed_end = (first // 3_600_000 + 5) * 3_600_000 + 37 * MINUTE_MS  # 5h37m in
    bars = resample_all(minutes, closed_end_ms=closed_end)
    for timeframe in BAR_TIMEFRAMES:
        bar_ms = TIMEFRAME_MINUTES[timeframe] * MINUTE_MS
        ends = bars[timeframe]["ts"].dt.epoch("ms") + bar_ms
        assert (ends <= closed_end).all(), timeframe
        later = resample(minutes, timeframe).filter(
            pl.col("ts").dt.epoch("ms") + bar_ms <= closed_end
        )
        assert bars[timeframe].equals(later), timeframe
    assert day_start_ms(date(2021, 1, 1)) % (4 * 3_600_000) == 0  # 4h bars align to UTC days
