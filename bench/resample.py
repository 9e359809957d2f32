"""Benchmark: one year of 1-minute candles resampled to every timeframe.

    python bench/resample.py [--symbols 20] [--days 365]

For 1 symbol and for N symbols: in memory (resample_all on frames already loaded), and
from the lake (reading each symbol's month files, then resampling). polars'
group_by_dynamic on the same frames is timed in the same run as a baseline. Medians of 3.
Targets: at most 60 ms for 1 symbol and 2 s for 20 symbols. Prints figures only.
"""

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candlestack.gaps import fill
from candlestack.ingest import day_start_ms
from candlestack.lake import DayData, Lake, month_of, split_days
from candlestack.resample import BAR_TIMEFRAMES, minute_bars, resample_all
from candlestack.schema import DAY_MS
from candlestack.sources.synthetic import SyntheticSource

RUNS = 3


def median_seconds(work) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def year_of_minutes(source: SyntheticSource, symbol: str, days: list[date]) -> pl.DataFrame:
    start = day_start_ms(days[0])
    raw = source.fetch_candles(symbol, start, start + len(days) * DAY_MS)
    return fill(raw, start, start + len(days) * DAY_MS, None)


def baseline(minutes: pl.DataFrame) -> None:
    for timeframe in BAR_TIMEFRAMES:
        minutes.group_by_dynamic("ts", every=timeframe, closed="left", label="left").agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("volume").sum(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    days = [date(2025, 1, 1) + timedelta(days=i) for i in range(args.days)]
    symbols = [f"S{i:02d}/USDT" for i in range(args.symbols)]
    source = SyntheticSource(symbols=symbols, clock=lambda: 2e9)
    print(f"{args.days} days of 1m candles, {len(symbols)} symbols, medians of {RUNS} runs")

    frames = {s: minute_bars(year_of_minutes(source, s, days)) for s in symbols}
    one = frames[symbols[0]]
    plain = one.select("ts", "open", "high", "low", "close", "volume")
    keys = [s.replace("/", "-") for s in symbols]
    many = f"{len(symbols)} symbols"
    print(f"rows per symbol: {one.height:,}")
    show("1 symbol, in memory", median_seconds(lambda: resample_all(one)), "target <= 60 ms")
    show("  polars group_by_dynamic", median_seconds(lambda: baseline(plain)))
    show(f"{many}, in memory", median_seconds(lambda: [resample_all(f) for f in frames.values()]),
         "target <= 2 s")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(tmp)
        for key, frame in zip(keys, frames.values(), strict=True):
            candles = frame.select(
                "ts", "open", "high", "low", "close", "volume", imputed=pl.col("n_imputed") > 0
            )
            months: dict[date, dict[date, DayData]] = {}
            for day, part in split_days(candles).items():
                months.setdefault(month_of(day), {})[day] = DayData(part, {})
            for month, month_days in months.items():
                lake.write_month("ohlcv", "synthetic", "1m", key, month, month_days)
        files = sorted(Path(tmp).glob("ohlcv/**/*.parquet"))
        size = sum(f.stat().st_size for f in files)
        print(f"lake: {len(files):,} month files, {size / 2**20:.1f} MiB")

        def from_lake(symbol_keys: list[str]) -> None:
            for key in symbol_keys:
                candles = lake.read_days("ohlcv", "synthetic", "1m", key, days[0], days[-1])
                resample_all(minute_bars(candles))

        show("1 symbol, from the lake", median_seconds(lambda: from_lake(keys[:1])))
        show(f"{many}, from the lake", median_seconds(lambda: from_lake(keys)))


def show(label: str, seconds: float, target: str = "") -> None:
    figure = f"{seconds * 1000:8.1f} ms" if seconds < 1 else f"{seconds:8.2f} s "
    print(f"{label:<30} {figure}   {target}".rstrip())


if __name__ == "__main__":
    main()
