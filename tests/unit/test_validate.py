"""validate(): every refusal reason, duplicate handling and the rejection summary."""

from __future__ import annotations

import math

import polars as pl
import pytest

from candlestack.schema import MINUTE_MS, RAW_CANDLES, REJECTED
from candlestack.validate import EARLIEST_MS, LATEST_MS, describe_rejections, validate

START = 1_700_000_040_000 // MINUTE_MS * MINUTE_MS  # a minute boundary
END = START + 10 * MINUTE_MS


def minute(i: int) -> int:
    return START + i * MINUTE_MS


def row(ts: int, o=100.0, h=101.0, lo=99.0, c=100.5, v=3.0) -> tuple:
    return (ts, o, h, lo, c, v)


def frame(*rows: tuple) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=RAW_CANDLES, orient="row")


GOOD = row(minute(0))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (row(minute(1), o=math.nan), "non-finite value"),
        (row(minute(1), h=math.inf), "non-finite value"),
        (row(minute(1), c=None), "non-finite value"),
        (row(minute(1), v=-math.inf), "non-finite value"),
        (row(None), "non-finite value"),
        (row(minute(1), v=-0.5), "negative volume"),
        (row(minute(1), o=100.0, h=99.0, lo=101.0, c=100.0), "high < low"),
        (row(minute(1), o=101.5), "open outside [low, high]"),
        (row(minute(1), o=98.5), "open outside [low, high]"),
        (row(minute(1), c=101.01), "close outside [low, high]"),
        (row(minute(1), c=98.99), "close outside [low, high]"),
        (row(minute(1) + 1), "timestamp not on the minute"),
        (row(minute(1) + 30_000), "timestamp not on the minute"),
        (row(START - MINUTE_MS), "outside the requested range"),
        (row(END), "outside the requested range"),
        (row(END + 5 * MINUTE_MS), "outside the requested range"),
        # The unit is told before the minute or the window: a minute in seconds is neither
        # "not on the minute" nor a candle of 1970.
        (row(minute(1) // 1000), "timestamp in seconds"),
        (row(minute(1) * 1000), "timestamp in microseconds"),
        (row(minute(1) * 1_000_000), "timestamp in nanoseconds"),
        (row(-MINUTE_MS), "timestamp off the epoch"),
        (row(0), "timestamp off the epoch"),
        (row(EARLIEST_MS - MINUTE_MS), "timestamp off the epoch"),  # before 2009-01-03
        (row(5 * 10**12), "timestamp off the epoch"),  # 2128 in ms
    ],
)
def test_each_bad_row_is_refused_with_its_reason(bad, reason):
    clean, rejected = validate(frame(GOOD, bad), START, END)

    assert clean["ts"].to_list() == [minute(0)]
    assert rejected.height == 1
    assert rejected["reason"].to_list() == [reason]
    assert rejected.schema == REJECTED


@pytest.mark.parametrize(
    ("first", "last", "refused"),
    [
        (EARLIEST_MS, EARLIEST_MS + MINUTE_MS, EARLIEST_MS - MINUTE_MS),  # 2009-01-03 00:00
        (LATEST_MS - 2 * MINUTE_MS, LATEST_MS - MINUTE_MS, LATEST_MS),  # 2100-01-01 00:00
    ],
)
def test_the_epoch_runs_from_bitcoins_genesis_to_2100(first, last, refused):
    window = (min(first, refused), max(last, refused) + MINUTE_MS)
    clean, rejected = validate(frame(row(first), row(last), row(refused)), *window)

    assert clean["ts"].to_list() == [first, last]
    assert rejected.select("ts", "reason").rows() == [(refused, "timestamp off the epoch")]


def test_window_bounds_are_half_open():
    clean, rejected = validate(frame(row(START), row(END - MINUTE_MS), row(END)), START, END)

    assert clean["ts"].to_list() == [START, END - MINUTE_MS]
    assert rejected["ts"].to_list() == [END]


def test_candle_touching_its_range_is_accepted():
    # open == low and close == high (and a doji with all four equal) are valid candles.
    rows = (
        row(minute(0), o=99.0, h=101.0, lo=99.0, c=101.0),
        row(minute(1), o=100.0, h=100.0, lo=100.0, c=100.0, v=0.0),
    )
    clean, rejected = validate(frame(*rows), START, END)

    assert rejected.is_empty()
    assert clean.height == 2


