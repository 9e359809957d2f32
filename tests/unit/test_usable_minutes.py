"""Bars and features agree on which 1-minute days may be built on."""

from datetime import date, timedelta

import polars as pl

from candlestack.bars import BarBuilder, usable_minutes
from candlestack.feature_store import FeatureBuilder, load_feature_set
from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.sources.synthetic import SyntheticSource

DAYS = [date(2024, 2, 1) + timedelta(days=i) for i in range(3)]


def test_a_day_breaking_an_ohlc_rule_gets_neither_bars_nor_features(tmp_path):
    lake = Lake(tmp_path)
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 1.8e9)
    outcomes = Ingestor(source, lake).ingest("BTC/USDT", DAYS)
    bad = outcomes[1]
    report, _ = lake.read_report(bad.path)
    stored = pl.read_parquet(bad.path)
    broken = stored.with_columns(
        high=pl.when(pl.int_range(pl.len()) == 7).then(0.0).otherwise("high")
    )
    lake.write_partition(bad.path, broken, report)  # gaps figures still pass

    why = usable_minutes(lake, "synthetic", "BTC-USDT", bad.day, 0.01)
    assert isinstance(why, str) and "high_below_body" in why
    assert not isinstance(usable_minutes(lake, "synthetic", "BTC-USDT", DAYS[0], 0.01), str)

    bars = BarBuilder(lake, "synthetic", 0.01).build("5m", "BTC-USDT", bad.day)
    assert bars.skipped == why
    features = FeatureBuilder(lake, "synthetic", load_feature_set(None), 0.01)
    by_day = {o.day: o for o in features.build("1m", "BTC-USDT", DAYS)}
    assert by_day[bad.day].skipped == "no usable 1m bars"
    assert by_day[DAYS[0]].skipped is None
