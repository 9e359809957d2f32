"""Feature assets on the real recorded candles: warm-up honoured, month-partition-invariant."""

import shutil
from datetime import date

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from assets.features import feature_assets
from candlestack.lake import Lake
from tests.dagster.conftest import ingest_months

FEATURES_1M = next(a for a in feature_assets if a.key.to_user_string() == "features_1m")
# The recording's whole days of April, 2021-04-21..30 (04-25 fails the gaps check), and
# of May, 05-01..19.
APRIL, MAY = "2021-04-01|BTC-USDT", "2021-05-01|BTC-USDT"


@pytest.fixture
def lake_with_candles(resources, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    ingest_months(resources, instance, ("2021-04", "2021-05"))
    return resources, instance, Lake(tmp_path / "lake")


def _features(resources, instance, first: str, last: str):
    result = dg.materialize(
        [FEATURES_1M],
        resources=resources,
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
    )
    meta = {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("features_1m")
    }
    return result, meta


def _stored(lake: Lake) -> dict:
    return lake.day_reports("features", "binance", "1m", "BTC-USDT")


def test_warm_days_have_no_null_and_history_restarts_after_a_failed_day(lake_with_candles):
    resources, instance, lake = lake_with_candles
    result, meta = _features(resources, instance, APRIL, APRIL)
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    # 2,272 bars of warm-up: two full days of history make a day warm.
    stored = _stored(lake)
    warm = {d.day: r["warm"] for d, r in stored.items()}
    assert warm == {21: False, 22: False, 23: True, 24: True, 26: False, 27: False, 28: True,
                    29: True, 30: True}  # fmt: skip
    assert meta[APRIL]["days_skipped"] == 1
    assert "| 2021-04-25 | BTC-USDT | 0 | False | 0 | no usable 1m bars |" in meta[APRIL]["per_day"]
    assert meta[APRIL]["nulls_after_warmup"] == 0
    april = lake.read_month("features", "binance", "1m", "BTC-USDT", date(2021, 4, 1))
    day = april.day(date(2021, 4, 24))
    assert day.height == 1440 and day.drop("ts").null_count().sum_horizontal()[0] == 0


def test_a_month_alone_is_bit_identical_to_the_same_month_in_a_range(lake_with_candles, tmp_path):
    resources, instance, lake = lake_with_candles
    _features(resources, instance, APRIL, MAY)
    in_range = _stored(lake)
    shutil.rmtree(tmp_path / "lake" / "features")
    _features(resources, instance, MAY, MAY)
    may_alone = _stored(lake)
    _features(resources, instance, APRIL, APRIL)
    assert _stored(lake) == in_range
    may = {d: r for d, r in in_range.items() if d.month == 5}
    assert len(may) == 19 and may_alone == may