def test_duplicate_timestamp_with_different_values_refuses_every_copy():
    rows = (
        GOOD,
        row(minute(3), c=100.5),
        row(minute(3), c=100.7),
        row(minute(3), c=100.9),
        row(minute(4)),
    )
    clean, rejected = validate(frame(*rows), START, END)

    assert clean["ts"].to_list() == [minute(0), minute(4)]
    assert rejected["ts"].to_list() == [minute(3)] * 3
    assert set(rejected["reason"]) == {"duplicate timestamp with different values"}
    assert sorted(rejected["close"]) == [100.5, 100.7, 100.9]


def test_conflicting_duplicate_with_one_bad_copy_still_refuses_both():
    clean, rejected = validate(frame(row(minute(2)), row(minute(2), v=math.nan)), START, END)

    assert clean.is_empty()
    assert rejected.height == 2
    assert set(rejected["reason"]) == {
        "non-finite value",
        "duplicate timestamp with different values",
    }


def test_identical_duplicates_collapse_silently():
    # Pagination overlap: the same candle served on two pages.
    rows = (row(minute(5)), row(minute(1)), row(minute(5)), row(minute(1)), row(minute(5)))
    clean, rejected = validate(frame(*rows), START, END)

    assert rejected.is_empty()
    assert clean.equals(frame(row(minute(1)), row(minute(5))))


def test_clean_output_is_sorted_unique_and_typed():
    order = [7, 2, 9, 0, 2, 5, 1]
    raw = frame(*(row(minute(i), c=100.0 + i / 10) for i in order))

    clean, rejected = validate(raw, START, END)

    assert rejected.is_empty()
    assert clean.schema == RAW_CANDLES
    assert clean["ts"].to_list() == [minute(i) for i in sorted(set(order))]
    assert clean["ts"].is_sorted()
    assert clean["ts"].n_unique() == clean.height
    # Values travel with their timestamp.
    assert clean.filter(pl.col("ts") == minute(9))["close"].item() == pytest.approx(100.9)


def test_values_given_as_strings_or_ints_are_cast_and_garbage_refused():
    raw = pl.DataFrame(
        {
            "ts": [minute(0), minute(1)],
            "open": ["100", "abc"],
            "high": ["101.5", "101"],
            "low": ["99", "99"],
            "close": ["100.25", "100"],
            "volume": [1, 2],
        }
    )
    clean, rejected = validate(raw, START, END)

    assert clean.schema == RAW_CANDLES
    assert clean.row(0) == (minute(0), 100.0, 101.5, 99.0, 100.25, 1.0)
    assert rejected["reason"].to_list() == ["non-finite value"]


def test_empty_input_gives_empty_frames():
    clean, rejected = validate(pl.DataFrame(schema=RAW_CANDLES), START, END)

    assert clean.is_empty() and clean.schema == RAW_CANDLES
    assert rejected.is_empty() and rejected.schema == REJECTED
    assert describe_rejections(rejected) == "none"


def test_describe_rejections_names_counts_and_example_rows():
    rows = (
        GOOD,
        row(minute(1), v=-1.0),
        row(minute(2), v=-2.0),
        row(minute(3), o=100.0, h=99.0, lo=101.0, c=100.0),
    )
    _, rejected = validate(frame(*rows), START, END)

    text = describe_rejections(rejected)

    assert text.startswith("2 negative volume, 1 high < low; e.g. ")
    assert f"ts={minute(1)} o=100.0 h=101.0 l=99.0 c=100.5 v=-1.0 (negative volume)" in text
    assert f"ts={minute(3)} o=100.0 h=99.0 l=101.0 c=100.0 v=3.0 (high < low)" in text


def test_describe_rejections_limits_examples():
    _, rejected = validate(frame(*(row(minute(i), v=-1.0) for i in range(6))), START, END)

    text = describe_rejections(rejected, limit=2)

    assert text.startswith("6 negative volume; e.g. ")
    assert text.count("(negative volume)") == 2
    assert f"ts={minute(0)} " in text and f"ts={minute(1)} " in text
    assert f"ts={minute(2)} " not in text
