"""Benchmark: one backfill split into runs of N symbol-months, run 1 and 2 at a time.

Run from the repository root, with a PostgreSQL server:

    python bench/concurrent_backfill.py --postgres postgresql://postgres@127.0.0.1:5432
                                        [--symbols 4] [--days 120] [--per-run 4]

For each concurrency (1, then 2): a throwaway database, a DAGSTER_HOME on it with the
queued run coordinator limited to that many runs, a real `dagster-daemon`, and one backfill
of candles_1m, the bars of every timeframe and the features over the range, submitted as the
UI submits one. CANDLESTACK_BACKFILL_RUN_PARTITIONS=--per-run makes the daemon split it into
runs of that many symbol-months, which the run queue executes. Prints the wall time from
submission until the backfill completes, the runs and the load average. Figures only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backfill import REPO, bench_env
from scale import postgres_database, symbols

MODULE = "pipelines.definitions"
SUBMIT = """
import sys, time
import dagster as dg
from dagster._core.execution.backfill import PartitionBackfill
from dagster._core.utils import make_new_backfill_id
from assets.partitions import candle_partitions, candle_range
from pipelines.definitions import defs

first, last = sys.argv[1], sys.argv[2]
keys = candle_partitions.get_partition_keys_in_range(candle_range(first, last))
graph = defs.resolve_asset_graph()
selection = [k for k in graph.get_all_asset_keys() if k.to_user_string().startswith(
    ("candles_1m", "bars_", "features_"))]
with dg.DagsterInstance.get() as instance:
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=make_new_backfill_id(), asset_graph=graph, partition_names=keys,
        asset_selection=selection, backfill_timestamp=time.time(), tags={},
        dynamic_partitions_store=instance, all_partitions=False, title="bench", description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    print(backfill.backfill_id)
"""
FINISHED = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")
POLL_SECONDS = 2.0
STOP_SECONDS = 60.0


def instance_yaml(url: str, concurrent: int) -> str:
    return (
        f"storage:\n  postgres:\n    postgres_url: {url}\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n  config:\n    dequeue_interval_seconds: 1\n"
        f"    max_concurrent_runs: {concurrent}\n"
        "telemetry:\n  enabled: false\n"
    )


def python(env: dict, code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1]


@contextmanager
def backfill_instance(server: str, concurrent: int, names: list[str], first, per_run: int):
    """(env, temp dir): a throwaway database, a DAGSTER_HOME on it running `concurrent`
    runs at a time, and the bench settings with backfills split into runs of `per_run`."""
    with postgres_database(server) as url, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text(instance_yaml(url, concurrent))
        env = bench_env(home, Path(tmp) / "lake", Path(tmp) / "catalog.duckdb", names, first)
        env["CANDLESTACK_BACKFILL_RUN_PARTITIONS"] = str(per_run)
        yield env, Path(tmp)


def start_group(command: list, env: dict, log: Path | None = None) -> subprocess.Popen:
    """A process in a process group of its own, output to `log` (or discarded)."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed by the child)
    try:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True
        )
    finally:
        if log:
            out.close()


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig` to the process's group, then wait for it and for every process of the group
    handed to this one (a subreaper's orphans), SIGKILL after STOP_SECONDS."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    deadline = time.monotonic() + STOP_SECONDS
    proc.wait()
    while True:
        try:
            pid, _ = os.waitpid(-proc.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)


def start_daemon(env: dict, log: Path | None = None) -> subprocess.Popen:
    daemon = Path(sys.executable).parent / "dagster-daemon"
    return start_group([daemon, "run", "-m", MODULE], env, log)


def run_backfill(env: dict, first: date, last: date) -> tuple[float, str, list]:
    """Submits the backfill of candles, bars and features over first..last and waits for it:
    (wall seconds from submission to completion, its status, its runs)."""
    import dagster as dg

    started = time.perf_counter()
    backfill_id = python(env, SUBMIT, first.isoformat(), last.isoformat())
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        while (status := instance.get_backfill(backfill_id).status.value) not in FINISHED:
            time.sleep(POLL_SECONDS)
        wall = time.perf_counter() - started
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    return wall, status, runs


def measure(server: str, concurrent: int, names: list[str], days: int, per_run: int) -> None:
    last = datetime.now(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=days - 1)
    with backfill_instance(server, concurrent, names, first, per_run) as (env, _):
        daemon = start_daemon(env)
        try:
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            wall, status, runs = run_backfill(env, first, last)
        finally:
            stop_group(daemon)
        failed = sum(r.status.value == "FAILURE" for r in runs)
        print(
            f"{concurrent} at a time: {wall:7.1f} s  runs {len(runs)} ({failed} failed)  "
            f"status {status}  load before {load}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, help="postgresql://user@host:port")
    parser.add_argument("--symbols", type=int, default=4)
    parser.add_argument("--days", type=int, default=120, help="closed UTC days, ending yesterday")
    parser.add_argument("--per-run", type=int, default=4, help="symbol-months per run")
    args = parser.parse_args()
    names = symbols(args.symbols)
    print(
        f"backfill of candles_1m, bars and features: {args.days} days x {args.symbols} symbols, "
        f"runs of {args.per_run} symbol-months, PostgreSQL instance storage"
    )
    for concurrent in (1, 2):
        measure(args.postgres, concurrent, names, args.days, args.per_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
