"""Real CLI backfills killed while they hold or wait for the exchange pool's slots.

Each backfill ingests April 2021 (from its 28th) x 2 symbols in one run, with real ccxt from
the loopback Binance; while it should stay in the pool, the exchange holds every answer. The
instance has the repository's pools: four slots per exchange."""

import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.stuck_runs import COMMAND
from tests.conftest import REPLAY_FILES
from tests.integration.daemon import BIN, ROOT, loopback_binance_env
from tests.integration.fake_binance import FakeBinance

POOL = "exchange-binance"
BACKFILL = [
    str(BIN / "dagster"), "asset", "materialize", "-m", "pipelines.definitions",
    "--select", "candles_1m", "--partition-range", "2021-04-01|BTC-USDT...2021-04-01|ETH-USDT",
]  # fmt: skip
HELD_S = 600.0  # the exchange's delay while a backfill should not get past its first request


@pytest.fixture
def binance(shared_data):
    markets = {"BTCUSDT": REPLAY_FILES["BTC/USDT"], "ETHUSDT": REPLAY_FILES["ETH/USDT"]}
    with FakeBinance(markets, delay=HELD_S) as srv:
        yield srv


@pytest.fixture
def env(tmp_path, binance, monkeypatch):
    env = loopback_binance_env(tmp_path, binance)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    return env


def _pool(instance: dg.DagsterInstance):
    return instance.event_log_storage.get_concurrency_info(POOL)


def _wait_for(what: str, condition, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.2)


def _start_backfill(env) -> subprocess.Popen:
    return subprocess.Popen(
        BACKFILL, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_four_killed_backfills_do_not_block_the_fifth(env, binance):
    instance = dg.DagsterInstance.get()
    for killed in range(1, 5):
        backfill = _start_backfill(env)
        _wait_for(
            f"backfill {killed} holds a slot",
            lambda n=killed: len(_pool(instance).claimed_slots) == n,
        )
        backfill.kill()
        backfill.wait()
    dead = {r.run_id for r in instance.get_runs()}
    assert [r.status for r in instance.get_runs()] == [dg.DagsterRunStatus.STARTED] * 4
    assert _pool(instance).active_run_ids == dead
    assert _pool(instance).limit == 4

    binance.delay = 0.0
    started = time.monotonic()
    fifth = subprocess.run(BACKFILL, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - started
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert took < 120, f"the fifth backfill took {took:.0f} s"

    runs = {r.run_id: r for r in instance.get_runs()}
    (fifth_run,) = set(runs) - dead
    assert runs[fifth_run].status == dg.DagsterRunStatus.SUCCESS
    assert {runs[r].status for r in dead} == {dg.DagsterRunStatus.FAILURE}
    for run_id in dead:
        (failure,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "its process" in failure.message and "is gone" in failure.message
    # The waiting step said which runs it freed, in its run's log.
    warnings = [e.message for e in instance.all_logs(fifth_run) if e.level == 30]
    assert {r for r in dead if any(r in w and "is gone" in w for w in warnings)} == dead
    pool = _pool(instance)
    assert pool.claimed_slots == [] and pool.pending_steps == []
    assert len(list(Path(env["CANDLESTACK_LAKE"]).rglob("*.parquet"))) == 2


def test_sigterm_frees_the_slot_of_a_backfill_holding_or_waiting_for_it(env, binance):
    instance = dg.DagsterInstance.get()
    instance.event_log_storage.set_concurrency_slots(POOL, 1)
    holding = _start_backfill(env)
    _wait_for("the first backfill holds the slot", lambda: len(_pool(instance).claimed_slots) == 1)
    (holder,) = _pool(instance).active_run_ids
    waiting = _start_backfill(env)

    def waiters() -> set[str]:
        return {step.run_id for step in _pool(instance).pending_steps} - {holder}

    _wait_for("the second backfill waits for it", lambda: len(waiters()) == 1)
    (waiter,) = waiters()
    # The waiting run's log says who holds the pool, and how to free it.
    _wait_for(
        "the waiting run names the holder",
        lambda: any(
            f"waits for pool {POOL}" in e.message and holder in e.message and COMMAND in e.message
            for e in instance.all_logs(waiter)
        ),
    )

    for backfill, run_id in ((waiting, waiter), (holding, holder)):
        backfill.send_signal(signal.SIGTERM)
        backfill.communicate(timeout=30)
        assert backfill.returncode != 0
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
        pool = _pool(instance)
        assert run_id not in pool.active_run_ids | {step.run_id for step in pool.pending_steps}
    pool = _pool(instance)
    assert pool.claimed_slots == [] and pool.pending_steps == []
