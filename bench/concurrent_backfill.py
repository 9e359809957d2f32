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
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
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
STATUS = """
import sys
import dagster as dg
with dg.DagsterInstance.get() as instance:
    backfill = instance.get_backfill(sys.argv[1])
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": sys.argv[1]}))
    failed = sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs)
    print(backfill.status.value, len(runs), failed)
"""


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


def measure(server: str, concurrent: int, names: list[str], days: int, per_run: int) -> None:
    last = datetime.now(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=days - 1)
    with postgres_database(server) as url, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "dagster.yaml").write_text(instance_yaml(url, concurrent))
        env = bench_env(home, Path(tmp) / "lake", Path(tmp) / "catalog.duckdb", names, first)
        env["CANDLESTACK_BACKFILL_RUN_PARTITIONS"] = str(per_run)
        daemon = subprocess.Popen(
            [Path(sys.executable).parent / "dagster-daemon", "run", "-m", MODULE],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            started = time.perf_counter()
            backfill_id = python(env, SUBMIT, first.isoformat(), last.isoformat())
            while True:
                status, runs, failed = python(env, STATUS, backfill_id).split()
                if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED"):
                    break
                time.sleep(2)
            wall = time.perf_counter() - started
        finally:
            os.killpg(daemon.pid, 15)
            daemon.wait()
        print(
            f"{concurrent} at a time: {wall:7.1f} s  runs {runs} ({failed} failed)  "
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
