"""The real `dagster` CLI: multi-month single-run backfills into a temporary DAGSTER_HOME.

Candles, bars and features are partitioned by UTC month x symbol (keys like
`2021-04-01|BTC-USDT`), one Parquet file per symbol-month, each month's materialization
carrying a per-day table. The replayed Binance recordings hold the whole UTC days
2021-04-21..2021-05-19, with the 284-minute maintenance gap on 2021-04-25.
"""

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from candlestack.lake import Lake
from candlestack.resample import BAR_TIMEFRAMES, bars_per_day
from tests.conftest import REPLAY_FILES, isolated_env

ROOT = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
SYMBOLS = ("BTC-USDT", "ETH-USDT")
BAD_DAY = date(2021, 4, 25)  # Binance maintenance: 04:01..08:44 never traded (284 minutes)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _env(tmp_path, start_date):
    return isolated_env(
        tmp_path,
        source="replay",
        symbols=",".join(s.replace("-", "/") for s in SYMBOLS),
        start_date=start_date,
        replay_files=json.dumps({s: str(p) for s, p in REPLAY_FILES.items()}),
    )


@pytest.fixture
def cli_env(tmp_path, shared_data, monkeypatch):
    env = _env(tmp_path, "2021-04-01")
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    return env


def _dagster(env, *args):
    return subprocess.run(
        [DAGSTER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _instance(env):
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    return dg.DagsterInstance.get()


def _check_history(instance, name, asset="candles_1m"):
    key = dg.AssetCheckKey(dg.AssetKey(asset), name)
    return instance.event_log_storage.get_asset_check_execution_history(key, limit=10)


def _metadata(instance, asset):
    """Partition key -> the metadata of its newest materialization, as plain values."""
    records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    latest = {}
    for record in sorted(records, key=lambda r: r.storage_id):
        metadata = record.asset_materialization.metadata
        latest[record.partition_key] = {k: v.value for k, v in metadata.items()}
    return latest


def _table(markdown: str) -> list[dict[str, str]]:
    """The rows of a markdown table written by assets.markdown.md_table."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]


def _evaluation_metadata(record):
    """The metadata of a check execution record's evaluation, as plain values."""
    evaluation = record.event.dagster_event.event_specific_data
    return {k: v.value for k, v in evaluation.metadata.items()}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.parquet"))


def test_definitions_validate(cli_env):
    result = _dagster(cli_env, "definitions", "validate", "-m", "pipelines.definitions")
    assert result.returncode == 0, result.stderr[-3000:]


def test_multi_month_backfill_is_one_run_and_every_month_shows(tmp_path, shared_data, monkeypatch):
    """April and May 2021 x 2 symbols in one run: each symbol-month is one partition with
    its own figures and per-day table, and one file in the lake. The start date leaves
    April's maintenance day out, so every day is complete."""
    env = _env(tmp_path, "2021-04-26")
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    result = _dagster(
        env,
        "asset", "materialize", "-m", "pipelines.definitions", "--select", "candles_1m",
        "--partition-range", "2021-04-01|BTC-USDT...2021-05-01|ETH-USDT",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    instance = _instance(env)
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    # CANDLESTACK_START_DATE 2021-04-26 .. the recording's last whole day, 2021-05-19.
    days = {
        "2021-04-01": _days(date(2021, 4, 26), date(2021, 4, 30)),
        "2021-05-01": _days(date(2021, 5, 1), date(2021, 5, 19)),
    }
    expected = {f"{month}|{s}" for month in days for s in SYMBOLS}
    materialized = instance.get_materialized_partitions(dg.AssetKey("candles_1m"))
    assert materialized == expected
    per_partition = _metadata(instance, "candles_1m")
    assert set(per_partition) == expected
    lake = Lake(env["CANDLESTACK_LAKE"])
    for key, meta in per_partition.items():
        month, symbol = key.split("|")
        want = days[month]
        assert meta["days"] == len(want), key
        assert meta["rows"] == 1440 * len(want), key
        assert (meta["missing"], meta["imputed"], meta["days_failed"]) == (0, 0, 0), key
        assert (meta["quality"], meta["gaps_check"]) == ("complete", "passed"), key
        assert meta["first_ts"].startswith(f"{want[0]} 00:00"), key
        assert meta["last_ts"].startswith(f"{want[-1]} 23:59"), key
        rows = _table(meta["per_day"])
        assert [r["date"] for r in rows] == [str(d) for d in want], key
        assert all(
            (r["rows"], r["quality"], r["gaps check"]) == ("1440", "complete", "passed")
            for r in rows
        ), key
        path = lake.month_path("ohlcv", "binance", "1m", symbol, date.fromisoformat(month))
        assert meta["path"] == str(path)
        assert list(lake.day_reports("ohlcv", "binance", "1m", symbol)) == (
            days["2021-04-01"] + days["2021-05-01"]
        )

    # One file per symbol-month, and nothing else.
    assert _files(lake.root) == [
        f"ohlcv/exchange=binance/timeframe=1m/symbol={s}/month={m}/data.parquet"
        for s in SYMBOLS
        for m in ("2021-04", "2021-05")
    ]
    # The checks are evaluated once for the run's range, over each of its days.
    for name in ("gaps", "ohlc_sanity"):
        (evaluation,) = _check_history(instance, name)
        assert evaluation.status.value == "SUCCEEDED", name
        figures = _evaluation_metadata(evaluation)
        assert figures["days_checked"] == 2 * (5 + 19), name
        assert figures["days_failed"] == 0, name
    # A backfill of 2021 says nothing of today's candles: freshness is not applicable to it.
    (freshness,) = _check_history(instance, "freshness")
    assert freshness.status.value == "SUCCEEDED"
    assert _evaluation_metadata(freshness)["applicable"] is False


def test_one_bad_day_fails_only_that_day_and_the_others_get_bars(cli_env):
    """April 2021 of BTC-USDT through ingest_and_build, in one run: the gaps check fails
    naming 2021-04-25 (imputed far over the allowed share) and no other day, the month
    shows as imputed with that day failed in its per-day table, and the bars and features
    of the month's other days are built all the same; the failed day has none."""
    partition = "2021-04-01|BTC-USDT"
    tags = {ASSET_PARTITION_RANGE_START_TAG: partition, ASSET_PARTITION_RANGE_END_TAG: partition}
    result = _dagster(
        cli_env,
        "job", "execute", "-m", "pipelines.definitions", "-j", "ingest_and_build",
        "--tags", json.dumps(tags),
    )  # fmt: skip
    # The gaps check does not block the run: the failure is per day, downstream.
    assert result.returncode == 0, result.stderr[-3000:]

    instance = _instance(cli_env)
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    april = _days(date(2021, 4, 21), date(2021, 4, 30))  # the recording's days of April
    good = [d for d in april if d != BAD_DAY]

    (candles,) = _metadata(instance, "candles_1m").values()
    assert candles["days"] == len(april)
    assert candles["quality"] == "imputed"
    assert (candles["imputed"], candles["missing"], candles["days_failed"]) == (284, 0, 1)
    assert candles["gaps_check"].startswith(f"failed: {BAD_DAY}: imputed share ")
    assert all(str(d) not in candles["gaps_check"] for d in good)
    rows = {r["date"]: r for r in _table(candles["per_day"])}
    assert list(rows) == [str(d) for d in april]
    assert rows[str(BAD_DAY)]["quality"] == "imputed"
    assert rows[str(BAD_DAY)]["imputed"] == "284"
    assert rows[str(BAD_DAY)]["gaps check"].startswith("failed: imputed share")
    assert all(
        (rows[str(d)]["quality"], rows[str(d)]["gaps check"]) == ("complete", "passed")
        for d in good
    )
    assert "2021-04-25 04:01" in candles["gap_ranges"]

    (gaps,) = _check_history(instance, "gaps")
    assert gaps.status.value == "FAILED"
    figures = _evaluation_metadata(gaps)
    assert (figures["days_checked"], figures["days_failed"]) == (len(april), 1)
    failures = _table(figures["failures"])
    assert [(f["date"], f["symbol"]) for f in failures] == [(str(BAD_DAY), "BTC-USDT")]
    (sanity,) = _check_history(instance, "ohlc_sanity")
    assert sanity.status.value == "SUCCEEDED"

    lake = Lake(cli_env["CANDLESTACK_LAKE"])
    for timeframe in BAR_TIMEFRAMES:
        (bars,) = _metadata(instance, f"bars_{timeframe}").values()
        assert bars["days_skipped"] == 1, timeframe
        by_day = {r["date"]: r for r in _table(bars["per_day"])}
        assert by_day[str(BAD_DAY)]["bars"] == "0", timeframe
        assert "fail gaps" in by_day[str(BAD_DAY)]["skipped"], timeframe
        assert all(
            by_day[str(d)]["bars"] == by_day[str(d)]["complete"] == str(bars_per_day(timeframe))
            for d in good
        ), timeframe
        stored = lake.day_reports("bars", "binance", timeframe, "BTC-USDT")
        assert list(stored) == good, timeframe
        (reconciled,) = _check_history(instance, "reconciles_with_1m", f"bars_{timeframe}")
        assert reconciled.status.value == "SUCCEEDED", timeframe
    for timeframe in ("1m", "15m", "1h"):
        stored = lake.day_reports("features", "binance", timeframe, "BTC-USDT")
        assert BAD_DAY not in stored and stored, timeframe
    assert lake.read_days("bars", "binance", "1h", "BTC-USDT", BAD_DAY, BAD_DAY).is_empty()
    # Still one file per dataset, timeframe and symbol-month.
    assert all("month=2021-04/data.parquet" in f for f in _files(lake.root))
