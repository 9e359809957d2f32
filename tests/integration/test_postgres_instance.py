"""The shipped PostgreSQL instance (deploy/postgres/dagster.yaml) against a real PostgreSQL: a CLI
backfill, a schedule tick and a sensor-requested dry-run, all run by the real dagster CLI and
daemon, land their runs, events and tick state in PostgreSQL and nothing in SQLite."""

import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from dagster._core.scheduler.instigation import InstigatorState, TickData
from dagster._serdes import deserialize_value

from tests.integration.daemon import BIN, ROOT, live_dry_run_env, running_daemon
from tests.integration.services import POSTGRES, throwaway_database

DRIVER = "postgresql+psycopg2"  # as deploy/postgres/dagster.yaml asks
TIMEOUT_S = 180


@pytest.fixture
def database():
    with throwaway_database() as name:
        yield name


@pytest.fixture
def pg_env(tmp_path, database):
    env = live_dry_run_env(tmp_path)
    # The instance file as shipped, selected by DAGSTER_HOME and pointed at the database.
    shutil.copy(ROOT / "deploy" / "postgres" / "dagster.yaml", env["DAGSTER_HOME"])
    env["DAGSTER_PG_URL"] = f"{DRIVER}://postgres@127.0.0.1:5432/{database}"
    return env


def dagster(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "dagster", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def query(database: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(f"{POSTGRES}/{database}") as conn:
        return conn.execute(sql, params).fetchall()


def runs_by(database: str, tag: str, value: str) -> list[tuple[str, str]]:
    """(run_id, status) of the runs carrying the tag, read from the runs tables."""
    return query(
        database,
        "SELECT r.run_id, r.status FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
        "WHERE t.key = %s AND t.value = %s",
        tag,
        value,
    )


def materializations(database: str, run_id: str) -> int:
    (count,) = query(
        database,
        "SELECT count(*) FROM event_logs WHERE run_id = %s "
        "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
        run_id,
    )[0]
    return count


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(16) == b"SQLite format 3\0"


def test_backfill_schedule_and_sensor_runs_live_in_postgres(pg_env, database):
    env = pg_env
    for kind, name in (("schedule", "keep_open_day_current"), ("sensor", "dry_run_bars")):
        started = dagster(env, kind, "start", name, "-w", "workspace.yaml")
        assert started.returncode == 0, started.stderr[-2000:]
    with running_daemon(env):
        # The backfill runs in the CLI's own process while the daemon waits for its tick:
        # the month partition holding yesterday.
        yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
        partition = f"{yesterday:%Y-%m}-01|BTC-USDT"
        backfill = dagster(
            env,
            "asset", "materialize", "-m", "pipelines.definitions", "--select", "candles_1m",
            "--partition", partition,
        )  # fmt: skip
        assert backfill.returncode == 0, backfill.stderr[-3000:]

        deadline = time.monotonic() + TIMEOUT_S
        scheduled = dry_run = []
        while time.monotonic() < deadline:
            scheduled = runs_by(database, "dagster/schedule_name", "keep_open_day_current")
            dry_run = runs_by(database, "dagster/sensor_name", "dry_run_bars")
            statuses = {status for _, status in scheduled + dry_run}
            assert "FAILURE" not in statuses, (scheduled, dry_run)
            if any(s == "SUCCESS" for _, s in scheduled) and any(
                s == "SUCCESS" for _, s in dry_run
            ):
                break
            time.sleep(3)
        else:
            pytest.fail(f"no successful scheduled and dry-run runs in time: {scheduled}, {dry_run}")

    # Runs and their event logs: the backfill's, the schedule's and the sensor's.
    (backfill_run,) = query(
        database,
        "SELECT run_id, status, partition FROM runs WHERE run_id NOT IN (SELECT run_id "
        "FROM run_tags WHERE key IN ('dagster/schedule_name', 'dagster/sensor_name'))",
    )
    assert backfill_run[1:] == ("SUCCESS", partition)
    assert materializations(database, backfill_run[0]) == 1
    scheduled_run = next(run_id for run_id, s in scheduled if s == "SUCCESS")
    assert materializations(database, scheduled_run) > 1  # candles, then bars and features
    dry_run_run = next(run_id for run_id, s in dry_run if s == "SUCCESS")
    assert materializations(database, dry_run_run) == 1

    # Tick history and the instigators' state (the sensor's cursor) are in PostgreSQL too.
    ticks = [
        deserialize_value(body, TickData)
        for (body,) in query(database, "SELECT tick_body FROM job_ticks")
    ]
    succeeded = {t.instigator_name for t in ticks if t.status.value == "SUCCESS"}
    assert {"keep_open_day_current", "dry_run_bars"} <= succeeded
    bodies = query(database, "SELECT job_body FROM jobs")
    states = {s.name: s for s in (deserialize_value(b, InstigatorState) for (b,) in bodies)}
    assert states["keep_open_day_current"].status.value == "RUNNING"
    assert '"btc_scalp"' in states["dry_run_bars"].instigator_data.cursor

    # Nothing fell back to SQLite: no database file anywhere under DAGSTER_HOME.
    home = Path(env["DAGSTER_HOME"])
    assert [p for p in home.rglob("*") if p.is_file() and _is_sqlite(p)] == []
    assert not (home / "history").exists() and not (home / "schedules").exists()
