"""Bars and features agree on which 1-minute days may be built on, and one bad day of a
month never stops its other days."""

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack.bars import BarBuilder, usable_minutes
from candlestack.feature_store import FeatureBuilder, load_feature_set
from candlestack.features import FeatureSet, compute, warmup_bars
from candlestack.ingest import Ingestor
from candlestack.lake import DayData, Lake
from candlestack.resample import bars_per_day
from candlestack.sources.replay import ReplaySource
from candlestack.sources.synthetic import SyntheticSource
from tests.conftest import REPLAY_FILES

DAYS = [date(2024, 2, 1) + timedelta(days=i) for i in range(3)]


def _break_one_high(lake: Lake, day: date) -> None:
    """Store a day's candles with one high under its candle's body, its report and gaps as
    they were: the gaps figures still pass."""
    stored = lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", day)
    broken = stored.day(day).with_columns(
        high=pl.when(pl.int_range(pl.len()) == 7).then(0.0).otherwise("high")
    )
    gaps = stored.gaps.filter(pl.col("gap_start").dt.date() == day)
    lake.write_month(
        "ohlcv",
        "synthetic",
        "1m",
        "BTC-USDT",
        day,
        {day: DayData(broken, stored.reports[day], gaps)},
    )


def test_a_day_breaking_an_ohlc_rule_gets_neither_bars_nor_features(tmp_path):
    lake = Lake(tmp_path)
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 1.8e9)
    Ingestor(source, lake).ingest("BTC/USDT", DAYS)
    bad = DAYS[1]
    builder = BarBuilder(lake, "synthetic", 0.01)
    before = {o.day: o for o in builder.build("5m", "BTC-USDT", bad)}
    assert all(before[d].skipped is None and before[d].bars == 288 for d in DAYS)
    _break_one_high(lake, bad)

    usable = usable_minutes(lake, "synthetic", "BTC-USDT", bad, 0.01)
    why = usable.unusable[bad]
    assert "high_below_body" in why
    assert set(usable.unusable) == {bad}
    assert list(usable.reports) == [DAYS[0], DAYS[2]]
    assert usable.minutes["ts"].dt.date().unique().to_list() == [DAYS[0], DAYS[2]]

    bars = {o.day: o for o in builder.build("5m", "BTC-USDT", bad)}
    assert bars[bad].skipped == why
    assert bars[bad].bars == 0
    for day in (DAYS[0], DAYS[2]):
        assert bars[day].skipped is None and bars[day].bars == 288
        assert bars[day].content_hash == before[day].content_hash
    # The bars the day had are removed: nothing downstream may read them.
    stored = lake.read_month("bars", "synthetic", "5m", "BTC-USDT", bad)
    assert list(stored.reports) == [DAYS[0], DAYS[2]]
    assert stored.day(bad).is_empty()

    features = FeatureBuilder(lake, "synthetic", load_feature_set(None), 0.01)
    by_day = {o.day: o for o in features.build("1m", "BTC-USDT", bad)}
    assert by_day[bad].skipped == "no usable 1m bars"
    assert by_day[DAYS[0]].skipped is None and by_day[DAYS[0]].rows == 1440
    assert by_day[DAYS[2]].skipped is None and by_day[DAYS[2]].rows == 1440


# --- one bad day does not stop the rest: the real 2021-04-25 maintenance gap ----------------

APRIL = [date(2021, 4, 21) + timedelta(days=i) for i in range(10)]  # 21st to 30th
GAP_DAY = date(2021, 4, 25)  # 284 minutes imputed: 19.72 % of the day
SMALL = FeatureSet.model_validate(
    {
        "features": [
            {"name": "sma_20", "function": "SMA", "params": {"timeperiod": 20}, "timeframe": tf}
            for tf in ("15m", "1h")
        ]
        + [
            {"name": "ema_5", "function": "EMA", "params": {"timeperiod": 5}, "timeframe": tf}
            for tf in ("15m", "1h")
        ]
    }
)


@pytest.fixture(scope="module")
def april(tmp_path_factory, shared_data) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("april"))
    source = ReplaySource({"BTC/USDT": REPLAY_FILES["BTC/USDT"]})
    Ingestor(source, lake).ingest("BTC/USDT", APRIL)
    return lake


@pytest.mark.parametrize("timeframe", ["15m", "1h", "4h"])
def test_a_day_failing_the_gaps_rule_is_skipped_and_the_months_other_days_get_bars(
    april, timeframe
):
    builder = BarBuilder(april, "binance", 0.01)
    if timeframe == "4h":
        builder.build("1h", "BTC-USDT", GAP_DAY)  # 4h is chained on 1h
    outcomes = {o.day: o for o in builder.build(timeframe, "BTC-USDT", GAP_DAY)}

    gap_day = outcomes[GAP_DAY]
    assert gap_day.skipped == "1m candles fail gaps: imputed share 19.72% > 1.00%"
    assert gap_day.bars == 0 and gap_day.content_hash is None
    for day in APRIL:
        if day == GAP_DAY:
            continue
        assert outcomes[day].skipped is None, day
        assert outcomes[day].mismatch is None, day
        assert outcomes[day].bars == outcomes[day].complete == bars_per_day(timeframe), day
    # Every stored day of the month has an outcome, the bad one included.
    assert sorted(outcomes) == APRIL
    stored = april.read_month("bars", "binance", timeframe, "BTC-USDT", GAP_DAY)
    assert list(stored.reports) == [d for d in APRIL if d != GAP_DAY]
    assert stored.day(GAP_DAY).is_empty()


@pytest.mark.parametrize("timeframe", ["15m", "1h"])
def test_a_day_failing_the_gaps_rule_gets_no_features_and_history_restarts_after_it(
    april, timeframe
):
    BarBuilder(april, "binance", 0.01).build(timeframe, "BTC-USDT", GAP_DAY)
    builder = FeatureBuilder(april, "binance", SMALL, 0.01)
    outcomes = {o.day: o for o in builder.build(timeframe, "BTC-USDT", GAP_DAY)}

    assert outcomes[GAP_DAY].skipped == f"no usable {timeframe} bars"
    assert outcomes[GAP_DAY].content_hash is None
    per_day = bars_per_day(timeframe)
    for day in APRIL:
        if day == GAP_DAY:
            continue
        assert outcomes[day].skipped is None, day
        assert outcomes[day].rows == per_day, day
        assert outcomes[day].content_hash is not None, day
    # Warm after three days of history before the gap (EMA(5) needs 56 bars); not warm
    # right after it: the indicators are never computed across the day without bars.
    assert warmup_bars(SMALL.for_timeframe(timeframe)) == 56
    assert outcomes[APRIL[3]].warm and outcomes[APRIL[3]].nulls_after_warmup == 0
    assert not outcomes[GAP_DAY + timedelta(days=1)].warm

    stored = april.read_month("features", "binance", timeframe, "BTC-USDT", GAP_DAY)
    assert GAP_DAY not in stored.reports
    assert stored.day(GAP_DAY).is_empty()
    # The day after the gap is what its own bars alone give, bit for bit.
    after = GAP_DAY + timedelta(days=1)
    bars = april.read_days("bars", "binance", timeframe, "BTC-USDT", after, APRIL[-1])
    start = datetime(after.year, after.month, after.day, tzinfo=UTC)
    alone = compute(bars, SMALL.for_timeframe(timeframe), first_output_ts=start)
    assert_frame_equal(stored.frame.filter(pl.col("ts") >= start), alone, check_exact=True)
