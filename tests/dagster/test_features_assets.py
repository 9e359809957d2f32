"""Feature assets on the real recorded candles: warm-up honoured, partition-invariant."""

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from assets.features import feature_assets
from tests.dagster.conftest import ingest_day_by_day

FEATURES_1M = next(a for a in feature_assets if a.key.to_user_string() == "features_1m")
DAYS = [f"2021-04-{d}" for d in range(21, 28)]  # 04-25 fails the gaps check


@pytest.fixture
def lake_with_candles(resources, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    ingest_day_by_day(resources, instance, DAYS)
    return resources, instance, tmp_path / "lake"


def _features(resources, instance, first: str, last: str):
    result = dg.materialize(
        [FEATURES_1M],
        resources=resources,
        instance=instance,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: f"{first}|BTC-USDT",
            ASSET_PARTITION_RANGE_END_TAG: f"{last}|BTC-USDT",
        },
    )
    meta = {
        m.partition.split("|")[0]: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node("features_1m")
    }
    return result, meta


def test_warm_days_have_no_null_and_history_restarts_after_a_failed_day(lake_with_candles):
    resources, instance, lake = lake_with_candles
    result, meta = _features(resources, instance, DAYS[0], DAYS[-1])
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    # 2,272 bars of warm-up: two full days of history make a day warm.
    assert [meta[d]["warm"] for d in DAYS] == [False, False, True, True, False, False, False]
    assert meta["2021-04-25"]["skipped"] == "no usable 1m bars"
    assert meta["2021-04-24"]["nulls_after_warmup"] == 0
    stored = pl.read_parquet(next(lake.glob("features/*/*/*/date=2021-04-24/*.parquet")))
    assert stored.height == 1440 and stored.drop("ts").null_count().sum_horizontal()[0] == 0


def test_a_day_alone_is_bit_identical_to_the_same_day_in_a_range(lake_with_candles):
    resources, instance, _ = lake_with_candles
    _, in_range = _features(resources, instance, DAYS[0], DAYS[-1])
    _, alone = _features(resources, instance, "2021-04-24", "2021-04-24")
    assert alone["2021-04-24"]["content_hash"] == in_range["2021-04-24"]["content_hash"]
