"""Assets materialized in process with a temporary lake, on the real recorded candles."""

import re
from datetime import UTC, date, datetime

import dagster as dg
import duckdb
import pytest

from assets.market_data import candle_coverage, candles_1m, candles_freshness, catalog, markets
from candlestack.config import load_settings
from resources import LakeResource, ReplaySourceResource, SyntheticSourceResource
from tests.conftest import DAMAGE, OHLCV, quarantined
from tests.dagster.conftest import ingest_months

APRIL = date(2021, 4, 1)


def _checks(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_gap_day_is_imputed_and_blocks_with_the_gap_range_in_metadata(resources):
    """2021-04-25 lost 284 minutes to exchange maintenance: stored as flagged flat candles,
    and the blocking gaps check fails naming that day and the range, since 19.7 % > the 1 %
    threshold; the month's other days (of the recording, 04-21..04-30) pass."""
    result = dg.materialize([candles_1m], partition_key="2021-04-01|BTC-USDT", resources=resources)
    # The failing day does not fail the run: it is blocked per day, downstream.
    assert result.success
    (materialization,) = result.asset_materializations_for_node("candles_1m")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["days"] == 10
    assert meta["rows"] == 10 * 1440
    assert meta["imputed"] == 284
    assert meta["quality"] == "imputed"
    assert meta["gaps_check"].startswith("failed: 2021-04-25: imputed share 19.72%")
    assert meta["days_failed"] == 1
    per_day = meta["per_day"]
    # rows, missing found, re-fetched, imputed, still missing, rejected, kept as stored,
    # revised, zero-volume minutes
    day = (
        r"\| 2021-04-25 \| 1440 \| 284 \| 0 \| 284 \| 0 \| 0 \| 0 \| 0 \| \d+ \| imputed \| failed"
    )
    assert re.search(day, per_day), per_day
    assert re.search(
        r"\| 2021-04-24 \| 1440 \| 0 \| 0 \| 0 \| 0 \| 0 \| 0 \| 0 \| \d+ \| complete", per_day
    )
    assert "04:01" in meta["gap_ranges"]
    checks = _checks(result)
    assert not checks["gaps"].passed
    assert checks["gaps"].metadata["days_failed"].value == 1
    failures = checks["gaps"].metadata["failures"].value
    assert "| 2021-04-25 | BTC-USDT |" in failures
    assert "04:01-08:44 (284)" in failures
    assert "2021-04-24" not in failures
    assert checks["ohlc_sanity"].passed


def test_clean_days_pass_and_feed_coverage_and_catalog(resources, tmp_path):
    """Complete days pass both blocking checks; the coverage grid and the catalog show them."""
    instance = dg.DagsterInstance.ephemeral()
    ingest_months(resources, instance, ("2021-04",))
    materialized = instance.get_materialized_partitions(dg.AssetKey("candles_1m"))
    assert materialized == {"2021-04-01|BTC-USDT"}

    coverage = dg.materialize([candle_coverage], resources=resources, instance=instance)
    meta = coverage.asset_materializations_for_node("candle_coverage")[0].metadata
    assert meta["partitions_complete"].value == 9
    assert meta["partitions_imputed"].value == 1
    # A day a fifth imputed (Binance's maintenance window) is graded as such, not as a day
    # of a few flat minutes.
    assert meta["partitions_imputed_10pct_or_more"].value == 1
    grid = meta["recent_days"].value
    assert "| 2021-04-25 | 🟥 imputed 19.7 % (284 min)" in grid
    assert "| 2021-04-24 | ✅ complete" in grid

    dg.materialize([catalog], resources=resources, instance=instance, selection=[catalog])
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM ohlcv").fetchone()[0] == 10 * 1440
        assert (
            con.execute("SELECT count(*) FROM ohlcv WHERE date = DATE '2021-04-25'").fetchone()[0]
            == 1440
        )
        assert con.execute("SELECT date, minutes, imputed FROM gaps").fetchall() == [
            (date(2021, 4, 25), 284, 284)
        ]
        partitions = con.execute(
            "SELECT date, imputed, content_hash FROM partitions ORDER BY date"
        ).fetchall()
        assert [p[0] for p in partitions] == [date(2021, 4, d) for d in range(21, 31)]
        assert partitions[4][1] == 284


def test_markets_snapshot_keeps_past_days(resources, tmp_path):
    """Rules of a past day are written once and never replaced by later rules."""
    first = dg.materialize([markets], partition_key="2021-03-24", resources=resources)
    meta = first.asset_materializations_for_node("markets")[0].metadata
    assert meta["markets"].value == 13
    assert meta["days_written"].value == 1
    again = dg.materialize([markets], partition_key="2021-03-24", resources=resources)
    assert again.asset_materializations_for_node("markets")[0].metadata["days_kept"].value == 1


def test_an_instance_with_day_partition_history_keeps_working(resources):
    """Materializations recorded when candles were day x symbol stay history: month
    partitions materialize beside them, and the UI's partition status still loads."""
    instance = dg.DagsterInstance.ephemeral()
    day_key = "2021-04-25|BTC-USDT"
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="candles_1m", partition=day_key, metadata={"rows": 1440})
    )
    result = dg.materialize(
        [candles_1m], partition_key="2021-04-01|BTC-USDT", resources=resources, instance=instance
    )
    assert result.success
    assert instance.get_materialized_partitions(dg.AssetKey("candles_1m")) >= {
        day_key,
        "2021-04-01|BTC-USDT",
    }
    # What the Partitions tab draws: the month x symbol subset, without the day keys.
    status = instance.get_status_by_partition(
        dg.AssetKey("candles_1m"),
        partition_keys=candles_1m.partitions_def.get_partition_keys(),
        partitions_def=candles_1m.partitions_def,
    )
    materialized = {k for k, s in status.items() if s is not None and s.value == "MATERIALIZED"}
    assert materialized == {"2021-04-01|BTC-USDT"}


