"""Bar assets on the real recorded candles: a failing day gets no bars, the other days of its
month are built and reconcile."""

import dagster as dg
import polars as pl
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from assets.bars import bar_assets
from candlestack.lake import Lake
from tests.dagster.conftest import ingest_months

# The recording's whole days of April: 2021-04-21..30; 04-25 lost 284 minutes: fails gaps.
APRIL = "2021-04-01|BTC-USDT"


def _build(resources, instance):
    ingest_months(resources, instance, ("2021-04",))
    return dg.materialize(
        bar_assets,
        resources=resources,
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: APRIL, ASSET_PARTITION_RANGE_END_TAG: APRIL},
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
    lake = Lake(tmp_path / "lake")
    for asset in bar_assets:
        name = asset.key.to_user_string()
        timeframe = name.removeprefix("bars_")
        meta = _metadata(result, name)[APRIL]
        assert meta["days_skipped"] == 1
        assert "| 2021-04-25 | 0 |" in meta["per_day"] and "fail gaps" in meta["per_day"]
        assert meta["bars"] == meta["expected"] - meta["expected"] // 10
        assert checks[(name, "reconciles_with_1m")].passed, name
        completeness = checks[(name, "completeness")]
        assert not completeness.passed
        assert completeness.metadata["complete_share"].value == 9 / 10  # 04-25 has no bar
        assert "2021-04-25" in completeness.metadata["days_without_bars"].value
        # The other days of the month are built and stored, in one month file.
        stored = lake.day_reports("bars", "binance", timeframe, "BTC-USDT")
        assert sorted(d.day for d in stored) == [21, 22, 23, 24, 26, 27, 28, 29, 30]
    stored = pl.read_parquet(
        tmp_path / "lake" / "bars" / "*" / "timeframe=4h" / "*" / "month=2021-04" / "*.parquet"
    )
    assert stored.height == 9 * 6 and stored["complete"].all()


def test_rebuilding_gives_identical_content_hashes(resources):
    instance = dg.DagsterInstance.ephemeral()
    first, again = _build(resources, instance), _build(resources, instance)
    assert (
        _metadata(first, "bars_1h")[APRIL]["per_day"]
        == (_metadata(again, "bars_1h")[APRIL]["per_day"])
    )


def test_rebuilding_writes_nothing(resources, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    _build(resources, instance)
    files = sorted((tmp_path / "lake" / "bars").rglob("*.parquet"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    _build(resources, instance)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
