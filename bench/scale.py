"""Benchmark: the whole pipeline at scale, through the dagster CLI as a user runs it.

Run from the repository root:

    python bench/scale.py [--symbols 20] [--days 365] [--grid] [--stages ingest,...]
                          [--postgres postgresql://user@host:5432] [--keep]
    python bench/scale.py --executor celery [--workers 1 2] [--per-run 20] [--concurrent 2]

For each size, a temporary DAGSTER_HOME (sqlite storage, telemetry off), lake, catalog,
ledger and reports folder are created and the README's commands run one after the other,
each a single run over the whole month x symbol range (synthetic source):

    ingest    dagster asset materialize --select candles_1m --partition-range ...
    markets   dagster asset materialize --select markets --partition-range ...
    bars      dagster job execute -j build_bars      (range tags; seven timeframes)
    features  dagster job execute -j build_features  (range tags)
    backtests dagster job execute -j backtest        (every configured strategy and sweep)
    catalog   dagster job execute -j refresh_catalog

Per stage: wall and CPU time, peak memory of the whole process tree (the CLI and every
step worker it starts, PSS summed from /proc every POLL_SECONDS) and the RSS of the
largest single process in it, runs launched (from the instance), and files and bytes
written. --grid runs the growth grid instead: 1, 5 and 20 symbols at 30 days, and 30, 90
and 365 days at 1 symbol. The built-in strategies trade BTC/USDT and ETH/USDT, so the
symbols are those, SOL/USDT, then synthetic SYN04/USDT...; with one symbol, the three
BTC/USDT strategies run. Figures only: the exit code is non-zero only when a stage fails.

--executor celery runs the ingest, bars and features work as a daemon backfill split into
runs, in-process and then on N Celery workers: see celery_scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from backfill import REPO, bench_env, dagster_cli, fmt_bytes, tree_size, write_instance_yaml

MODULE = "pipelines.definitions"
TARGET_SECONDS = 300.0
TARGET = "target: < 5 min for 365 days x 20 symbols, memory flat in the number of days"
POLL_SECONDS = 0.2
STDERR_TAIL_LINES = 40
NAMED = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
# (symbols, days): growth in symbols at 30 days, in days at one symbol, and the target size.
GRID = ((1, 30), (20, 30), (1, 365), (20, 365))
STAGES = ("ingest", "markets", "bars", "features", "backtests", "catalog")
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def symbols(count: int) -> list[str]:
    return [*NAMED, *(f"SYN{i:02d}/USDT" for i in range(len(NAMED) + 1, count + 1))][:count]


@dataclass
class Stage:
    name: str
    wall: float = 0.0
    cpu: float = 0.0  # user + system seconds of the stage's processes
    tree_peak: int = 0  # bytes, PSS summed over the process tree
    single_peak: int = 0  # bytes, RSS of the largest process
    runs: int = 0
    files: int = 0
    size: int = 0
    dagster_share: float = 0.0  # of the wall time: all but the steps' own compute
    ok: bool = True


@dataclass
class Result:
    n_symbols: int
    days: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return sum(s.wall for s in self.stages)

    @property
    def cpu(self) -> float:
        return sum(s.cpu for s in self.stages)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in bytes; (0, 0) once it has gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for row in fh:
                name, _, rest = row.partition(":")
                if name in ("Pss", "Rss"):
                    found[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return found.get("Pss", 0), found.get("Rss", 0)


class TreeMemory:
    """Polls the memory of a process and all its descendants until stopped: the tree's PSS
    (shared pages split among the processes mapping them, so counted once) and the largest
    process's RSS (its whole resident set, which other processes on the machine leave as
    it is; their sharing moves PSS by tens of MiB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tree_peak = self.single_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            sizes = [_memory(p) for p in (self.pid, *_children(self.pid))]
            self.tree_peak = max(self.tree_peak, sum(pss for pss, _ in sizes))
            self.single_peak = max(self.single_peak, max(rss for _, rss in sizes))
            self._stop.wait(POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def children_cpu() -> float:
    """CPU seconds of the reaped children: less sensitive to other load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _instance_runs(home: Path) -> tuple[int, float]:
    """Runs in the instance, and the seconds their steps spent in candlestack's own code:
    from each step's start to its first materialization (the asset function has returned;
    what follows is Dagster writing the events), summed over every run."""
    from dagster import DagsterEventType as Kind
    from dagster import DagsterInstance

    compute = 0.0
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        for run in runs:
            started: dict[str, float] = {}
            for entry in instance.all_logs(
                run.run_id, of_type={Kind.STEP_START, Kind.ASSET_MATERIALIZATION}
            ):
                kind = entry.dagster_event.event_type
                if kind == Kind.STEP_START:
                    started[entry.step_key] = entry.timestamp
                elif entry.step_key in started:
                    compute += entry.timestamp - started.pop(entry.step_key)
        return len(runs), compute


def _written(roots: list[Path]) -> tuple[int, int]:
    files = size = 0
    for root in roots:
        if root.is_file():
            files, size = files + 1, size + root.stat().st_size
        elif root.is_dir():
            f, s = tree_size(root)
            files, size = files + f, size + s
    return files, size


@contextmanager
def postgres_database(server: str | None):
    """A throwaway database on `server` (postgresql://user@host:port), dropped afterwards."""
    if server is None:
        yield None
        return
    import psycopg

    name = f"candlestack_scale_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        # The psycopg2 driver, as deploy/postgres/dagster.yaml explains.
        yield f"{server.replace('postgresql://', 'postgresql+psycopg2://', 1)}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_postgres_yaml(home: Path, url: str) -> None:
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {url}\ntelemetry:\n  enabled: false\n"
    )


