"""Bar assets on the real recorded candles: failing days get no bars, the rest reconcile."""

import dagster as dg
import polars as pl
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from assets.bars import bar_assets
from tests.dagster.conftest import ingest_day_by_day

DAYS = ("2021-04-24", "2021-04-25", "2021-04-26")  # 04-25 lost 284 minutes: fails gaps


def _build(resources, instance):
    ingest_day_by_day(resources, instance, DAYS)
    return dg.materialize(
        bar_assets,
        resources=resources,
        instance=instance,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: f"{DAYS[0]}|BTC-USDT",
            ASSET_PARTITION_RANGE_END_TAG: f"{DAYS[-1]}|BTC-USDT",
        },
    )


def _metadata(result, asset: str) -> dict[str, dict]:
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node(asset)
    }


def test_failing_day_gets_no_bars_and_the_others_reconcile(resources, tmp_path):
    result = _build(resources, dg.DagsterInstance.ephemeral())
    checks = {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }
    for asset in bar_assets:
        name = asset.key.to_user_string()
        meta = _metadata(result, name)
        assert meta["2021-04-25|BTC-USDT"]["bars"] == 0
        assert "fail gaps" in meta["2021-04-25|BTC-USDT"]["skipped"]
        assert meta["2021-04-24|BTC-USDT"]["bars"] == meta["2021-04-24|BTC-USDT"]["expected"]
        assert checks[(name, "reconciles_with_1m")].passed, name
        completeness = checks[(name, "completeness")]
        assert not completeness.passed
        assert completeness.metadata["complete_share"].value == 2 / 3  # 04-25 has no bar
        assert "2021-04-25" in completeness.metadata["days_without_bars"].value
    stored = pl.read_parquet(
        tmp_path / "lake" / "bars" / "*" / "timeframe=4h" / "*" / "*" / "*.parquet"
    )
    assert stored.height == 2 * 6 and stored["complete"].all()


def test_rebuilding_gives_identical_content_hashes(resources):
    instance = dg.DagsterInstance.ephemeral()
    first, again = _build(resources, instance), _build(resources, instance)
    for asset in bar_assets:
        name = asset.key.to_user_string()
        before, after = _metadata(first, name), _metadata(again, name)
        assert {k: m["content_hash"] for k, m in before.items()} == {
            k: m["content_hash"] for k, m in after.items()
        }
