"""Benchmark: a real CLI single-run backfill of `candles_1m` from the synthetic source.

Run from the repository root:

    python bench/backfill.py [--days 365] [--symbols BTC/USDT,ETH/USDT,SOL/USDT] [--keep]

A temporary DAGSTER_HOME (sqlite storage, telemetry off) and a temporary lake are
created, `dagster asset materialize --partition-range ...` backfills the last N closed
UTC days x the symbols in one run (checks included), and the figures are printed one a
line. The process exits non-zero only when the backfill itself fails.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "pipelines.definitions"
ASSET = "candles_1m"
TARGET_SECONDS = 60.0
TARGET = "target: < 60 s for 365 days x 3 symbols on 2 cores"
# The asset's own summary line (assets/market_data.py, context.log.info).
SUMMARY = re.compile(r"\d+ days in (\d+) partitions, (\d+) rows in ([\d.]+) s \(")
STDERR_TAIL_LINES = 40

# Make `candlestack` importable when run as `python bench/backfill.py`.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365, help="closed UTC days, ending yesterday")
    parser.add_argument(
        "--symbols",
        default="BTC/USDT,ETH/USDT,SOL/USDT",
        help="comma-separated ccxt symbols",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()
    if args.days < 1:
        parser.error("--days must be at least 1")
    args.symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if not args.symbols:
        parser.error("--symbols needs at least one symbol")
    return args


def dagster_cli() -> str:
    beside = Path(sys.executable).parent / "dagster"
    if beside.exists():
        return str(beside)
    found = shutil.which("dagster")
    if not found:
        sys.exit("dagster CLI not found next to this python nor on PATH")
    return found


def write_instance_yaml(home: Path) -> None:
    (home / "dagster.yaml").write_text(
        textwrap.dedent(
            f"""\
            storage:
              sqlite:
                base_dir: {home / "storage"}
            local_artifact_storage:
              module: dagster._core.storage.root
              class: LocalArtifactStorage
              config:
                base_dir: {home}
            compute_logs:
              module: dagster._core.storage.local_compute_log_manager
              class: LocalComputeLogManager
              config:
                base_dir: {home / "logs"}
            telemetry:
              enabled: false
            """
        )
    )


def bench_env(home: Path, lake: Path, catalog: Path, symbols: list[str], first: date) -> dict:
    # Settings reject unknown CANDLESTACK_* names: start from a clean slate.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")}
    env.update(
        DAGSTER_HOME=str(home),
        CANDLESTACK_SOURCE="synthetic",
        CANDLESTACK_SYMBOLS=",".join(symbols),
        CANDLESTACK_START_DATE=first.isoformat(),
        CANDLESTACK_LAKE=str(lake),
        CANDLESTACK_CATALOG=str(catalog),
        PYTHONUNBUFFERED="1",
    )
    return env


def tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for folder, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(folder, name))
    return files, size


def run_figures(home: Path) -> dict:
    """Timestamps of the run, its steps and the asset's summary line, from the event log."""
    from dagster import DagsterEventType as Kind
    from dagster import DagsterInstance

    figures: dict = {"steps": {}, "planned": 0, "materializations": 0}
    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_run_records(limit=1)
        if not records:
            return figures
        run_id = records[0].dagster_run.run_id
        figures["run_id"] = run_id
        for entry in instance.all_logs(run_id):
            figures.setdefault("first_event", entry.timestamp)
            event = entry.dagster_event
            kind = event.event_type if event else None
            step = figures["steps"].setdefault(entry.step_key, {}) if entry.step_key else {}
            if kind == Kind.RUN_START:
                figures["run_start"] = entry.timestamp
            elif kind in (Kind.RUN_SUCCESS, Kind.RUN_FAILURE):
                figures["run_end"] = entry.timestamp
            elif kind == Kind.STEP_WORKER_STARTING:
                step["spawn"] = entry.timestamp
            elif kind == Kind.STEP_START:
                step["start"] = entry.timestamp
            elif kind in (Kind.STEP_SUCCESS, Kind.STEP_FAILURE):
                step["end"] = entry.timestamp
            elif kind in (Kind.ASSET_MATERIALIZATION_PLANNED, Kind.ASSET_CHECK_EVALUATION_PLANNED):
                figures["planned"] += 1
            elif kind == Kind.ASSET_MATERIALIZATION:
                figures["materializations"] += 1
                step.setdefault("first_materialization", entry.timestamp)
            elif event is None and (match := SUMMARY.search(entry.user_message or "")):
                figures["summary"] = match
                step["summary_logged"] = entry.timestamp
    return figures


