"""Benchmark: bars of every timeframe, a month file at a time, and their reconcile check.

    python bench/bars.py [--months 12]

Ingests --months of synthetic 1-minute candles of one symbol into a temporary lake, then
builds every timeframe's bars month by month, as the bars assets do. Prints, per timeframe,
the median milliseconds per month of the whole build and of its `reconciles_with_1m` check
(BarBuilder.reconcile: the stored file read back and compared with the minutes' own bars),
and the check's share of the build. Target: the check costs less than the build. Figures only.
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candlestack.bars import BarBuilder
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, month_of
from candlestack.resample import BAR_TIMEFRAMES
from candlestack.sources.synthetic import SyntheticSource

FIRST = date(2025, 1, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--months", type=int, default=12)
    args = parser.parse_args()
    last = (FIRST + timedelta(days=31 * args.months)).replace(day=1) - timedelta(days=1)
    days = [FIRST + timedelta(days=i) for i in range((last - FIRST).days + 1)]
    months = sorted({month_of(d) for d in days})
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 2e9)
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp)
        Ingestor(source, lake).ingest("BTC/USDT", days)
        builder = BarBuilder(lake, "synthetic", imputed_max_share=0.01)
        checking: list[float] = []
        reconcile = builder.reconcile

        def timed_reconcile(*args, **kwargs):
            started = time.perf_counter()
            try:
                return reconcile(*args, **kwargs)
            finally:
                checking.append(time.perf_counter() - started)

        builder.reconcile = timed_reconcile
        print(f"bars of one symbol, {len(months)} month files of 1m candles, ms per month")
        print(f"{'timeframe':>9} {'build':>8} {'check':>8} {'share':>7}")
        for timeframe in BAR_TIMEFRAMES:
            checking.clear()
            builds = []
            for month in months:
                started = time.perf_counter()
                builder.build(timeframe, "BTC-USDT", month)
                builds.append(time.perf_counter() - started)
            build, check = statistics.median(builds), statistics.median(checking)
            print(f"{timeframe:>9} {build * 1000:8.1f} {check * 1000:8.1f} {check / build:7.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
