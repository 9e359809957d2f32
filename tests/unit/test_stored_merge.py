"""Re-ingest never replaces a stored candle with less: what the source no longer delivers is
kept, a changed candle is a recorded revision, an imputed minute heals when the real one
comes; and the figures of a day say how much of it is real, imputed and traded nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack.catalog import build_catalog, connect
from candlestack.checks import zero_volume_failures, zero_volume_share
from candlestack.config import load_settings
from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.schema import MINUTE_MS, day_start_ms
from candlestack.sources.replay import ReplaySource
from tests.conftest import OHLCV

SYMBOL = "BTC/USDT"
KEY = "BTC-USDT"
DAY = date(2021, 4, 24)  # a whole day of real Binance candles
START = day_start_ms(DAY)
HEALED = START + 100 * MINUTE_MS  # absent from the first answer: imputed, then delivered
REVISED = START + 900 * MINUTE_MS  # delivered again with another close
BINANCE_US = OHLCV / "cl8550_binanceus_BTCUSDT_1m.csv"
QUIET_DAY = date(2023, 3, 4)  # 9.1 % of its minutes traded nothing


def minute(n: int) -> int:
    return START + n * MINUTE_MS


# The minutes the second answer spoils, each with the bad rows it sends instead.
SPOILED = {
    minute(200): [{"close": math.nan}],
    minute(300): [{"high": 1.0, "low": 2.0}],
    minute(400): [{"volume": -1.0}],
    minute(500): [{"close": 1.0}, {"close": 2.0}],  # two answers: nothing tells which
    minute(600): [{"ts": minute(600) + 30_000}],  # off the minute
    minute(700): [{"ts": minute(700) // 1000}],  # in seconds
    minute(800): [{"open": 10**9}],  # open above high
}


class Answers(ReplaySource):
    """Real recorded candles, passed through what this test makes the exchange answer."""

    def __init__(self) -> None:
        super().__init__({SYMBOL: OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"}, clock=lambda: 2e9)
        self.answer: Callable[[pl.DataFrame], pl.DataFrame] = lambda frame: frame

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        return self.answer(super().fetch_candles(symbol, start_ms, end_ms))


def without_healed(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("ts") != HEALED)


def spoiled(frame: pl.DataFrame) -> pl.DataFrame:
    """The candles with SPOILED's minutes replaced by bad rows, and REVISED's close moved
    (within its low and high: a valid candle)."""
    good = frame.filter(~pl.col("ts").is_in(list(SPOILED)))
    bad = [
        {**row, **change}
        for row in frame.filter(pl.col("ts").is_in(list(SPOILED))).iter_rows(named=True)
        for change in SPOILED[row["ts"]]
    ]
    revised = pl.when(pl.col("ts") == REVISED).then(pl.col("low")).otherwise(pl.col("close"))
    return pl.concat([good.with_columns(close=revised), pl.DataFrame(bad, schema=frame.schema)])


@pytest.fixture
def lake_and_source(tmp_path) -> tuple[Lake, Answers]:
    source = Answers()
    source.answer = without_healed
    (first,) = Ingestor(source, Lake(tmp_path)).ingest(SYMBOL, [DAY])
    # One minute imputed: the day is not final, so every run of its month asks for it again.
    assert first.report["imputed"] == 1
    return Lake(tmp_path), source


def stored(lake: Lake) -> pl.DataFrame:
    return lake.read_month("ohlcv", "binance", "1m", KEY, DAY).frame


def test_a_re_ingest_with_bad_rows_keeps_every_stored_real_candle(lake_and_source):
    lake, source = lake_and_source
    before = stored(lake)
    source.answer = spoiled

    (outcome,) = Ingestor(source, lake).ingest(SYMBOL, [DAY])

    after = stored(lake)
    kept = [pl.col("ts").dt.epoch("ms").is_in([*SPOILED, REVISED, HEALED]).not_()]
    # Bit for bit: every candle but the revised and the healed one is as it was stored.
    assert_frame_equal(after.filter(*kept), before.filter(*kept))
    spoiled_minutes = pl.col("ts").dt.epoch("ms").is_in(list(SPOILED))
    assert_frame_equal(after.filter(spoiled_minutes), before.filter(spoiled_minutes))
    assert not after.filter(spoiled_minutes)["imputed"].any()
    assert outcome.report["rejected"] == 8
    assert outcome.report["kept"] == len(SPOILED)
    assert outcome.report["imputed"] == 0 and outcome.report["missing"] == 0
    reasons = set(outcome.rejected["reason"])
    assert "duplicate timestamp with different values" in reasons and "high < low" in reasons


def test_an_imputed_minute_is_replaced_by_the_real_candle_once_delivered(lake_and_source):
    lake, source = lake_and_source
    source.answer = lambda frame: frame

    (outcome,) = Ingestor(source, lake).ingest(SYMBOL, [DAY])

    healed = stored(lake).filter(pl.col("ts").dt.epoch("ms") == HEALED).row(0, named=True)
    real = source._candles(SYMBOL).filter(pl.col("ts") == HEALED).row(0, named=True)
    assert not healed["imputed"]
    assert [healed[c] for c in ("open", "high", "low", "close", "volume")] == [
        real[c] for c in ("open", "high", "low", "close", "volume")
    ]
    assert outcome.report["imputed"] == 0 and outcome.report["real"] == 1440
    assert outcome.revisions.is_empty()  # an imputed minute replaced is no revision


def test_a_changed_candle_is_a_revision_written_counted_and_kept_old_and_new(
    lake_and_source, tmp_path
):
    lake, source = lake_and_source
    old = stored(lake).filter(pl.col("ts").dt.epoch("ms") == REVISED).row(0, named=True)
    source.answer = spoiled

    (outcome,) = Ingestor(source, lake).ingest(SYMBOL, [DAY])

    new = stored(lake).filter(pl.col("ts").dt.epoch("ms") == REVISED).row(0, named=True)
    assert new["close"] == old["low"] != old["close"]
    assert outcome.report["revised"] == 1
    (revision,) = outcome.revisions.iter_rows(named=True)
    assert (revision["old_close"], revision["close"]) == (old["close"], new["close"])
    # Kept in the month file, and queryable in the catalog.
    month = lake.read_month("ohlcv", "binance", "1m", KEY, DAY)
    assert month.revisions["old_close"].to_list() == [old["close"]]
    build_catalog(lake, tmp_path / "c.duckdb")
    with connect(tmp_path / "c.duckdb", lake) as con:
        rows = con.sql("SELECT symbol, date, old_close, close FROM revisions").fetchall()
    assert rows == [(KEY, DAY, old["close"], new["close"])]

    # A rerun finds nothing new: no revision twice, the file left as it is.
    (again,) = Ingestor(source, lake).ingest(SYMBOL, [DAY])
    assert again.revisions.is_empty() and again.report["revised"] == 1
    assert again.write.written is False


def test_a_day_reports_its_real_imputed_and_zero_volume_minutes(tmp_path):
    """Binance.US's BTC/USDT prints flat candles of no volume while nobody trades (131 of
    2023-03-04's minutes): the day shows its share, and the zero-volume rule flags it."""
    source = ReplaySource({SYMBOL: BINANCE_US}, exchange="binanceus", clock=lambda: 2e9)
    (outcome,) = Ingestor(source, Lake(tmp_path)).ingest(SYMBOL, [QUIET_DAY])
    report = outcome.report
    day = pl.read_parquet(outcome.path)
    assert report["real"] + report["imputed"] == report["rows"] == day.height
    zero = day.filter(~pl.col("imputed") & (pl.col("volume") == 0)).height
    assert report["zero_volume"] == zero > 0
    share = zero_volume_share(report)
    assert share == zero / report["real"] > load_settings().zero_volume_max_share
    failed = zero_volume_failures([(KEY, QUIET_DAY, report)], max_share=0.05)
    assert failed["date"].to_list() == [str(QUIET_DAY)]
    assert zero_volume_failures([(KEY, QUIET_DAY, report)], max_share=share).is_empty()


def test_no_negative_zero_volume_is_stored(tmp_path):
    source = Answers()
    # An exchange's -0.0 volume, and a gap to impute.
    source.answer = lambda frame: without_healed(frame).with_columns(
        volume=pl.when(pl.col("ts") == minute(5)).then(-0.0).otherwise(pl.col("volume"))
    )
    (outcome,) = Ingestor(source, Lake(tmp_path)).ingest(SYMBOL, [DAY])
    volume = pl.read_parquet(outcome.path)["volume"].to_numpy()
    assert not np.signbit(volume).any()


def test_an_empty_day_is_proven_empty_with_one_request(tmp_path):
    source = Answers()
    asked = []
    source.answer = lambda frame: asked.append(frame.height) or frame.clear()
    (outcome,) = Ingestor(source, Lake(tmp_path)).ingest(SYMBOL, [DAY])
    assert outcome.report["rows"] == 0 and outcome.report["missing"] == 1440
    assert len(asked) == 1
