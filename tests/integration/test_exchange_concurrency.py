"""Requests to one exchange are capped across concurrent runs by the instance's pool limit.

Runs queued together by the real CLI and launched by a real dagster-daemon each ingest a
symbol-month (three days of it, from CANDLESTACK_START_DATE) with real ccxt from the loopback
Binance, which answers slowly and records the most requests it ever served at once."""

import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import REPLAY_FILES
from tests.integration.daemon import BIN, ROOT, loopback_binance_env, running_daemon
from tests.integration.fake_binance import FakeBinance

POOL = "exchange-binance"
TIMEOUT_S = 180


# April 2021 from its 28th: three whole days of the recordings, a few requests per run.
APRIL = ["2021-04-01|BTC-USDT", "2021-04-01|ETH-USDT"]


@pytest.fixture
def binance(shared_data):
    markets = {"BTCUSDT": REPLAY_FILES["BTC/USDT"], "ETHUSDT": REPLAY_FILES["ETH/USDT"]}
    # Slow answers make every run's requests last long enough to overlap with the others'.
    with FakeBinance(markets, delay=2.0) as srv:
        yield srv


@pytest.fixture
def env(tmp_path, binance, monkeypatch):
    """The repository's run queue and pools (not its storage paths), with an exchange pool
    limit of 1, and a daemon running on it."""
    env = loopback_binance_env(tmp_path, binance, pool_limit=1)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    # The instance's storage exists before the daemon starts: a daemon and a CLI creating a
    # fresh SQLite storage at the same moment can stamp its schema twice ("more than one
    # head"), and the daemon then never dequeues a run.
    dg.DagsterInstance.get().get_runs()
    with running_daemon(env):
        yield env


def dagster(env, *args: str) -> None:
    done = subprocess.run(
        [BIN / "dagster", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def ingest_together(env, instance: dg.DagsterInstance, partitions: list[str]) -> None:
    """Queue one run per partition at once and wait until they all succeed."""
    earlier = {r.run_id for r in instance.get_runs()}
    dagster(
        env,
        "job", "backfill", "-j", "ingest_candles", "-w", "workspace.yaml",
        "--partitions", ",".join(partitions), "--noprompt",
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        runs = [r for r in instance.get_runs() if r.tags["dagster/partition"] in partitions]
        runs = [r for r in runs if r.run_id not in earlier]
        if len(runs) == len(partitions) and all(r.is_finished for r in runs):
            break
        time.sleep(2)
    else:
        pytest.fail(f"runs not finished in time: {[r.status for r in instance.get_runs()]}")
    assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * len(partitions)


def test_pool_limit_caps_requests_to_the_exchange_across_runs(env, binance):
    instance = dg.DagsterInstance.get()
    ingest_together(env, instance, APRIL)
    assert binance.max_in_flight == 1
    lake = Path(env["CANDLESTACK_LAKE"])
    assert sorted(p.parent.parent.name for p in lake.rglob("*.parquet")) == [
        "symbol=BTC-USDT",
        "symbol=ETH-USDT",
    ]
    # The cap is the instance's default pool limit, applied to the exchange's pool.
    assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1

    # The control: with the exchange's own higher limit, the same load does overlap.
    # Closed, complete days are never fetched again: the same months start from an empty lake.
    binance.reset_max_in_flight()
    shutil.rmtree(lake)
    dagster(env, "instance", "concurrency", "set", POOL, "4")
    ingest_together(env, instance, APRIL)
    assert binance.max_in_flight >= 2
    assert binance.errors == []
