"""The Parquet lake: month files of many days, idempotent atomic writes, footer reports,
file encodings, and damaged files moved aside and rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import candlestack.lake.files as lake_files
from candlestack.catalog import build_catalog
from candlestack.errors import DamagedFileError, LakeError
from candlestack.gaps import gap_report
from candlestack.ingest import Ingestor, day_start_ms
from candlestack.lake import (
    GAPS_KEY,
    REPORT_KEY,
    DayData,
    Lake,
    content_hash,
    month_days,
    month_of,
    split_days,
    write_parquet_atomic,
)
from candlestack.schema import CANDLES_1M, GAPS
from candlestack.sources.replay import ReplaySource, read_candle_file
from tests.conftest import (
    DAMAGE,
    OHLCV,
    REPLAY_FILES,
    candle_day,
    flip_data_bytes,
    quarantined,
    truncate,
)

REPO = Path(__file__).resolve().parents[2]
BTC = OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"
DAY = date(2021, 4, 25)  # holds the 284-minute maintenance gap


@pytest.fixture(scope="module")
def day_data() -> tuple[pl.DataFrame, dict, pl.DataFrame]:
    """Candles, report and gap table of one real day, as ingest would make them."""
    return candle_day(read_candle_file(BTC), DAY)


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


def path_of(lake: Lake, month: date = DAY) -> Path:
    return lake.month_path("ohlcv", "binance", "1m", "BTC-USDT", month)


def write(lake: Lake, days: dict[date, DayData | None], month: date = DAY) -> dict:
    return lake.write_month("ohlcv", "binance", "1m", "BTC-USDT", month, days)


def shifted(data: tuple[pl.DataFrame, dict, pl.DataFrame], days: int) -> DayData:
    """The fixture day moved `days` days on: same values, another day of the lake."""
    candles, report, gaps = data
    by = pl.duration(days=days)
    moved = {
        **report,
        "first_ts": report["first_ts"] + timedelta(days=days),
        "last_ts": report["last_ts"] + timedelta(days=days),
    }
    return DayData(
        candles.with_columns(pl.col("ts") + by),
        moved,
        gaps.with_columns(pl.col("gap_start", "gap_end") + by),
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bump_one_close(candles: pl.DataFrame, row: int = 700, by: float = 0.01) -> pl.DataFrame:
    close = candles["close"].to_list()
    close[row] += by
    return candles.with_columns(pl.Series("close", close))


def test_day_fixture_is_the_real_gap_day(day_data):
    candles, report, gaps = day_data
    assert candles.height == 1440
    assert report["imputed"] == 284
    assert gaps["minutes"].to_list() == [284]


# --- idempotency and hashes -----------------------------------------------------------


def test_second_identical_write_does_not_touch_the_file(lake, day_data):
    candles, report, gaps = day_data
    path = path_of(lake)

    first = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]
    before = (path.stat().st_mtime_ns, path.stat().st_ino, sha(path))
    second = write(lake, {DAY: DayData(candles.clone(), dict(report), gaps.clone())})[DAY]

    assert first.written is True
    assert second.written is False
    assert first.path == second.path == path
    assert second.content_hash == first.content_hash
    assert second.bytes == first.bytes == path.stat().st_size
    assert (path.stat().st_mtime_ns, path.stat().st_ino, sha(path)) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]


def test_rewriting_one_day_unchanged_among_several_does_not_touch_the_file(lake, day_data):
    days = {DAY: DayData(*day_data), DAY + timedelta(days=1): shifted(day_data, 1)}
    path = path_of(lake)
    write(lake, days)
    before = (path.stat().st_mtime_ns, path.stat().st_ino, sha(path))

    again = write(lake, {DAY + timedelta(days=1): shifted(day_data, 1)})

    assert again[DAY + timedelta(days=1)].written is False
    assert (path.stat().st_mtime_ns, path.stat().st_ino, sha(path)) == before


def test_content_hash_changes_when_one_value_changes(day_data):
    candles, _, _ = day_data
    base = content_hash(candles)

    assert content_hash(candles.clone()) == base
    assert content_hash(bump_one_close(candles)) != base
    assert content_hash(bump_one_close(candles, row=0, by=1e-9)) != base
    flipped = candles.with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(~pl.col("imputed")).otherwise("imputed")
    )
    assert content_hash(flipped) != base
    shifted_ts = candles.with_columns(pl.col("ts") + pl.duration(milliseconds=1))
    assert content_hash(shifted_ts) != base


def test_content_hash_of_file_read_back_equals_the_stored_hash(lake, day_data):
    candles, report, gaps = day_data
    result = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]

    back = lake.read(result.path)
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert back.schema == CANDLES_1M
    assert back.equals(candles)
    assert stored.day(DAY).equals(candles)
    assert content_hash(stored.day(DAY)) == result.content_hash
    assert stored.reports[DAY]["content_hash"] == result.content_hash


def test_each_day_of_a_month_file_has_the_hash_of_its_own_rows(lake, day_data):
    other = DAY + timedelta(days=1)
    results = write(lake, {DAY: DayData(*day_data), other: shifted(day_data, 1)})

    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert list(stored.reports) == [DAY, other]
    assert stored.frame.height == 2 * 1440
    assert stored.frame["ts"].is_sorted()
    for day in (DAY, other):
        assert content_hash(stored.day(day)) == results[day].content_hash
        assert stored.reports[day]["content_hash"] == results[day].content_hash
    # The same rows a day later are other rows: their hash differs.
    assert results[DAY].content_hash != results[other].content_hash


def test_changed_value_is_rewritten(lake, day_data):
    candles, report, gaps = day_data
    path = path_of(lake)
    first = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]

    second = write(lake, {DAY: DayData(bump_one_close(candles), report, gaps)})[DAY]

    assert second.written is True
    assert second.content_hash != first.content_hash
    assert lake.read(path)["close"][700] == pytest.approx(candles["close"][700] + 0.01)
    assert lake.read_day_report("binance", "BTC-USDT", DAY)[0]["content_hash"] == (
        second.content_hash
    )


def test_changed_report_alone_is_rewritten_with_the_same_content_hash(lake, day_data):
    candles, report, gaps = day_data
    first = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]

    second = write(lake, {DAY: DayData(candles, {**report, "refetched": 3}, gaps)})[DAY]

    assert second.written is True
    assert second.content_hash == first.content_hash
    assert lake.read_day_report("binance", "BTC-USDT", DAY)[0]["refetched"] == 3


# --- a month file holds many days -------------------------------------------------------


def test_writing_some_days_keeps_the_months_other_days(lake, day_data):
    other = DAY + timedelta(days=1)
    first = write(lake, {DAY: DayData(*day_data)})[DAY]

    write(lake, {other: shifted(day_data, 1)})
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert list(stored.reports) == [DAY, other]
    assert stored.day(DAY).equals(day_data[0])
    assert stored.reports[DAY]["content_hash"] == first.content_hash
    assert stored.day(other).equals(shifted(day_data, 1).frame)
    # The gap table keeps both days' gaps, each on its own day.
    assert stored.gaps["gap_start"].dt.date().to_list() == [DAY, other]
    assert list(lake.month_files("ohlcv", "binance", "1m", "BTC-USDT")) == [date(2021, 4, 1)]


def test_a_replaced_day_loses_its_old_rows_and_gaps(lake, day_data):
    candles, report, gaps = day_data
    write(lake, {DAY: DayData(*day_data), DAY + timedelta(days=1): shifted(day_data, 1)})
    no_gaps = gaps.clear()

    write(lake, {DAY: DayData(bump_one_close(candles), {**report, "imputed": 0}, no_gaps)})
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert stored.day(DAY).height == 1440
    assert stored.day(DAY).equals(bump_one_close(candles))
    assert stored.reports[DAY]["imputed"] == 0
    assert stored.gaps["gap_start"].dt.date().to_list() == [DAY + timedelta(days=1)]


def test_none_removes_a_day_and_the_last_day_removes_the_file(lake, day_data):
    other = DAY + timedelta(days=1)
    write(lake, {DAY: DayData(*day_data), other: shifted(day_data, 1)})

    assert write(lake, {DAY: None}) == {}
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)
    assert list(stored.reports) == [other]
    assert stored.frame["ts"].dt.date().unique().to_list() == [other]
    assert lake.read_day_report("binance", "BTC-USDT", DAY) is None

    write(lake, {other: None})
    assert not path_of(lake).exists()
    assert lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY) is None
    assert lake.reports("binance").is_empty()


def test_a_day_of_another_month_is_refused_naming_the_month(lake, day_data):
    with pytest.raises(LakeError, match="2021-05-01 is not in the month 2021-04"):
        write(lake, {date(2021, 5, 1): shifted(day_data, 6)})
    assert not path_of(lake).exists()


def test_read_days_spans_months_and_keeps_only_the_days_asked_for(lake, day_data):
    may_first = date(2021, 5, 1)
    write(lake, {DAY: DayData(*day_data), DAY + timedelta(days=1): shifted(day_data, 1)})
    write(lake, {may_first: shifted(day_data, 6)}, month=may_first)

    rows = lake.read_days("ohlcv", "binance", "1m", "BTC-USDT", DAY + timedelta(days=1), may_first)
    close_only = lake.read_days(
        "ohlcv", "binance", "1m", "BTC-USDT", DAY, DAY, columns=["ts", "close"]
    )

    assert rows["ts"].dt.date().unique().to_list() == [DAY + timedelta(days=1), may_first]
    assert rows.height == 2 * 1440
    assert rows["ts"].is_sorted()
    assert close_only.columns == ["ts", "close"]
    assert close_only.equals(day_data[0].select("ts", "close"))
    june = date(2021, 6, 1)
    assert lake.read_days("ohlcv", "binance", "1m", "BTC-USDT", june, june) is None


def test_newest_ts_looks_back_past_a_month_without_rows(lake, day_data):
    candles, report, gaps = day_data
    assert lake.newest_ts("ohlcv", "binance", "1m", "BTC-USDT") is None
    write(lake, {DAY: DayData(candles, report, gaps)})
    may_first = date(2021, 5, 1)
    empty = {**report, "rows": 0, "missing": 1440, "first_ts": None, "last_ts": None}
    write(lake, {may_first: DayData(candles.clear(), empty, gaps.clear())}, month=may_first)

    newest = lake.newest_ts("ohlcv", "binance", "1m", "BTC-USDT")

    assert newest == candles["ts"].max()


def test_month_helpers():
    assert month_of(date(2021, 4, 25)) == date(2021, 4, 1)
    assert month_of("2021-04") == month_of("2021-04-30") == date(2021, 4, 1)
    assert len(month_days(date(2024, 2, 10))) == 29  # a leap February
    assert month_days(date(2021, 12, 31))[-1] == date(2021, 12, 31)
    assert month_days(date(2021, 4, 7))[0] == date(2021, 4, 1)
    frame = pl.DataFrame(
        {"ts": [datetime(2021, 4, 30, 23, 59, tzinfo=UTC), datetime(2021, 5, 1, tzinfo=UTC)]},
        schema={"ts": CANDLES_1M["ts"]},
    )
    parts = split_days(frame)
    assert list(parts) == [date(2021, 4, 30), date(2021, 5, 1)]
    assert [p.height for p in parts.values()] == [1, 1]


# --- footer report ----------------------------------------------------------------------


def test_read_day_report_round_trips_report_and_gaps(lake, day_data):
    candles, report, gaps = day_data
    result = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]

    stored_report, stored_gaps = lake.read_day_report("binance", "BTC-USDT", DAY)

    expected = json.loads(json.dumps({**report, "content_hash": result.content_hash}, default=str))
    assert stored_report == expected
    assert stored_report["first_ts"] == "2021-04-25 00:00:00+00:00"
    assert_frame_equal(stored_gaps, gaps)
    assert stored_gaps.schema == GAPS


def test_read_day_report_gives_only_that_days_gaps(lake, day_data):
    other = DAY + timedelta(days=1)
    write(lake, {DAY: DayData(*day_data), other: shifted(day_data, 1)})

    _, gaps = lake.read_day_report("binance", "BTC-USDT", other)

    assert_frame_equal(gaps, shifted(day_data, 1).gaps)


def test_read_day_report_round_trips_an_empty_gap_table(lake, day_data):
    candles, report, _ = day_data
    no_gaps = gap_report([], np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    write(lake, {DAY: DayData(candles, report, no_gaps)})

    _, stored_gaps = lake.read_day_report("binance", "BTC-USDT", DAY)
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert stored_gaps.is_empty()
    assert stored_gaps.schema == GAPS
    assert stored.gaps.is_empty()
    assert stored.gaps.schema == GAPS


def test_read_of_a_missing_month_or_day_is_none(lake, day_data):
    assert lake.read_day_report("binance", "BTC-USDT", DAY) is None
    assert lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY) is None
    assert lake.read(path_of(lake)) is None
    assert lake.day_reports("ohlcv", "binance", "1m", "BTC-USDT") == {}
    write(lake, {DAY: DayData(*day_data)})
    # Another day of a stored month is not stored.
    assert lake.read_day_report("binance", "BTC-USDT", DAY + timedelta(days=1)) is None


def test_read_of_foreign_parquet_names_the_file(lake, day_data):
    path = path_of(lake)
    path.parent.mkdir(parents=True)
    day_data[0].write_parquet(path)

    for read in (
        lambda: lake.read_day_report("binance", "BTC-USDT", DAY),
        lambda: lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY),
    ):
        with pytest.raises(LakeError, match="has no candlestack report") as info:
            read()
        assert str(path) in str(info.value)


# --- damaged files ----------------------------------------------------------------------


def damaged_month(lake: Lake, day_data, damage: str) -> tuple[Path, bytes]:
    """A stored month file of two days, damaged; returns its path and its damaged bytes."""
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data), DAY + timedelta(days=1): shifted(day_data, 1)})
    DAMAGE[damage](path)
    return path, path.read_bytes()


def assert_moved_aside(lake: Lake, path: Path, damaged: bytes, caplog) -> None:
    """The damaged file is gone from the lake, kept byte for byte under the quarantine
    folder at its own relative path, and an ERROR log line names it and where it went."""
    assert not path.exists()
    (moved,) = quarantined(lake.root)
    relative = path.relative_to(lake.root).as_posix()
    assert moved.relative_to(lake.root / "_quarantine").as_posix().startswith(relative + ".")
    assert moved.read_bytes() == damaged
    (record,) = [r for r in caplog.records if r.name == "candlestack.lake"]
    assert record.levelname == "ERROR"
    assert str(path) in record.getMessage() and str(moved) in record.getMessage()


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_month_file_is_moved_aside_named_and_reads_as_not_stored(
    lake, day_data, damage, caplog
):
    path, damaged = damaged_month(lake, day_data, damage)

    assert lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY) is None

    assert_moved_aside(lake, path, damaged, caplog)
    assert lake.day_reports("ohlcv", "binance", "1m", "BTC-USDT") == {}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_footer_read_moves_aside_a_file_whose_footer_is_damaged(lake, day_data, damage, caplog):
    path, damaged = damaged_month(lake, day_data, damage)

    assert lake.day_reports("ohlcv", "binance", "1m", "BTC-USDT") == {}
    assert lake.read_day_report("binance", "BTC-USDT", DAY) is None

    assert_moved_aside(lake, path, damaged, caplog)


@pytest.mark.parametrize("damage", DAMAGE)
def test_read_of_a_damaged_file_names_it_and_leaves_it(lake, day_data, damage):
    path, damaged = damaged_month(lake, day_data, damage)

    with pytest.raises(DamagedFileError) as info:
        lake.read(path)

    assert str(path) in str(info.value)
    assert path.read_bytes() == damaged


@pytest.mark.parametrize("damage", DAMAGE)
def test_reports_do_not_count_the_days_of_a_damaged_file(lake, day_data, damage):
    """The coverage grid counts the days `reports` lists: a file whose footer reads but
    whose data does not decode must not count its days complete."""
    may = date(2021, 5, 1)
    write(lake, {may: shifted(day_data, 6)}, month=may)
    damaged_month(lake, day_data, damage)

    assert lake.reports("binance")["date"].to_list() == [may]


@pytest.mark.parametrize("damage", DAMAGE)
def test_read_days_and_newest_ts_skip_a_damaged_month(lake, day_data, damage):
    may = date(2021, 5, 1)
    path = path_of(lake, may)
    write(lake, {DAY: DayData(*day_data)})
    write(lake, {may: shifted(day_data, 6)}, month=may)
    DAMAGE[damage](path)

    rows = lake.read_days("ohlcv", "binance", "1m", "BTC-USDT", DAY, may)

    assert_frame_equal(rows, day_data[0])
    assert lake.newest_ts("ohlcv", "binance", "1m", "BTC-USDT") == day_data[1]["last_ts"]
    assert not path.exists()


def ingest_april(lake: Lake) -> pl.DataFrame:
    days = [date(2021, 4, 24), DAY, date(2021, 4, 26)]
    Ingestor(ReplaySource(REPLAY_FILES), lake).ingest("BTC/USDT", days)
    return lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)


def rows_changed_behind_the_footer(path: Path) -> None:
    write_behind_the_footer(path, lambda rows: rows.with_columns(pl.col("close") * 1.01))


@pytest.mark.parametrize("damage", [*DAMAGE, "behind_the_footer"])
def test_a_rerun_of_the_ingest_rebuilds_a_damaged_month(lake, damage, caplog):
    """Before, the write read the damaged footer and failed (truncated, garbage), or found
    the footer unchanged and kept the damaged rows (data). Rows rewritten behind the footer
    break no page: the ingest re-hashes the month it merges with, and rebuilds it in the
    same run."""
    original = ingest_april(lake)
    path = path_of(lake)
    {**DAMAGE, "behind_the_footer": rows_changed_behind_the_footer}[damage](path)
    damaged = path.read_bytes()

    rebuilt = ingest_april(lake)

    assert_frame_equal(rebuilt.frame, original.frame)
    assert rebuilt.reports == original.reports
    (moved,) = quarantined(lake.root)
    assert moved.read_bytes() == damaged
    assert str(path) in caplog.text


def write_behind_the_footer(path: Path, change, checksums: bool = True) -> None:
    """Rewrite a month file's rows through `change`, its footer (reports, content hashes)
    kept: with checksums, every page is valid and only the hashes can tell; without, as a
    file written before page checksums were."""
    footer = {k: v for k, v in pq.read_schema(path).metadata.items() if k in (REPORT_KEY, GAPS_KEY)}
    rows = change(pl.read_parquet(path)).to_arrow()
    if checksums:
        write_parquet_atomic(path, rows, footer)
    else:
        pq.write_table(
            rows.replace_schema_metadata(footer),
            path,
            compression="zstd",
            use_dictionary=False,
            column_encoding=lake_files._encodings(rows.schema),
        )


def test_a_write_skipped_as_unchanged_re_hashes_the_rows_and_rewrites_changed_ones(
    lake, day_data, caplog
):
    candles, report, gaps = day_data
    path = path_of(lake)
    write(lake, {DAY: DayData(candles, report, gaps)})
    write_behind_the_footer(path, lambda rows: rows.with_columns(pl.col("close") * 1.01))
    changed = path.read_bytes()

    result = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]

    assert result.written is True
    assert_frame_equal(lake.read(path), candles)
    assert_moved_aside_copy(lake, changed, caplog)


def assert_moved_aside_copy(lake: Lake, damaged: bytes, caplog) -> None:
    (moved,) = quarantined(lake.root)
    assert moved.read_bytes() == damaged
    assert "do not hash to the content_hash in its footer" in caplog.text


def test_an_unchanged_write_keeps_the_intact_days_and_fails_naming_the_dropped_one(
    lake, day_data, caplog
):
    """The changed day is not in the write: it is dropped (not stored, so rebuilt by the
    next materialization) and the write fails naming it; the intact day is kept as it was."""
    other = DAY + timedelta(days=1)
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data), other: shifted(day_data, 1)})
    intact_hash = lake.day_reports("ohlcv", "binance", "1m", "BTC-USDT")[DAY]["content_hash"]
    write_behind_the_footer(
        path,
        lambda rows: rows.with_columns(
            close=pl.when(pl.col("ts").dt.date() == other)
            .then(pl.col("close") * 2)
            .otherwise("close")
        ),
    )
    changed = path.read_bytes()

    with pytest.raises(DamagedFileError) as info:
        write(lake, {DAY: DayData(*day_data)})

    assert str(path) in str(info.value)
    assert f"the rows of {other} do not hash" in str(info.value)
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)
    assert list(stored.reports) == [DAY]
    assert stored.reports[DAY]["content_hash"] == intact_hash
    assert_frame_equal(stored.frame, day_data[0])
    assert_moved_aside_copy(lake, changed, caplog)


def test_a_file_written_before_page_checksums_is_checked_by_its_content_hashes(
    lake, day_data, caplog
):
    """Its damaged pages decode without an error: only re-hashing the rows tells."""
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data)})
    write_behind_the_footer(path, lambda rows: rows, checksums=False)
    flip_data_bytes(path)
    damaged = path.read_bytes()
    assert pq.read_table(path).num_rows == 1440  # decodes, wrongly

    assert lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY) is None
    assert_moved_aside(lake, path, damaged, caplog)


def test_a_file_written_before_page_checksums_and_intact_reads_as_stored(lake, day_data):
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data)})
    write_behind_the_footer(path, lambda rows: rows, checksums=False)

    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)

    assert_frame_equal(stored.frame, day_data[0])
    assert not quarantined(lake.root)


def test_a_file_that_cannot_be_read_is_not_judged_damaged(lake, day_data, monkeypatch):
    """A store that cannot be reached (here: the open fails) is an error, not damage."""
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data)})

    def unreachable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lake_files, "open", unreachable, raising=False)
    with pytest.raises(LakeError, match="cannot read") as info:
        lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)
    monkeypatch.undo()

    assert str(path) in str(info.value)
    assert path.exists() and not quarantined(lake.root)


def test_a_file_rewritten_since_it_was_found_damaged_is_left_in_place(lake, day_data):
    path = path_of(lake)
    write(lake, {DAY: DayData(*day_data)})
    rewritten = path.read_bytes()
    truncate(path)
    with pytest.raises(DamagedFileError) as info:
        lake._load_month(path)
    path.write_bytes(rewritten)  # a writer replaces it meanwhile

    assert lake.quarantine(info.value) is None

    assert path.read_bytes() == rewritten
    assert not quarantined(lake.root)


def test_write_fsyncs_the_folder_after_the_rename(tmp_path, day_data, monkeypatch):
    """Without it, a power cut right after the rename may bring back the old file."""
    path = tmp_path / "month=2021-04" / "data.parquet"
    events = []
    replace, fsync = os.replace, os.fsync
    monkeypatch.setattr(lake_files.os, "replace", lambda *a: (events.append("rename"), replace(*a)))

    def recording_fsync(fd):
        kind = "folder" if os.path.samefile(f"/proc/self/fd/{fd}", path.parent) else "file"
        events.append(f"fsync {kind}")
        fsync(fd)

    monkeypatch.setattr(lake_files.os, "fsync", recording_fsync)
    write_parquet_atomic(path, day_data[0].to_arrow(), {})

    assert events == ["fsync file", "rename", "fsync folder"]


def test_reports_lists_each_stored_day(lake, day_data):
    other = DAY + timedelta(days=1)
    may_first = date(2021, 5, 1)
    moved = shifted(day_data, 1)
    write(
        lake, {DAY: DayData(*day_data), other: DayData(moved.frame, {**moved.report, "imputed": 0})}
    )
    write(lake, {may_first: shifted(day_data, 6)}, month=may_first)

    reports = lake.reports("binance")
    day_reports = lake.day_reports("ohlcv", "binance", "1m", "BTC-USDT")

    assert reports["date"].to_list() == [DAY, other, may_first]
    assert list(day_reports) == [DAY, other, may_first]
    assert reports["symbol"].to_list() == ["BTC-USDT"] * 3
    assert reports["imputed"].to_list() == [284, 0, 284]
    assert reports["first_ts"].dt.epoch("ms").to_list() == [
        day_start_ms(d) for d in (DAY, other, may_first)
    ]
    assert reports["content_hash"].to_list() == [r["content_hash"] for r in day_reports.values()]


def test_reports_of_a_day_without_any_candle(lake, day_data):
    candles, report, gaps = day_data
    empty = candles.clear()
    write(
        lake,
        {
            DAY: DayData(
                empty,
                {**report, "rows": 0, "missing": 1440, "first_ts": None, "last_ts": None},
                gaps,
            )
        },
    )

    reports = lake.reports("binance")

    assert reports["rows"].to_list() == [0]
    assert reports["first_ts"].to_list() == [None]


def test_empty_lake_reports_are_empty_but_typed(lake):
    reports = lake.reports("binance")
    assert reports.is_empty()
    assert reports.schema["first_ts"] == CANDLES_1M["ts"]


# --- atomicity ------------------------------------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from datetime import UTC, date, datetime, timedelta
    import polars as pl
    from candlestack.lake import DayData, Lake

    day = date.fromisoformat(sys.argv[1])
    lake = Lake(sys.argv[2])
    stored = lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", day)
    report = dict(stored.reports[day])
    report.pop("content_hash")
    changed = stored.day(day).with_columns(pl.col("close") * 1.01)
    os.replace = lambda *args, **kwargs: os._exit(1)  # power cut just before the rename
    lake.write_month(
        "ohlcv", "binance", "1m", "BTC-USDT", day, {day: DayData(changed, report, stored.gaps)}
    )
    print("rename happened", flush=True)
    """
)