def run_size(
    n_symbols: int, days: int, stages: list[str], postgres: str | None, keep: bool, log
) -> Result:
    from candlestack.config import symbol_key

    names = symbols(n_symbols)
    keys = [symbol_key(s) for s in names]
    last = datetime.now(UTC).date() - timedelta(days=1)
    first: date = last - timedelta(days=days - 1)
    # Month x symbol partitions: the months of first..last (CANDLESTACK_START_DATE=first keeps
    # the first month to the days asked for; the current month includes today's minutes).
    candle_range = (f"{first:%Y-%m}-01|{keys[0]}", f"{last:%Y-%m}-01|{keys[-1]}")
    tags = json.dumps({RANGE_START: candle_range[0], RANGE_END: candle_range[1]})

    tmp = Path(tempfile.mkdtemp(prefix="candlestack-scale-"))
    home, lake = tmp / "dagster_home", tmp / "lake"
    home.mkdir()
    lake.mkdir()
    if postgres:
        write_postgres_yaml(home, postgres)
    else:
        write_instance_yaml(home)
    env = bench_env(home, lake, tmp / "catalog.duckdb", names, first)
    env.update(
        CANDLESTACK_LEDGER_URL=f"sqlite:///{tmp / 'ledger.sqlite'}",
        CANDLESTACK_REPORTS=str(tmp / "reports"),
    )
    outputs = [lake, tmp / "catalog.duckdb", tmp / "reports", tmp / "ledger.sqlite"]
    cli = dagster_cli()
    materialize = [cli, "asset", "materialize", "-m", MODULE, "--select"]
    execute = [cli, "job", "execute", "-m", MODULE, "-j"]
    commands = [
        ("ingest", [*materialize, "candles_1m", "--partition-range", "...".join(candle_range)]),
        ("markets", [*materialize, "markets", "--partition-range", f"{first}...{last}"]),
        ("bars", [*execute, "build_bars", "--tags", tags]),
        ("features", [*execute, "build_features", "--tags", tags]),
        ("backtests", [*execute, "backtest"]),
        ("catalog", [*execute, "refresh_catalog"]),
    ]
    result = Result(n_symbols, days)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"\n== {days} days ({first}..{last}) x {n_symbols} symbols; temp dir {tmp}")
    log(f"   load average before: {load}")
    try:
        runs_before, compute_before, written_before = 0, 0.0, (0, 0)
        for name, command in (c for c in commands if c[0] in stages):
            started = time.perf_counter()
            cpu_before = children_cpu()
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            memory = TreeMemory(proc.pid)
            out, err = proc.communicate()
            memory.stop()
            stage = Stage(name, wall=time.perf_counter() - started, ok=proc.returncode == 0)
            stage.cpu = children_cpu() - cpu_before
            stage.tree_peak, stage.single_peak = memory.tree_peak, memory.single_peak
            runs, compute = _instance_runs(home)
            written = _written(outputs)
            stage.runs = runs - runs_before
            stage.dagster_share = max(0.0, 1 - (compute - compute_before) / stage.wall)
            compute_before = compute
            stage.files = written[0] - written_before[0]
            stage.size = written[1] - written_before[1]
            runs_before, written_before = runs, written
            result.stages.append(stage)
            log(
                f"   {name:<10} {stage.wall:7.1f} s  cpu {stage.cpu:6.1f} s  "
                f"tree {fmt_bytes(stage.tree_peak):>10}  "
                f"largest {fmt_bytes(stage.single_peak):>10}  runs {stage.runs}  "
                f"files {stage.files:+,}  dagster {stage.dagster_share:.0%}  "
                f"{'ok' if stage.ok else 'FAILED'}"
            )
            if not stage.ok:
                tail = (err or out).splitlines()[-STDERR_TAIL_LINES:]
                log("\n".join(tail))
                break
        _, home_size = tree_size(home)
        log(f"   dagster storage {fmt_bytes(home_size)}")
        return result
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def print_result(result: Result) -> None:
    print(f"\n{result.days} days x {result.n_symbols} symbols, stage by stage:")
    print(
        f"{'stage':<10} {'wall':>8} {'cpu':>8} {'tree peak':>11} {'largest':>11} {'runs':>5} "
        f"{'files':>7} {'bytes':>11} {'dagster':>8}"
    )
    for s in result.stages:
        print(
            f"{s.name:<10} {s.wall:>6.1f} s {s.cpu:>6.1f} s {fmt_bytes(s.tree_peak):>11} "
            f"{fmt_bytes(s.single_peak):>11} {s.runs:>5} {s.files:>7,} {fmt_bytes(s.size):>11} "
            f"{s.dagster_share:>7.0%}"
        )
    stages = result.stages
    print(
        f"{'total':<10} {result.wall:>6.1f} s {result.cpu:>6.1f} s "
        f"{fmt_bytes(max(s.tree_peak for s in stages)):>11} "
        f"{fmt_bytes(max(s.single_peak for s in stages)):>11} {sum(s.runs for s in stages):>5} "
        f"{sum(s.files for s in stages):>7,} {fmt_bytes(sum(s.size for s in stages)):>11}"
    )