def print_breakdown(figures: dict, launched: float, wall: float) -> None:
    """Where the wall time went, from the event log timestamps (same clock as time.time)."""
    if "run_start" not in figures:
        return
    ended = launched + wall
    print("breakdown (from the event log):")
    line("  start-up + definitions load", f"{figures['first_event'] - launched:.1f} s")
    line(
        f"  run creation ({figures['planned']:,} planned events)",
        f"{figures['run_start'] - figures['first_event']:.1f} s",
    )
    for key, step in figures["steps"].items():
        if "start" not in step or "end" not in step:
            continue
        if "spawn" in step:
            line(f"  {key}: worker spawn + reload", f"{step['start'] - step['spawn']:.1f} s")
        line(f"  {key}: step", f"{step['end'] - step['start']:.1f} s")
        if "summary_logged" in step:
            line(
                f"  {key}: after compute ({figures['materializations']:,} events)",
                f"{step['end'] - step['summary_logged']:.1f} s",
            )
    if "run_end" in figures:
        line("  run end -> process exit", f"{ended - figures['run_end']:.1f} s")


def fmt_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def line(label: str, value: str) -> None:
    print(f"{label + ':':<44} {value}")


def main() -> int:
    args = parse_args()
    from candlestack.config import symbol_key
    from candlestack.lake import Lake

    last = datetime.now(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=args.days - 1)
    keys = [symbol_key(s) for s in args.symbols]
    months = (last.year - first.year) * 12 + last.month - first.month + 1
    partitions = months * len(keys)
    partition_range = f"{first:%Y-%m}-01|{keys[0]}...{last:%Y-%m}-01|{keys[-1]}"

    tmp = Path(tempfile.mkdtemp(prefix="candlestack-bench-"))
    home, lake_dir = tmp / "dagster_home", tmp / "lake"
    home.mkdir()
    lake_dir.mkdir()
    write_instance_yaml(home)
    env = bench_env(home, lake_dir, tmp / "catalog.duckdb", args.symbols, first)
    cli = dagster_cli()
    command = [
        cli,
        "asset",
        "materialize",
        "-m",
        MODULE,
        "--select",
        ASSET,
        "--partition-range",
        partition_range,
    ]
    print(f"backfill: {args.days} days ({first}..{last}) x {len(keys)} symbols ({', '.join(keys)})")
    print(f"temp dir: {tmp}{' (kept)' if args.keep else ''}")
    print(f"command:  {' '.join(command[1:])}", flush=True)

    load_before = os.getloadavg()[0]
    try:
        launched = time.time()
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        # Taken before any other child runs: the largest RSS of any reaped descendant.
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).splitlines()[-STDERR_TAIL_LINES:]
            print(f"\nbackfill FAILED (exit {proc.returncode}) after {wall:.1f} s; stderr tail:")
            print("\n".join(tail))
            return proc.returncode or 1

        rows = int(Lake(lake_dir).reports(exchange="synthetic")["rows"].sum())
        files, size = tree_size(lake_dir)
        _, home_size = tree_size(home)
        figures = run_figures(home)
        match = figures.get("summary") or SUMMARY.search(proc.stderr + proc.stdout)

        # Same interpreter start-up and definitions import as the backfill, no run.
        started = time.perf_counter()
        validate = subprocess.run(
            [cli, "definitions", "validate", "-m", MODULE],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        validate_s = time.perf_counter() - started if validate.returncode == 0 else None

        print()
        line("wall time", f"{wall:.1f} s")
        line("candles written", f"{rows:,}")
        line("candles/s (wall)", f"{rows / wall:,.0f}")
        line(
            "partitions",
            f"{partitions:,} ({months} months x {len(keys)} symbols, {args.days} days)",
        )
        line("peak memory (largest process)", f"{peak_mib:,.0f} MiB")
        line("lake files written", f"{files:,}")
        line("lake bytes written", f"{fmt_bytes(size)} ({size:,} B)")
        line("dagster storage", fmt_bytes(home_size))
        if match:
            compute = float(match.group(3))
            line("compute inside the asset", f"{compute:.1f} s ({int(match.group(2)):,} rows)")
            print("  (as the asset logs it: includes Dagster's context.add_asset_metadata calls)")
            line("dagster share of the time", f"{1 - compute / wall:.0%} (1 - compute / wall)")
        else:
            compute = None
            line("compute inside the asset", "not found in the event log nor the output")
        line("materialization events", f"{figures.get('materializations', 0):,}")
        if validate_s is not None:
            line("startup + definitions load", f"{validate_s:.1f} s (definitions validate)")
        print()
        print_breakdown(figures, launched, wall)
        print()
        print(TARGET)
        comparable = args.days == 365 and len(keys) == 3
        verdict = "met" if wall < TARGET_SECONDS else "missed"
        note = "" if comparable else f" (this run: {args.days} days x {len(keys)} symbols)"
        cores = os.cpu_count()
        print(f"result: {verdict}, {wall:.1f} s on {cores} cores{note}")
        load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        print(f"1-min load average: {load} (other work on the machine skews the figures)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