def test_crash_between_write_and_rename_keeps_the_previous_file(lake, day_data, tmp_path):
    candles, report, gaps = day_data
    path = path_of(lake)
    old = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]
    old_sha = sha(path)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, DAY.isoformat(), str(lake.root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 1, proc.stderr
    assert "rename happened" not in proc.stdout
    # The previous file is intact and readable, with its old content.
    assert sha(path) == old_sha
    assert lake.read(path).equals(candles)
    assert lake.read_day_report("binance", "BTC-USDT", DAY)[0]["content_hash"] == old.content_hash
    # The new content sits in a dot-prefixed temp file next to it ...
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1
    tmp = leftovers[0]
    assert tmp.name.startswith(".data.parquet.") and tmp.name.endswith(".tmp")
    assert pl.read_parquet(tmp)["close"][0] == pytest.approx(candles["close"][0] * 1.01)
    # ... which no reader of *.parquet sees.
    assert list(path.parent.glob("*.parquet")) == [path]
    assert list(lake.month_files("ohlcv", "binance", "1m", "BTC-USDT").values()) == [path]
    glob = str(lake.root / "ohlcv" / "**" / "*.parquet")
    with duckdb.connect() as con:
        seen = con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0]
    assert seen == 1440
    counts = build_catalog(lake, tmp_path / "catalog.duckdb")
    assert counts["ohlcv"] == 1440
    assert counts["partitions"] == 1
    # The next write goes through normally.
    again = write(lake, {DAY: DayData(bump_one_close(candles), report, gaps)})[DAY]
    assert again.written is True
    assert lake.read_day_report("binance", "BTC-USDT", DAY)[0]["content_hash"] == (
        again.content_hash
    )


