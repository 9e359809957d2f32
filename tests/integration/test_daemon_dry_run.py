"""End to end with a real dagster-daemon: minutes close, the schedule lands candles, the sensor
requests a dry-run per closed bar, the runs write the ledger; then the daemon and its runs
are killed mid-way and restarted, and every bar is still executed exactly once."""

import os
import signal
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from candlestack.ledger import Ledger
from tests.integration.daemon import dagster, live_dry_run_env, start_daemon

PHASE_TIMEOUT_S = 240


def dry_runs(instance) -> list[dg.DagsterRun]:
    return [r for r in instance.get_runs() if r.job_name == "dry_run"]


def wait_for(what: str, condition, every_s: float = 2.0) -> None:
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every_s)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def live_env(tmp_path, monkeypatch):
    env = live_dry_run_env(tmp_path)
    dagster(env, "schedule", "start", "keep_open_day_current")
    dagster(env, "sensor", "start", "dry_run_bars")
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    return env


def test_sensor_runs_each_closed_bar_once_across_a_killed_daemon(live_env):
    env = live_env
    instance = dg.DagsterInstance.get()
    ledger = Ledger(env["CANDLESTACK_LEDGER_URL"])
    daemon = start_daemon(env)
    try:
        wait_for(
            "two dry-run runs to succeed",
            lambda: sum(r.status == dg.DagsterRunStatus.SUCCESS for r in dry_runs(instance)) >= 2,
        )
        # Kill the daemon and whatever it runs right now, a dry-run mid-way if one is going.
        # A dry-run is in flight for a second or two a minute: look often, not to miss it.
        wait_for(
            "a dry-run in flight",
            lambda: any(r.status == dg.DagsterRunStatus.STARTED for r in dry_runs(instance)),
            every_s=0.2,
        )
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=30)
        killed_at = datetime.now(UTC)
        time.sleep(65)  # a bar closes while nothing runs
        daemon = start_daemon(env)
        wait_for(
            "dry-runs after the restart to decide the bars missed",
            lambda: (
                (decided := ledger.decisions("btc_scalp")).height > 0
                and decided["bar_ts"].max() >= killed_at.replace(second=0, microsecond=0)
            ),
        )
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)

    decisions = ledger.decisions("btc_scalp")
    bars = decisions.get_column("bar_ts")
    # Every bar from the first to the last exactly once, in order: none lost, none twice.
    assert bars.is_unique().all()
    assert bars.diff().drop_nulls().dt.total_seconds().unique().to_list() == [60]
    assert ledger.verify_audit_chain() == []
    run_keys = [r.tags.get("dagster/run_key") for r in dry_runs(instance)]
    assert len(run_keys) == len(set(run_keys))
    # Decisions were written by the sensor's runs, with the run id of the run that made them.
    run_ids = {r.run_id for r in dry_runs(instance)}
    assert set(decisions.get_column("run_id").to_list()) <= run_ids
    # Candles landed and the fills came from the live path within seconds of each close.
    orders = ledger.orders("btc_scalp")
    live = decisions.filter(pl.col("decided_at") - pl.col("bar_ts") < timedelta(minutes=2))
    latency = (live["decided_at"] - live["bar_ts"]).dt.total_seconds() - 60
    print(
        f"\n{decisions.height} bars decided, {orders.height} orders; close to decision "
        f"p50 {latency.quantile(0.5):.1f} s, p95 {latency.quantile(0.95):.1f} s"
    )
    assert latency.quantile(0.5) < 30
