"""Finding missing minutes, planning re-requests, filling and reporting gaps."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import polars as pl

from candlestack.gaps import fill, gap_report, missing_runs, request_windows
from candlestack.schema import CANDLES_1M, DAY_MS, GAPS, MINUTE_MS, RAW_CANDLES
from candlestack.sources.replay import read_candle_file
from tests.conftest import OHLCV

M = MINUTE_MS
START = 19_000 * DAY_MS
POWR = OHLCV / "freqtrade-testdata_bittrex_POWRBTC_1m.csv"


def ts(*minutes: int) -> np.ndarray:
    return np.array([START + i * M for i in minutes], dtype=np.int64)


def run(first: int, last: int) -> tuple[int, int]:
    return (START + first * M, START + last * M)


def candles(minutes: list[int], closes: list[float] | None = None) -> pl.DataFrame:
    closes = closes or [100.0 + i for i in minutes]
    return pl.DataFrame(
        {
            "ts": [START + i * M for i in minutes],
            "open": [c - 0.5 for c in closes],
            "high": [c + 1.0 for c in closes],
            "low": [c - 1.0 for c in closes],
            "close": closes,
            "volume": [5.0] * len(minutes),
        },
        schema=RAW_CANDLES,
    )


# --- missing_runs -------------------------------------------------------------------


def test_missing_runs_none_missing():
    assert missing_runs(ts(*range(10)), START, START + 10 * M) == []


def test_missing_runs_leading():
    assert missing_runs(ts(*range(3, 10)), START, START + 10 * M) == [run(0, 2)]


def test_missing_runs_trailing():
    assert missing_runs(ts(*range(7)), START, START + 10 * M) == [run(7, 9)]


def test_missing_runs_single_first_and_last_minute():
    assert missing_runs(ts(*range(1, 9)), START, START + 10 * M) == [run(0, 0), run(9, 9)]


def test_missing_runs_all_missing():
    empty = np.array([], dtype=np.int64)
    assert missing_runs(empty, START, START + DAY_MS) == [run(0, 1439)]


def test_missing_runs_middle_runs_inclusive():
    present = ts(0, 1, 4, 5, 6, 8, 9)
    assert missing_runs(present, START, START + 10 * M) == [run(2, 3), run(7, 7)]


def test_missing_runs_ignores_candles_outside_the_window():
    present = ts(-3, -1, 2, 3, 10, 12)
    assert missing_runs(present, START, START + 10 * M) == [run(0, 1), run(4, 9)]


# --- request_windows ----------------------------------------------------------------


def covered(windows: list[tuple[int, int]], runs: list[tuple[int, int]]) -> bool:
    return all(
        any(lo <= t < hi for lo, hi in windows)
        for first, last in runs
        for t in range(first, last + M, M)
    )


def test_request_windows_empty():
    assert request_windows([], 1000) == []


def test_request_windows_merges_nearby_gaps_into_one_request():
    runs = [run(0, 0), run(2, 3), run(8, 8)]
    assert request_windows(runs, 10) == [(START, START + 9 * M)]


def test_request_windows_keeps_far_gaps_apart():
    runs = [run(0, 1), run(50, 50)]
    assert request_windows(runs, 10) == [(START, START + 2 * M), (START + 50 * M, START + 51 * M)]


def test_request_windows_window_exactly_max_is_merged():
    assert request_windows([run(0, 0), run(9, 9)], 10) == [(START, START + 10 * M)]
    assert request_windows([run(0, 0), run(10, 10)], 10) == [
        (START, START + M),
        (START + 10 * M, START + 11 * M),
    ]


def test_request_windows_splits_a_long_gap_into_max_size_windows():
    windows = request_windows([run(0, 2499)], 1000)

    assert windows == [
        (START, START + 1000 * M),
        (START + 1000 * M, START + 2000 * M),
        (START + 2000 * M, START + 2500 * M),
    ]


def test_request_windows_long_gap_after_short_gap():
    runs = [run(0, 0), run(5, 2504)]
    windows = request_windows(runs, 1000)

    assert all(hi - lo <= 1000 * M for lo, hi in windows)
    assert covered(windows, runs)
    assert windows[-1][1] == START + 2505 * M
    assert len(windows) == 4  # 1 + ceil(2500 / 1000)


def test_request_windows_on_a_real_illiquid_market():
    # Bittrex POWR/BTC: thousands of one-minute no-trade gaps; a day needs <= 2 requests.
    present = read_candle_file(POWR)["ts"].to_numpy()
    first_day = int(present[0]) // DAY_MS * DAY_MS + DAY_MS
    total_runs = 0
    for day_start in range(first_day, first_day + 8 * DAY_MS, DAY_MS):
        runs = missing_runs(present, day_start, day_start + DAY_MS)
        windows = request_windows(runs, 1000)
        total_runs += len(runs)
        assert covered(windows, runs)
        assert all(0 < hi - lo <= 1000 * M for lo, hi in windows)
        assert all(a[1] <= b[0] for a, b in pairwise(windows))
        assert len(windows) <= 2
    assert total_runs > 1000


# --- fill ---------------------------------------------------------------------------


def test_fill_imputes_flat_candles_at_the_previous_close():
    clean = candles([0, 1, 4, 5], closes=[10.0, 11.0, 14.0, 15.0])
    filled = fill(clean, START, START + 8 * M, previous_close=None)

    assert filled.schema == CANDLES_1M
    assert filled["ts"].dt.epoch("ms").to_list() == [START + i * M for i in range(8)]
    imputed = filled.filter("imputed")
    assert imputed["ts"].dt.epoch("ms").to_list() == [START + i * M for i in (2, 3, 6, 7)]
    for price in ("open", "high", "low", "close"):
        assert imputed[price].to_list() == [11.0, 11.0, 15.0, 15.0]
    assert imputed["volume"].to_list() == [0.0] * 4


def test_fill_keeps_real_candles_untouched():
    clean = candles([0, 1, 4, 5])
    filled = fill(clean, START, START + 8 * M, previous_close=None)

    real = filled.filter(~pl.col("imputed")).drop("imputed")
    assert real.with_columns(pl.col("ts").dt.epoch("ms")).equals(clean)


def test_fill_leaves_leading_minutes_absent_without_previous_close():
    clean = candles([3, 4])
    filled = fill(clean, START, START + 6 * M, previous_close=None)

    assert filled["ts"].dt.epoch("ms").to_list() == [START + i * M for i in (3, 4, 5)]
    assert filled["imputed"].to_list() == [False, False, True]


def test_fill_fills_leading_minutes_with_previous_close():
    clean = candles([3, 4], closes=[20.0, 21.0])
    filled = fill(clean, START, START + 5 * M, previous_close=19.5)

    assert filled.height == 5
    lead = filled.head(3)
    assert lead["imputed"].to_list() == [True] * 3
    assert lead.select("open", "high", "low", "close").unique().rows() == [(19.5,) * 4]
    assert lead["volume"].to_list() == [0.0] * 3


def test_fill_empty_window():
    empty = pl.DataFrame(schema=RAW_CANDLES)
    assert fill(empty, START, START + 5 * M, previous_close=None).is_empty()
    all_flat = fill(empty, START, START + 5 * M, previous_close=7.0)
    assert all_flat.height == 5
    assert all_flat["imputed"].all()
    assert all_flat["close"].to_list() == [7.0] * 5


# --- gap_report ---------------------------------------------------------------------


def test_gap_report_counts_refetched_imputed_and_missing():
    first_pass = [run(0, 2), run(5, 8)]
    # Minute 0 stayed missing; 1 was re-fetched; 2 imputed; 5 and 6 re-fetched; 7, 8 imputed.
    final = ts(1, 2, 3, 4, 5, 6, 7, 8, 9)
    imputed = ts(2, 7, 8)

    report = gap_report(first_pass, final, imputed)

    assert report.schema == GAPS
    assert report.select("minutes", "refetched", "imputed", "missing").rows() == [
        (3, 1, 1, 1),
        (4, 2, 2, 0),
    ]
    assert report["gap_start"].dt.epoch("ms").to_list() == [START, START + 5 * M]
    assert report["gap_end"].dt.epoch("ms").to_list() == [START + 2 * M, START + 8 * M]


def test_gap_report_without_gaps_is_empty_but_typed():
    report = gap_report([], ts(0, 1), np.array([], dtype=np.int64))

    assert report.is_empty()
    assert report.schema == GAPS
