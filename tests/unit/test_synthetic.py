"""The synthetic market: deterministic, window-independent, realistic enough to test with."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack.checks import ohlc_violations
from candlestack.schema import DAY_MS, MINUTE_MS, RAW_CANDLES
from candlestack.sources.synthetic import SyntheticSource
from candlestack.validate import validate

FIRST_DAY = 19_725  # 2024-01-03, a multiple of the 5-day regime length
START = FIRST_DAY * DAY_MS
LATER = (FIRST_DAY + 365) * DAY_MS / 1000  # a clock well after every day used here
SYMBOL = "BTC/USDT"


def source(seed: int = 7, now_s: float = LATER) -> SyntheticSource:
    return SyntheticSource(seed=seed, symbols=[SYMBOL], clock=lambda: now_s)


def hidden_minutes(days: range, seed: int = 7) -> tuple[set[int], set[int]]:
    """(never, withheld-once) open times over the days."""
    never, withheld = set(), set()
    for d in days:
        _, n, w = source(seed).day(SYMBOL, d)
        never.update(n.tolist())
        withheld.update(w.tolist())
    return never, withheld


def test_same_seed_same_candles_different_seed_different():
    end = START + 3 * DAY_MS
    a = source(7).fetch_candles(SYMBOL, START, end)
    b = source(7).fetch_candles(SYMBOL, START, end)
    c = source(8).fetch_candles(SYMBOL, START, end)

    assert a.schema == RAW_CANDLES
    assert a.height > 3 * 1440 - 30
    assert_frame_equal(a, b)
    joined = a.join(c, on="ts", suffix="_c")
    assert joined.height > 4000
    assert (joined["close"] != joined["close_c"]).mean() > 0.99


def test_symbols_differ():
    src = source()
    btc = src.fetch_candles("BTC/USDT", START, START + DAY_MS)
    eth = src.fetch_candles("ETH/USDT", START, START + DAY_MS)
    assert btc["close"].median() > 10 * eth["close"].median()


def test_values_do_not_depend_on_the_requested_window():
    bulk = source().fetch_candles(SYMBOL, START, START + 3 * DAY_MS)
    # Narrow windows, on a fresh source, in odd places (one straddles midnight).
    windows = [
        (START + 700 * MINUTE_MS, START + 731 * MINUTE_MS),
        (START + DAY_MS - 5 * MINUTE_MS, START + DAY_MS + 5 * MINUTE_MS),
        (START + 2 * DAY_MS + 1439 * MINUTE_MS, START + 3 * DAY_MS),
    ]
    for lo, hi in windows:
        narrow = source().fetch_candles(SYMBOL, lo, hi)
        assert narrow.height > 0
        assert_frame_equal(narrow, bulk.filter(pl.col("ts").is_between(lo, hi, closed="left")))


def test_a_re_request_returns_the_bulk_values():
    src = source()
    bulk = src.fetch_candles(SYMBOL, START, START + 10 * DAY_MS)
    again = src.fetch_candles(SYMBOL, START + 3 * DAY_MS + 600 * MINUTE_MS, START + 4 * DAY_MS)

    common = again.join(bulk, on="ts", suffix="_bulk")
    assert common.height >= again.height - 6  # all but minutes withheld from the bulk
    for column in ("open", "high", "low", "close", "volume"):
        assert common[column].equals(common[f"{column}_bulk"], check_names=False)


def test_withheld_minutes_come_back_on_a_later_request():
    days = range(FIRST_DAY, FIRST_DAY + 10)
    never, withheld = hidden_minutes(days)
    withheld -= never
    assert withheld, "the fixture days should withhold some minutes"

    src = source()
    end = START + 10 * DAY_MS
    first = set(src.fetch_candles(SYMBOL, START, end)["ts"].to_list())
    second = set(src.fetch_candles(SYMBOL, START, end)["ts"].to_list())

    assert not withheld & first
    assert withheld <= second
    assert second - first == withheld
    # A narrow re-request of one withheld minute, as gap repair asks, gets it.
    fresh = source()
    minute = min(withheld)
    fresh.fetch_candles(SYMBOL, START, end)
    assert fresh.fetch_candles(SYMBOL, minute, minute + MINUTE_MS)["ts"].to_list() == [minute]


def test_permanent_gaps_never_appear():
    days = range(FIRST_DAY, FIRST_DAY + 10)
    never, _ = hidden_minutes(days)
    assert never, "the fixture days should have some permanent gaps"

    src = source()
    end = START + 10 * DAY_MS
    seen: set[int] = set()
    for _ in range(3):
        seen |= set(src.fetch_candles(SYMBOL, START, end)["ts"].to_list())
    for minute in never:
        assert src.fetch_candles(SYMBOL, minute, minute + MINUTE_MS).is_empty()

    assert not never & seen
    assert seen == set(range(START, end, MINUTE_MS)) - never


@pytest.mark.parametrize("symbol", ["BTC/USDT", "ETH/USDT", "XRP/USDT", "PEPE/USDT"])
def test_every_row_is_valid_and_ohlc_consistent(symbol):
    src = SyntheticSource(seed=3, clock=lambda: LATER)
    end = START + 5 * DAY_MS
    raw = src.fetch_candles(symbol, START, end)

    clean, rejected = validate(raw, START, end)

    assert rejected.is_empty()
    assert clean.height == raw.height
    assert (raw["volume"] >= 0).all()
    stored = clean.with_columns(pl.col("ts").cast(pl.Datetime("ms", "UTC")))
    for day in range(5):
        day_start = START + day * DAY_MS
        part = stored.filter(
            pl.col("ts").dt.epoch("ms").is_between(day_start, day_start + DAY_MS, closed="left")
        )
        assert set(ohlc_violations(part, day_start).values()) == {0}


def test_prices_join_across_days():
    src = source()
    days = [src.day(SYMBOL, d)[0] for d in range(FIRST_DAY, FIRST_DAY + 30)]
    for before, after in pairwise(days):
        assert before["close"][-1] == after["open"][0]
        assert after["ts"][0] - before["ts"][-1] == MINUTE_MS
    # ... and inside a day every open is the previous close.
    for day in days:
        assert day["open"][1:].equals(day["close"][:-1], check_names=False)


def minute_return_std(frame: pl.DataFrame) -> float:
    return float(np.diff(np.log(frame["close"].to_numpy())).std())


def test_volatility_differs_between_regimes():
    src = source()
    blocks = []
    for block in range(8):
        first = FIRST_DAY + 5 * block
        stds = [minute_return_std(src.day(SYMBOL, d)[0]) for d in range(first, first + 5)]
        # A regime lasts the whole 5-day block ...
        assert max(stds) / min(stds) < 1.3, stds
        blocks.append(float(np.mean(stds)))
    # ... and blocks differ clearly.
    assert max(blocks) / min(blocks) > 2.5, blocks


@pytest.mark.parametrize("seconds_into_day", [630.0, 600.0, 600.001, 59.999, 86_399.9])
def test_fetch_never_returns_a_candle_still_forming(seconds_into_day):
    now_s = START / 1000 + seconds_into_day
    src = source(now_s=now_s)

    got = src.fetch_candles(SYMBOL, START - DAY_MS, START + DAY_MS)

    now_ms = round(now_s * 1000)
    assert (got["ts"] + MINUTE_MS <= now_ms).all()
    # Everything closed before now is there (minus the few deliberate gaps).
    closed = set(range(START - DAY_MS, now_ms // MINUTE_MS * MINUTE_MS, MINUTE_MS))
    assert len(closed) - got.height <= 20
    assert set(got["ts"].to_list()) <= closed


def test_fetch_in_the_future_is_empty():
    src = source(now_s=START / 1000)
    got = src.fetch_candles(SYMBOL, START + DAY_MS, START + 2 * DAY_MS)
    assert got.is_empty()
    assert got.schema == RAW_CANDLES