class Boom(Exception):
    pass


def partial_write_then(exc: BaseException):
    def write_table(table, sink, **kwargs):
        sink.write(b"PAR1 half a file")
        raise exc

    return write_table


@pytest.mark.parametrize("exc", [Boom("disk full"), KeyboardInterrupt()])
def test_exception_during_write_leaves_no_temp_file(lake, day_data, monkeypatch, exc):
    candles, report, gaps = day_data
    path = path_of(lake)
    old = write(lake, {DAY: DayData(candles, report, gaps)})[DAY]
    old_sha = sha(path)

    monkeypatch.setattr(lake_files.pq, "write_table", partial_write_then(exc))
    with pytest.raises(type(exc)):
        write(lake, {DAY: DayData(bump_one_close(candles), report, gaps)})
    monkeypatch.undo()

    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]
    assert sha(path) == old_sha
    assert lake.read_day_report("binance", "BTC-USDT", DAY)[0]["content_hash"] == old.content_hash


def test_failed_rename_leaves_no_temp_file(lake, day_data, monkeypatch):
    candles, report, gaps = day_data
    path = path_of(lake)
    write(lake, {DAY: DayData(candles, report, gaps)})
    old_sha = sha(path)

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(lake_files.os, "replace", refuse)
    with pytest.raises(OSError, match="cross-device"):
        write(lake, {DAY: DayData(bump_one_close(candles), report, gaps)})
    monkeypatch.undo()

    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]
    assert sha(path) == old_sha


