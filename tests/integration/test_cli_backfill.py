"""The real `dagster` CLI: a multi-day single-run backfill into a temporary DAGSTER_HOME."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import REPLAY_FILES, isolated_env

ROOT = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


@pytest.fixture
def cli_env(tmp_path, shared_data):
    return isolated_env(
        tmp_path,
        source="replay",
        symbols="BTC/USDT,ETH/USDT",
        start_date="2021-04-01",
        replay_files=json.dumps({s: str(p) for s, p in REPLAY_FILES.items()}),
    )


def _dagster(env, *args):
    return subprocess.run(
        [DAGSTER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _instance(env):
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    return dg.DagsterInstance.get()


def _check_history(instance, name):
    key = dg.AssetCheckKey(dg.AssetKey("candles_1m"), name)
    return instance.event_log_storage.get_asset_check_execution_history(key, limit=10)


def test_definitions_validate(cli_env):
    result = _dagster(cli_env, "definitions", "validate", "-m", "pipelines.definitions")
    assert result.returncode == 0, result.stderr[-3000:]


def test_range_backfill_is_one_run_and_every_partition_shows(cli_env, monkeypatch):
    """4 days x 2 symbols in one run: each partition materialized with its own figures,
    and the checks evaluated (recorded once for the range, as Dagster does)."""
    monkeypatch.setenv("DAGSTER_HOME", cli_env["DAGSTER_HOME"])
    result = _dagster(
        cli_env,
        "asset", "materialize", "-m", "pipelines.definitions", "--select", "candles_1m",
        "--partition-range", "2021-04-21|BTC-USDT...2021-04-24|ETH-USDT",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    instance = _instance(cli_env)
    assert len(instance.get_runs()) == 1
    materialized = instance.get_materialized_partitions(dg.AssetKey("candles_1m"))
    expected = {f"2021-04-2{d}|{s}" for d in (1, 2, 3, 4) for s in ("BTC-USDT", "ETH-USDT")}
    assert materialized == expected
    records = instance.fetch_materializations(dg.AssetKey("candles_1m"), limit=20).records
    per_partition = {r.partition_key: r.asset_materialization.metadata for r in records}
    assert set(per_partition) == expected
    assert all(
        m["rows"].value == 1440 and m["quality"].value == "complete" for m in per_partition.values()
    )
    for name in ("gaps", "ohlc_sanity"):
        (evaluation,) = _check_history(instance, name)
        assert evaluation.status.value == "SUCCEEDED", name
    # Replayed 2021 candles are not fresh today: evaluated, and honestly failed.
    (freshness,) = _check_history(instance, "freshness")
    assert freshness.status.value == "FAILED"


def test_blocking_check_fails_the_backfill_but_keeps_what_it_found(cli_env, monkeypatch):
    """A day with the 284-minute maintenance gap fails the blocking gaps check: the CLI exits
    non-zero, and the UI still shows that day as imputed and its neighbour as complete."""
    monkeypatch.setenv("DAGSTER_HOME", cli_env["DAGSTER_HOME"])
    result = _dagster(
        cli_env,
        "asset", "materialize", "-m", "pipelines.definitions", "--select", "candles_1m",
        "--partition-range", "2021-04-24|BTC-USDT...2021-04-25|BTC-USDT",
    )  # fmt: skip
    assert result.returncode != 0
    assert "gaps" in result.stdout + result.stderr
    instance = _instance(cli_env)
    records = instance.fetch_materializations(dg.AssetKey("candles_1m"), limit=5).records
    quality = {r.partition_key: r.asset_materialization.metadata["quality"].value for r in records}
    assert quality == {"2021-04-24|BTC-USDT": "complete", "2021-04-25|BTC-USDT": "imputed"}
    (gaps,) = _check_history(instance, "gaps")
    assert gaps.status.value == "FAILED"
