"""A real dagster-daemon for the integration tests, and the live dry-run setup they share."""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from candlestack.lake import Lake, write_parquet_atomic
from candlestack.sources.synthetic import SyntheticSource
from tests.conftest import isolated_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# One 1m strategy that trades often: a few live minutes give the sensor bars to request.
DRY_RUN_STRATEGIES = """
strategies:
  - name: btc_scalp
    strategy: ma_cross
    symbol: BTC/USDT
    timeframe: 1m
    params: {fast: 2, slow: 5, average: ema}
    dry_run: {enabled: true}
"""


def loopback_binance_env(tmp_path: Path, binance, pool_limit: int | None = None) -> dict:
    """Environment for runs that ingest BTC and ETH from 2021-04-28 with real ccxt from the
    loopback Binance, on the repository's run queue and exchange pools (not its storage
    paths); `pool_limit` replaces the pools' default limit."""
    env = isolated_env(
        tmp_path,
        source="ccxt",
        symbols="BTC/USDT,ETH/USDT",
        start_date="2021-04-28",
        ccxt_options=json.dumps(binance.ccxt_config()),
    )
    shipped = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config = {k: shipped[k] for k in ("run_coordinator", "concurrency", "telemetry")}
    if pool_limit is not None:
        config["concurrency"]["pools"]["default_limit"] = pool_limit
    Path(env["DAGSTER_HOME"], "dagster.yaml").write_text(yaml.safe_dump(config))
    return env


def dagster(env: dict, *args: str) -> None:
    """A `dagster` CLI command on the repository's workspace, which must succeed."""
    done = subprocess.run(
        [BIN / "dagster", *args, "-w", "workspace.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def start_daemon(env: dict) -> subprocess.Popen:
    """The daemon in its own process group, so a test can stop it and every run it started."""
    return subprocess.Popen(
        [BIN / "dagster-daemon", "run", "-w", "workspace.yaml"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


@contextmanager
def running_daemon(env: dict) -> Iterator[subprocess.Popen]:
    daemon = start_daemon(env)
    try:
        yield daemon
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)


def live_dry_run_env(tmp_path: Path) -> dict:
    """An isolated environment for a live dry-run of DRY_RUN_STRATEGIES on the synthetic
    source, with today's market rules stored as the daily markets schedule leaves them."""
    now = datetime.now(UTC)
    if now - now.replace(hour=0, minute=0, second=0, microsecond=0) < timedelta(minutes=10):
        pytest.skip("too close to midnight UTC: today has too few minutes to warm up on")
    strategies = tmp_path / "strategies.yaml"
    strategies.write_text(DRY_RUN_STRATEGIES)
    env = isolated_env(tmp_path, symbols="BTC/USDT", strategies=str(strategies))
    rules = SyntheticSource(symbols=["BTC/USDT"]).load_markets()
    lake = Lake(env["CANDLESTACK_LAKE"])
    write_parquet_atomic(lake.markets_path("synthetic", now.date()), rules.to_arrow(), {})
    return env