def test_first_write_creates_the_partition_folders(tmp_path, day_data):
    path = tmp_path / "a" / "b" / "c" / "data.parquet"
    size = write_parquet_atomic(path, day_data[0].to_arrow(), {b"k": b"v"})

    assert size == path.stat().st_size
    assert pq.read_schema(path).metadata[b"k"] == b"v"


# --- file layout ----------------------------------------------------------------------


def test_month_path_is_hive_style(lake):
    assert path_of(lake).relative_to(lake.root).as_posix() == (
        "ohlcv/exchange=binance/timeframe=1m/symbol=BTC-USDT/month=2021-04/data.parquet"
    )
    # Any day of the month names the same file.
    assert path_of(lake, date(2021, 4, 1)) == path_of(lake, date(2021, 4, 30)) == path_of(lake)
    assert path_of(lake, date(2021, 5, 1)) != path_of(lake)
    bars = lake.month_path("bars", "binance", "4h", "ETH-USDT", date(2021, 12, 31))
    assert bars.relative_to(lake.root).as_posix() == (
        "bars/exchange=binance/timeframe=4h/symbol=ETH-USDT/month=2021-12/data.parquet"
    )


def test_month_files_lists_the_stored_months_in_order(lake, day_data):
    may_first = date(2021, 5, 1)
    write(lake, {may_first: shifted(day_data, 6)}, month=may_first)
    write(lake, {DAY: DayData(*day_data)})

    months = lake.month_files("ohlcv", "binance", "1m", "BTC-USDT")

    assert months == {date(2021, 4, 1): path_of(lake), may_first: path_of(lake, may_first)}
    assert lake.symbol_keys("ohlcv", "binance", "1m") == ["BTC-USDT"]