def print_grid(results: list[Result]) -> None:
    names = [s.name for s in results[0].stages]
    print("\ngrowth grid (wall seconds per stage; peaks over all stages: tree PSS, largest RSS):")
    header = f"{'symbols':>7} {'days':>5} " + " ".join(f"{n:>9}" for n in names)
    print(
        header + f" {'total':>8} {'cpu':>8} {'peak':>10} {'largest':>10} {'runs':>5} {'files':>7}"
    )
    for r in results:
        cells = " ".join(f"{s.wall:>9.1f}" for s in r.stages)
        print(
            f"{r.n_symbols:>7} {r.days:>5} {cells} {r.wall:>8.1f} {r.cpu:>8.1f} "
            f"{fmt_bytes(max(s.tree_peak for s in r.stages)):>10} "
            f"{fmt_bytes(max(s.single_peak for s in r.stages)):>10} "
            f"{sum(s.runs for s in r.stages):>5} {sum(s.files for s in r.stages):>7,}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=20, help="1..99 symbols")
    parser.add_argument("--days", type=int, default=365, help="closed UTC days, ending yesterday")
    parser.add_argument("--grid", action="store_true", help="run the growth grid")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated, in order; each needs the ones before it",
    )
    parser.add_argument(
        "--postgres",
        metavar="SERVER",
        help="PostgreSQL instance storage in a throwaway database on this server, e.g. "
        "postgresql://postgres@127.0.0.1:5432 (default: SQLite; with --executor celery, a "
        "server of its own)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    celery = parser.add_argument_group("--executor celery (celery_scale.py)")
    celery.add_argument("--executor", choices=("in_process", "celery"), default="in_process")
    celery.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    celery.add_argument("--per-run", type=int, default=20, help="symbol-months per run")
    celery.add_argument("--concurrent", type=int, default=2, help="runs at a time")
    args = parser.parse_args()
    if not 1 <= args.symbols <= 99 or args.days < 1:
        parser.error("--symbols must be 1..99 and --days at least 1")
    if args.executor == "celery":
        if args.grid or args.keep or min(args.workers, default=0) < 1 or args.per_run < 1:
            parser.error("--executor celery takes neither --grid nor --keep, workers >= 1")
        from celery_scale import run

        return run(args)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not args.stages or set(args.stages) - set(STAGES):
        parser.error(f"--stages takes some of {', '.join(STAGES)}")
    sizes = list(GRID) if args.grid else [(args.symbols, args.days)]
    print(f"stages: {', '.join(args.stages)}; storage: {args.postgres or 'sqlite'}")
    dagster_env = {
        k: v for k, v in os.environ.items() if k.startswith("DAGSTER_") and "HOME" not in k
    }
    if dagster_env:
        print(f"dagster settings from the environment: {dagster_env}")

    load_before = os.getloadavg()[0]
    results = []
    for n_symbols, days in sizes:
        with postgres_database(args.postgres) as postgres:
            result = run_size(
                n_symbols, days, args.stages, postgres, args.keep, lambda t: print(t, flush=True)
            )
        results.append(result)
        print_result(result)
        if not result.ok:
            return 1
    if args.grid:
        print_grid(results)
    print()
    print(TARGET)
    full = next((r for r in results if (r.n_symbols, r.days) == (20, 365)), None)
    if full and [s.name for s in full.stages] == list(STAGES):
        verdict = "met" if full.wall < TARGET_SECONDS else "missed"
        print(f"result: {verdict}, {full.wall:.0f} s on {os.cpu_count()} cores")
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"1-min load average: {load} (other work on the machine skews the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