def test_freshness_is_not_applicable_to_a_run_of_past_months(resources):
    """A backfill of April 2021 says nothing of how fresh today's candles are: the check
    passes saying so, where it used to fail every historical backfill with a lag of -1."""
    result = dg.materialize(
        [candles_1m, candles_freshness], partition_key="2021-04-01|BTC-USDT", resources=resources
    )
    (freshness,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "freshness"]
    assert freshness.passed
    assert freshness.metadata["applicable"].value is False
    assert "max_lag_minutes" not in freshness.metadata


def test_freshness_counts_the_closed_minutes_of_today_not_stored(tmp_path):
    """Today's synthetic candles stored up to the last closed minute: a lag of 0 (1 if a
    minute closed meanwhile); a symbol with no candle of today lags by every closed minute
    of the day."""
    started = datetime.now(UTC)
    minutes_today = started.hour * 60 + started.minute
    if minutes_today < 10:
        pytest.skip("too near midnight UTC: today has too few closed minutes to tell lags apart")
    live = {
        "source": SyntheticSourceResource(symbols=list(load_settings().symbols)),
        "lake": LakeResource(root=str(tmp_path / "live")),
    }
    result = dg.materialize(
        [candles_1m, candles_freshness],
        partition_key=f"{started.date().replace(day=1)}|BTC-USDT",
        resources=live,
    )
    (freshness,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "freshness"]
    rows = dict(
        re.findall(r"\| (\S+/\S+) \| [^|]+ \| (\d+) \|", freshness.metadata["newest_candles"].value)
    )
    lags = {symbol: int(lag) for symbol, lag in rows.items()}
    assert lags.pop("BTC/USDT") in (0, 1)
    assert lags and all(minutes_today <= lag <= minutes_today + 2 for lag in lags.values()), lags
    assert not freshness.passed
    assert freshness.metadata["max_lag_minutes"].value == max(lags.values())


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_next_materialization_rebuilds_a_damaged_candle_month(resources, damage, caplog):
    """Before, it failed reading the damaged footer (truncated, garbage), or kept the
    damaged rows because the footer was unchanged (data)."""
    instance = dg.DagsterInstance.ephemeral()
    ingest_months(resources, instance, ("2021-04",))
    lake = resources["lake"].lake
    path = lake.month_path("ohlcv", "binance", "1m", "BTC-USDT", APRIL)
    original = lake.read(path)
    DAMAGE[damage](path)
    damaged = path.read_bytes()

    result = dg.materialize(
        [candles_1m], partition_key="2021-04-01|BTC-USDT", resources=resources, instance=instance
    )

    assert result.success
    assert _checks(result)["ohlc_sanity"].passed
    assert lake.read(path).equals(original)
    (moved,) = quarantined(lake.root)
    assert moved.read_bytes() == damaged
    assert f"damaged lake file {path} moved to {moved}" in caplog.text


def test_coverage_and_catalog_do_not_count_a_month_whose_data_is_damaged(resources, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    ingest_months(resources, instance, ("2021-04",))
    lake = resources["lake"].lake
    DAMAGE["data"](lake.month_path("ohlcv", "binance", "1m", "BTC-USDT", APRIL))

    def complete_days() -> tuple[int, int]:
        coverage = dg.materialize([candle_coverage], resources=resources, instance=instance)
        meta = coverage.asset_materializations_for_node("candle_coverage")[0].metadata
        dg.materialize([catalog], resources=resources, instance=instance, selection=[catalog])
        with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
            sql = "SELECT count(*) FROM partitions WHERE missing = 0 AND imputed = 0"
            return meta["partitions_complete"].value, con.execute(sql).fetchone()[0]

    assert complete_days() == (0, 0)
    dg.materialize(
        [candles_1m], partition_key="2021-04-01|BTC-USDT", resources=resources, instance=instance
    )
    assert complete_days() == (9, 9)


def test_a_venue_of_flat_volume_0_minutes_trips_the_zero_volume_warning(tmp_path):
    """Binance.US's BTC/USDT of March 2023: real minutes, some of them flat with no volume
    (9.1 % of 2023-03-04). The warn-level check names the days over the 5 % default, the
    partition shows the share; the blocking checks pass, so nothing is held back."""
    resources = {
        "source": ReplaySourceResource(
            files={"BTC/USDT": str(OHLCV / "cl8550_binanceus_BTCUSDT_1m.csv")},
            exchange="binanceus",
        ),
        "lake": LakeResource(root=str(tmp_path / "lake")),
    }
    result = dg.materialize([candles_1m], partition_key="2023-03-01|BTC-USDT", resources=resources)
    checks = _checks(result)
    assert checks["gaps"].passed and checks["ohlc_sanity"].passed
    zero_volume = checks["zero_volume"]
    assert not zero_volume.passed
    assert zero_volume.severity == dg.AssetCheckSeverity.WARN
    failures = zero_volume.metadata["failures"].value
    assert "| 2023-03-04 | BTC-USDT |" in failures
    assert "| 2023-03-01 |" not in failures  # not one minute without a trade that day
    (materialization,) = result.asset_materializations_for_node("candles_1m")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["zero_volume"] == 658  # the recording's README counts 658 such minutes
    assert meta["zero_volume_share"] == 658 / meta["real"]