def test_parquet_encodings_have_no_dictionary_delta_ts_and_split_floats(lake, day_data):
    result = write(lake, {DAY: DayData(*day_data)})[DAY]

    row_group = pq.ParquetFile(result.path).metadata.row_group(0)
    columns = {
        row_group.column(i).path_in_schema: row_group.column(i)
        for i in range(row_group.num_columns)
    }

    assert list(columns) == list(CANDLES_1M.names())
    for name, column in columns.items():
        assert not column.has_dictionary_page, name
        assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(column.encodings), name
        assert column.compression == "ZSTD", name
    assert "DELTA_BINARY_PACKED" in columns["ts"].encodings
    for name in ("open", "high", "low", "close", "volume"):
        assert "BYTE_STREAM_SPLIT" in columns[name].encodings, name
        assert "PLAIN" not in columns[name].encodings, name


def test_a_month_rebuilt_whole_may_change_its_columns_but_not_one_day_alone(lake, day_data):
    """Another feature set changes a month's columns: rebuilding every stored day at once
    works; writing one day with new columns beside old ones is refused, naming the file."""
    days = {DAY - timedelta(days=1): shifted(day_data, -1), DAY: DayData(*day_data)}
    write(lake, days)
    wider = {d: DayData(x.frame.with_columns(extra=pl.lit(1.0)), x.report) for d, x in days.items()}
    before = sha(path_of(lake))
    with pytest.raises(LakeError, match="different columns") as info:
        write(lake, {DAY: wider[DAY]})
    assert str(path_of(lake)) in str(info.value)
    assert sha(path_of(lake)) == before
    write(lake, wider)
    assert "extra" in lake.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY).frame.columns


