"""Benchmark: the minutely top-up of the open month, on day 1 and on day 28 of a month.

    python bench/open_month.py [--symbols 3] [--minutes 5]

What the `keep_open_day_current` schedule's run does each minute (a top-up: what is stored
closed is kept), without Dagster: append the newly closed minute of every symbol to its open
month file, then build that month's bars of every timeframe and its features. The month is
first filled up to noon of the given day (synthetic source, a fixed clock), then the clock
moves a minute at a time. Prints the median milliseconds per minute of each step, summed
over the symbols. Figures only.
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candlestack.bars import BarBuilder
from candlestack.config import symbol_key
from candlestack.feature_store import FeatureBuilder, load_feature_set
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, month_days
from candlestack.resample import BAR_TIMEFRAMES
from candlestack.sources.synthetic import SyntheticSource

MONTH = date(2026, 3, 1)


def top_ups(day_of_month: int, symbols: list[str], minutes: int) -> dict[str, list[float]]:
    features = load_feature_set(None)
    now = datetime(MONTH.year, MONTH.month, day_of_month, 12, tzinfo=UTC).timestamp()
    clock = {"now": now}
    source = SyntheticSource(symbols=symbols, clock=lambda: clock["now"])
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp)
        ingestor = Ingestor(source, lake)
        bars = BarBuilder(lake, "synthetic", 0.01)
        builder = FeatureBuilder(lake, "synthetic", features, 0.01)
        before = month_days(MONTH - timedelta(days=1))
        times: dict[str, list[float]] = {"ingest": [], "bars": [], "features": []}

        def minute(top_up: bool = True) -> dict[str, float]:
            spent = dict.fromkeys(times, 0.0)
            for symbol in symbols:
                started = time.perf_counter()
                days = ingestor.days_to_ingest(symbol, month_days(MONTH))
                ingestor.ingest(symbol, days, keep_closed=top_up)
                spent["ingest"] += time.perf_counter() - started
                started = time.perf_counter()
                for timeframe in BAR_TIMEFRAMES:
                    bars.build(timeframe, symbol_key(symbol), MONTH, reuse_unchanged=top_up)
                spent["bars"] += time.perf_counter() - started
                started = time.perf_counter()
                for timeframe in features.timeframes:
                    builder.build(timeframe, symbol_key(symbol), MONTH)
                spent["features"] += time.perf_counter() - started
            return spent

        # The month before (the features' warm-up reads it), and this one up to now.
        for symbol in symbols:
            ingestor.ingest(symbol, before)
            for timeframe in BAR_TIMEFRAMES:
                bars.build(timeframe, symbol_key(symbol), MONTH - timedelta(days=1))
        minute(top_up=False)
        for _ in range(minutes):
            clock["now"] += 60
            for step, seconds in minute().items():
                times[step].append(seconds)
        return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=3)
    parser.add_argument("--minutes", type=int, default=5)
    args = parser.parse_args()
    symbols = [f"S{i:02d}/USDT" for i in range(args.symbols)]
    print(f"one minute's top-up of the open month, {args.symbols} symbols, "
          f"median of {args.minutes} minutes (ms)")  # fmt: skip
    print(f"{'day':>4} {'ingest':>9} {'bars':>9} {'features':>9} {'total':>9}")
    for day in (1, 28):
        times = top_ups(day, symbols, args.minutes)
        medians = {step: statistics.median(values) * 1000 for step, values in times.items()}
        cells = " ".join(f"{medians[s]:>9.1f}" for s in ("ingest", "bars", "features"))
        print(f"{day:>4} {cells} {sum(medians.values()):>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
