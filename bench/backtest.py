"""Benchmark: a moving-average cross over one year of 1-minute bars, with every metric.

    python bench/backtest.py [--days 365]

Figures: the first backtest in a fresh process (imports, numba's compile or its on-disk
cache, features, simulation and metrics), once with numba's cache cleared and once with it
warm; one warm backtest (median of 20); a 100-combination sweep (fast 5..50 x slow
60..240). Bars are synthetic 1m candles (the synthetic source, so gaps and regimes are
realistic). Targets: <= 3 s first in a fresh process, <= 25 ms warm, <= 1 s for the sweep.
Prints figures only.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from candlestack.backtest import backtest
from candlestack.execution import MarketRules, RuleBook
from candlestack.gaps import fill
from candlestack.ingest import day_start_ms
from candlestack.resample import minute_bars
from candlestack.schema import DAY_MS, TS
from candlestack.sources.synthetic import SyntheticSource
from candlestack.strategies.config import StrategyConfig
from candlestack.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]

RULES = RuleBook.constant(
    MarketRules(amount_step=1e-6, price_tick=0.01, min_amount=1e-6, min_cost=10.0)
)
CONFIG = StrategyConfig(
    name="bench",
    strategy="ma_cross",
    symbol="BTC/USDT",
    timeframe="1m",
    params={"fast": 10, "slow": 50},
)
GRID = {"fast": list(range(5, 55, 5)), "slow": list(range(60, 260, 20))}

# The fresh process: everything from the first import to the first result.
FIRST_RUN = """
import time
started = time.perf_counter()
import polars as pl
from candlestack.backtest import backtest
from candlestack.execution import MarketRules, RuleBook
from candlestack.strategies.config import StrategyConfig
bars = pl.read_parquet({path!r})
rules = RuleBook.constant(MarketRules(amount_step=1e-6, price_tick=0.01, min_cost=10.0))
config = StrategyConfig(name="bench", strategy="ma_cross", symbol="BTC/USDT", timeframe="1m",
                        params={{"fast": 10, "slow": 50}})
result = backtest(config, bars, rules)
print(time.perf_counter() - started)
"""


def year_of_bars(days: int) -> pl.DataFrame:
    first = date(2025, 1, 1)
    start = day_start_ms(first)
    end = day_start_ms(first + timedelta(days=days))
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 2e9)
    candles = fill(source.fetch_candles("BTC/USDT", start, end), start, end, None)
    return (
        minute_bars(candles)
        .select("ts", "open", "high", "low", "close", "volume", imputed=pl.col("n_imputed") > 0)
        .with_columns(pl.col("ts").cast(TS))
    )


def fresh_process(path: Path) -> tuple[float, float]:
    """(seconds to the first result, process wall seconds)."""
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", FIRST_RUN.format(path=str(path))],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), time.perf_counter() - started


def clear_numba_cache() -> None:
    for cached in (ROOT / "candlestack").rglob("__pycache__/*.nb[ic]"):
        cached.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    bars = year_of_bars(args.days)
    print(f"{bars.height:,} 1m bars ({args.days} days), MA cross 10/50, all metrics")
    assert bars.height == args.days * DAY_MS // 60_000

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bars.parquet"
        bars.write_parquet(path)
        clear_numba_cache()
        first, wall = fresh_process(path)
        print(f"first backtest, fresh process, cold numba cache: {first:6.2f} s "
              f"(process {wall:.2f} s)")  # fmt: skip
        first, wall = fresh_process(path)
        print(f"first backtest, fresh process, warm numba cache: {first:6.2f} s "
              f"(process {wall:.2f} s)   target <= 3 s")  # fmt: skip

    backtest(CONFIG, bars, RULES)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        result = backtest(CONFIG, bars, RULES)
        times.append(time.perf_counter() - started)
    warm = statistics.median(times)
    trades = result.metrics["trades"]
    print(f"one warm backtest: {warm * 1000:6.1f} ms   target <= 25 ms   "
          f"{bars.height / warm / 1e6:.1f} M bars/s, {trades:,} trades")  # fmt: skip

    started = time.perf_counter()
    results, invalid = sweep(CONFIG, GRID, bars, RULES)
    elapsed = time.perf_counter() - started
    print(f"sweep of {results.height} combinations: {elapsed:6.2f} s   target <= 1 s   "
          f"{results.height / elapsed:.0f} backtests/s, "
          f"{results.height * bars.height / elapsed / 1e6:.0f} M bars/s")  # fmt: skip
    best = results.row(0, named=True)
    print(f"  best by Sharpe: fast {best['fast']} slow {best['slow']} "
          f"sharpe {best['sharpe']:.2f}; {len(invalid)} combinations left out")  # fmt: skip


if __name__ == "__main__":
    main()