def test_a_month_lock_makes_a_second_writer_wait_and_leaves_no_lock_file(lake):
    """The collector and the REST top-up rewrite the same open month: each one's
    read-modify-write runs whole, one after the other, and no lock file stays behind."""
    month = date(2021, 4, 1)
    order: list[str] = []
    first_holds = threading.Event()

    def first() -> None:
        with lake.month_lock("ohlcv", "binance", "1m", "BTC-USDT", month):
            order.append("first in")
            first_holds.set()
            time.sleep(0.3)
            order.append("first out")

    def second() -> None:
        first_holds.wait(5)
        with lake.month_lock("ohlcv", "binance", "1m", "BTC-USDT", month):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    first_holds.wait(5)
    # Another symbol's month is not held up by it.
    started = time.monotonic()
    with lake.month_lock("ohlcv", "binance", "1m", "ETH-USDT", month):
        other_waited = time.monotonic() - started
    for thread in threads:
        thread.join(5)

    assert order == ["first in", "first out", "second in"]
    assert other_waited < 0.1
    assert [p for p in lake.root.rglob("*") if p.is_file()] == []


def test_a_kept_month_is_what_a_read_returns_and_another_writer_is_seen(tmp_path, day_data):
    """keep_months (the live collector's) hands back the month it wrote, equal to a read of
    the file, and reads the file again once another writer has replaced it."""
    keeping = Lake(tmp_path / "lake", keep_months=True)
    other = Lake(tmp_path / "lake")
    write(keeping, {DAY: DayData(*day_data)})

    kept = keeping.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY, rehash=True)
    read = other.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY, rehash=True)
    assert kept is keeping.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)
    assert_frame_equal(kept.frame, read.frame)
    assert (kept.reports, kept.footer) == (read.reports, read.footer)
    assert_frame_equal(kept.gaps, read.gaps)

    write(other, {DAY + timedelta(days=1): shifted(day_data, 1)})
    again = keeping.read_month("ohlcv", "binance", "1m", "BTC-USDT", DAY)
    assert list(again.reports) == [DAY, DAY + timedelta(days=1)]
