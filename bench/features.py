"""Benchmark: the default feature set on one year of 1-minute bars, against bare TA-Lib.

Run from the repository root:

    python bench/features.py [--days 365] [--repeats 5]

Synthetic BTC/USDT candles (gaps forward-filled onto the full minute grid) are computed
two ways in the same run, each timed as the median of the repeats:

- bare TA-Lib: the seven calls of the default set (SMA 20, EMA 50, EMA 200, RSI 14,
  MACD 12/26/9, BBANDS 20/2/2, ATR 14) on the same float64 arrays, nothing else;
- `candlestack.features.compute` over the whole frame (validation, zero-copy extraction,
  warm-up nulls, polars frame): the overhead is ours, target at most 1.3x TA-Lib.

Bare TA-Lib is also timed keeping its outputs: 11 x 4 MB of fresh memory. Whether that
memory is reused or faulted in again depends on glibc's malloc trimming, which can swing
both that line and `compute` by several ms from run to run on some machines; running with
MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_MMAP_THRESHOLD_=1000000000 removes that effect
and leaves the overhead that is ours.

Figures are printed one a line; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import talib

REPO = Path(__file__).resolve().parents[1]
# Make `candlestack` importable when run as `python bench/features.py`.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from candlestack.features import (  # noqa: E402
    DEFAULT_FEATURES,
    bar_arrays,
    compute,
    warmup_bars,
)
from candlestack.schema import DAY_MS, MINUTE_MS  # noqa: E402
from candlestack.sources.synthetic import SyntheticSource  # noqa: E402

CLOCK_S = 1.8e9
TARGET_RATIO = 1.3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=365, help="days of 1m bars")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    args = parser.parse_args()
    if args.days < 2 or args.repeats < 1:
        parser.error("--days must be at least 2 and --repeats at least 1")
    return args


def one_minute_bars(days: int) -> pl.DataFrame:
    """`days` closed UTC days of synthetic BTC/USDT 1m bars, gaps forward-filled."""
    end = int(CLOCK_S * 1000) // DAY_MS * DAY_MS
    start = end - days * DAY_MS
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: CLOCK_S)
    candles = source.fetch_candles("BTC/USDT", start, end)
    grid = pl.DataFrame({"ts": np.arange(start, end, MINUTE_MS, dtype=np.int64)})
    return (
        grid.join(candles, on="ts", how="left", maintain_order="left")
        .with_columns(pl.exclude("ts").forward_fill())
        .with_columns(pl.col("ts").cast(pl.Datetime("ms", "UTC")))
        .rechunk()
    )


def bare_talib(arrays: dict[str, np.ndarray]) -> None:
    close, high, low = arrays["close"], arrays["high"], arrays["low"]
    talib.SMA(close, timeperiod=20)
    talib.EMA(close, timeperiod=50)
    talib.EMA(close, timeperiod=200)
    talib.RSI(close, timeperiod=14)
    talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9)
    talib.BBANDS(close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0)
    talib.ATR(high, low, close, timeperiod=14)


def bare_talib_kept(arrays: dict[str, np.ndarray]) -> list[object]:
    """The same calls, their outputs held until the end as any user of them must."""
    close, high, low = arrays["close"], arrays["high"], arrays["low"]
    return [
        talib.SMA(close, timeperiod=20),
        talib.EMA(close, timeperiod=50),
        talib.EMA(close, timeperiod=200),
        talib.RSI(close, timeperiod=14),
        talib.MACD(close, fastperiod=12, slowperiod=26, signalperiod=9),
        talib.BBANDS(close, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0),
        talib.ATR(high, low, close, timeperiod=14),
    ]


def timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    bars = one_minute_bars(args.days)
    prepared = time.perf_counter() - began
    arrays = bar_arrays(bars, ["high", "low", "close"])

    # Warm up caches (validation plans, page faults) before timing.
    bare_talib(arrays)
    compute(bars, DEFAULT_FEATURES)

    times: dict[str, list[float]] = {"talib": [], "compute": []}
    for _ in range(args.repeats):
        # Interleaved so that drifting machine load hits every variant alike.
        times["talib"].append(timed(lambda: bare_talib(arrays)))
        times["compute"].append(timed(lambda: compute(bars, DEFAULT_FEATURES)))
    # Timed apart: freeing what it kept changes the allocator's state for the next variant.
    times["kept"] = [timed(lambda: bare_talib_kept(arrays)) for _ in range(args.repeats)]
    median = {name: statistics.median(values) * 1000 for name, values in times.items()}
    result = compute(bars, DEFAULT_FEATURES)

    print(f"bars: {bars.height:,} 1m bars ({args.days} days, synthetic BTC/USDT)")
    print(f"prepare bars: {prepared:.2f} s (not timed below)")
    print(f"warm-up of the default set: {warmup_bars(DEFAULT_FEATURES):,} bars")
    print(f"output: {result.width - 1} feature columns, {result.height:,} rows")
    print(f"bare TA-Lib (7 calls), median of {args.repeats}: {median['talib']:.1f} ms")
    print(f"bare TA-Lib keeping its 11 outputs, median of {args.repeats}: {median['kept']:.1f} ms")
    print(f"compute (one frame), median of {args.repeats}: {median['compute']:.1f} ms")
    ratio = median["compute"] / median["talib"]
    print(f"ratio compute / TA-Lib: {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    print(f"ratio compute / TA-Lib keeping outputs: {median['compute'] / median['kept']:.2f}x")
    spread = {name: (min(v) * 1000, max(v) * 1000) for name, v in times.items()}
    print("min/max ms: " + ", ".join(f"{k} {lo:.1f}/{hi:.1f}" for k, (lo, hi) in spread.items()))


if __name__ == "__main__":
    main()
