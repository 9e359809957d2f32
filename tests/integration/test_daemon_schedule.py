"""A real dagster-daemon runs the minutely schedule: every tick appends the closed minutes."""

import itertools
import subprocess
import time

import dagster as dg
import pytest

from tests.conftest import isolated_env
from tests.integration.daemon import BIN, ROOT, running_daemon

TIMEOUT_S = 260


@pytest.fixture
def daemon_home(tmp_path, monkeypatch):
    env = isolated_env(tmp_path)
    started = subprocess.run(
        [BIN / "dagster", "schedule", "start", "keep_open_day_current", "-w", "workspace.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with running_daemon(env):
        yield dg.DagsterInstance.get()


def test_open_day_schedule_appends_each_minute(daemon_home):
    instance = daemon_home
    deadline = time.monotonic() + TIMEOUT_S
    pair = None
    while time.monotonic() < deadline and pair is None:
        time.sleep(5)
        runs = instance.get_runs()
        assert not [r.run_id for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
        done = sorted(
            (r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS),
            key=lambda r: r.tags["dagster/run_key"],
        )
        # Two ticks of the same UTC day (a pair across midnight targets different days).
        same_day = (
            (a, b)
            for a, b in itertools.pairwise(done)
            if a.tags["dagster/run_key"][:19] == b.tags["dagster/run_key"][:19]
        )
        pair = next(same_day, None)
    assert pair is not None, "the daemon did not complete two scheduled runs in time"
    first, second = pair
    assert first.tags["dagster/run_key"] != second.tags["dagster/run_key"]
    rows = {}
    for record in instance.fetch_materializations(dg.AssetKey("candles_1m"), limit=50).records:
        rows.setdefault(record.run_id, {})[record.partition_key] = record.asset_materialization
    # One run covers every symbol of today; the later run holds the newly closed minutes too.
    assert len(rows[first.run_id]) == len(rows[second.run_id]) == 3
    for key, earlier in rows[first.run_id].items():
        later = rows[second.run_id][key]
        assert later.metadata["rows"].value > earlier.metadata["rows"].value
        assert later.metadata["last_ts"].value > earlier.metadata["last_ts"].value
