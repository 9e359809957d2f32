"""Benchmark: the dry-run's decision compute and its latency from a bar's close to its fill.

    python bench/dry_run.py [--bars 240] [--live-minutes 6]

1. Decision compute, per built-in strategy: a session of `--bars` closed bars decided one
   run at a time on the synthetic market (features, signals, sizing, rules, fill), on a
   lake and ledger in a temporary folder. Prints p50/p95 of the decision step alone (what
   each decision records as compute_ms) and of a whole run (lake reads, ledger write).
   Target: decision compute p95 <= 50 ms per strategy and symbol (SLO 500 ms).
2. Close to fill persisted, live: a real dagster-daemon with the default local instance
   (SQLite storage, queued runs), the minute schedule and the dry-run sensor, for
   `--live-minutes` on the 1m built-in strategy; p50/p95 over the bars it decided, from
   the ledger. Target: p95 <= 20 s for 1m bars. `--live-minutes 0` skips it.
Prints figures only.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import yaml

from candlestack.bars import BarBuilder
from candlestack.dryrun import DryRun
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, month_of, write_parquet_atomic
from candlestack.ledger import Ledger
from candlestack.resample import BAR_TIMEFRAMES, TIMEFRAME_MINUTES
from candlestack.sources.synthetic import SyntheticSource
from candlestack.strategies.config import load_strategies

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SESSION_END = datetime(2024, 3, 20, 0, 0, tzinfo=UTC)


def quantiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return f"p50 {statistics.median(values):7.1f}   p95 {cuts[18]:7.1f}"


def decision_compute(bars: int, folder: Path) -> None:
    clock_now = [SESSION_END.timestamp()]
    source = SyntheticSource(symbols=["BTC/USDT", "ETH/USDT"], clock=lambda: clock_now[0])
    lake = Lake(folder / "lake")
    days = [SESSION_END.date() - timedelta(days=k) for k in range(30, 0, -1)]
    builder = BarBuilder(lake, "synthetic", imputed_max_share=0.01)
    for symbol, key in (("BTC/USDT", "BTC-USDT"), ("ETH/USDT", "ETH-USDT")):
        Ingestor(source, lake).ingest(symbol, days)
        for timeframe in BAR_TIMEFRAMES:
            for month in sorted({month_of(day) for day in days}):
                builder.build(timeframe, key, month)
    for day in days:
        write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    print(f"decision compute, {bars} bars per strategy, one run per bar:")
    print(f"  {'strategy':<20} {'decision step (ms)':>28} {'whole run (ms)':>28}")
    for config in load_strategies().strategies:
        ledger = Ledger(f"sqlite:///{folder / f'{config.name}.sqlite'}")
        ledger.migrate()
        bar = timedelta(minutes=TIMEFRAME_MINUTES[config.timeframe])
        start = SESSION_END - bars * bar
        runs = []
        for i in range(bars):
            bar_ts = start + i * bar
            clock_now[0] = (bar_ts + bar + timedelta(seconds=2)).timestamp()
            dry_run = DryRun(config, lake, "synthetic", source, ledger, lambda: clock_now[0])
            started = time.perf_counter()
            dry_run.run(bar_ts)
            runs.append((time.perf_counter() - started) * 1000)
        compute = ledger.decisions(config.name).get_column("compute_ms").to_list()
        orders = ledger.orders(config.name).height
        print(
            f"  {config.name:<20} {quantiles(compute):>28} {quantiles(runs):>28}"
            f"   ({config.timeframe}, {orders} orders)"
        )
        ledger.close()


STRATEGY = """
strategies:
  - name: btc_scalp
    strategy: ma_cross
    symbol: BTC/USDT
    timeframe: 1m
    params: {fast: 5, slow: 20, average: ema}
    dry_run: {enabled: true}
"""


def live_latency(minutes: float, folder: Path) -> None:
    home = folder / "home"
    home.mkdir()
    # The repository's dagster.yaml without its storage paths: SQLite storage under `home`.
    instance = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    for local in ("storage", "local_artifact_storage", "compute_logs"):
        instance.pop(local, None)
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    (folder / "strategies.yaml").write_text(STRATEGY)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")},
        "DAGSTER_HOME": str(home),
        "CANDLESTACK_LAKE": str(folder / "live_lake"),
        "CANDLESTACK_CATALOG": str(folder / "catalog.duckdb"),
        "CANDLESTACK_LEDGER_URL": f"sqlite:///{folder / 'live.sqlite'}",
        "CANDLESTACK_SYMBOLS": "BTC/USDT",
        "CANDLESTACK_STRATEGIES": str(folder / "strategies.yaml"),
    }
    today = datetime.now(UTC).date()
    rules = SyntheticSource(symbols=["BTC/USDT"]).load_markets()
    write_parquet_atomic(
        Lake(folder / "live_lake").markets_path("synthetic", today), rules.to_arrow(), {}
    )
    for kind, name in (("schedule", "keep_open_day_current"), ("sensor", "dry_run_bars")):
        subprocess.run(
            [BIN / "dagster", kind, "start", name, "-w", "workspace.yaml"],
            cwd=ROOT, env=env, check=True, capture_output=True,
        )  # fmt: skip
    daemon = subprocess.Popen(
        [BIN / "dagster-daemon", "run", "-w", "workspace.yaml"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    print(f"\nlive: dagster-daemon, minute schedule and dry-run sensor for {minutes:g} min ...")
    time.sleep(minutes * 60)
    os.killpg(daemon.pid, signal.SIGTERM)
    daemon.wait(timeout=60)
    decisions = Ledger(env["CANDLESTACK_LEDGER_URL"]).decisions("btc_scalp")
    # The first decision waits for the daemon's start-up: left out.
    latency = (
        ((decisions["decided_at"] - decisions["bar_ts"]).dt.total_milliseconds() / 1000 - 60)
        .slice(1)
        .to_list()
    )
    if len(latency) < 2:
        print("  too few bars decided to measure; run longer")
        return
    compute = decisions.get_column("compute_ms").drop_nulls().to_list()
    print(f"  bars decided: {decisions.height}")
    print(f"  close to fill persisted (s):  {quantiles(latency)}   max {max(latency):.1f}")
    print(f"  decision step (ms):           {quantiles(compute)}")
    print(pl.DataFrame({"bar": decisions["bar_ts"].slice(1), "latency_s": latency}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=240)
    parser.add_argument("--live-minutes", type=float, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_dry_run_") as tmp:
        decision_compute(args.bars, Path(tmp))
        if args.live_minutes > 0:
            live_latency(args.live_minutes, Path(tmp))


if __name__ == "__main__":
    main()
