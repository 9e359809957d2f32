"""The Parquet lake: idempotent, atomic writes, footer reports and file encodings."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import candlestack.lake as lake_module
from candlestack.catalog import build_catalog
from candlestack.errors import LakeError
from candlestack.gaps import fill, gap_report, missing_runs
from candlestack.ingest import day_start_ms
from candlestack.lake import Lake, content_hash, write_parquet_atomic
from candlestack.schema import CANDLES_1M, DAY_MS, GAPS
from candlestack.sources.replay import read_candle_file
from candlestack.validate import validate
from tests.conftest import OHLCV

REPO = Path(__file__).resolve().parents[2]
BTC = OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"
DAY = date(2021, 4, 25)  # holds the 284-minute maintenance gap


@pytest.fixture(scope="module")
def day_data() -> tuple[pl.DataFrame, dict, pl.DataFrame]:
    """Candles, report and gap table of one real day, as ingest would make them."""
    start = day_start_ms(DAY)
    clean, rejected = validate(read_candle_file(BTC), start, start + DAY_MS)
    runs = missing_runs(clean["ts"].to_numpy(), start, start + DAY_MS)
    candles = fill(clean, start, start + DAY_MS, previous_close=None)
    imputed = candles.filter("imputed")["ts"].dt.epoch("ms").to_numpy()
    gaps = gap_report(runs, candles["ts"].dt.epoch("ms").to_numpy(), imputed)
    report = {
        "expected": 1440,
        "rows": candles.height,
        "missing_found": int(gaps["minutes"].sum()),
        "refetched": 0,
        "imputed": int(imputed.size),
        "missing": 1440 - candles.height,
        "rejected": rejected.height,
        "first_ts": candles["ts"].min(),
        "last_ts": candles["ts"].max(),
        "source": "replay",
        "day_closed": True,
    }
    return candles, report, gaps


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


def path_of(lake: Lake, day: date = DAY) -> Path:
    return lake.candles_path("binance", "1m", "BTC-USDT", day)


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

    first = lake.write_partition(path, candles, report, gaps)
    before = (path.stat().st_mtime_ns, path.stat().st_ino, sha(path))
    second = lake.write_partition(path, candles.clone(), dict(report), gaps.clone())

    assert first.written is True
    assert second.written is False
    assert second.content_hash == first.content_hash
    assert second.bytes == first.bytes == path.stat().st_size
    assert (path.stat().st_mtime_ns, path.stat().st_ino, sha(path)) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]


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
    shifted = candles.with_columns(pl.col("ts") + pl.duration(milliseconds=1))
    assert content_hash(shifted) != base


def test_content_hash_of_file_read_back_equals_the_stored_hash(lake, day_data):
    candles, report, gaps = day_data
    result = lake.write_partition(path_of(lake), candles, report, gaps)

    back = lake.read(result.path)

    assert back.schema == CANDLES_1M
    assert back.equals(candles)
    assert content_hash(back) == result.content_hash
    assert lake.read_report(result.path)[0]["content_hash"] == result.content_hash


def test_changed_value_is_rewritten(lake, day_data):
    candles, report, gaps = day_data
    path = path_of(lake)
    first = lake.write_partition(path, candles, report, gaps)

    second = lake.write_partition(path, bump_one_close(candles), report, gaps)

    assert second.written is True
    assert second.content_hash != first.content_hash
    assert lake.read(path)["close"][700] == pytest.approx(candles["close"][700] + 0.01)
    assert lake.read_report(path)[0]["content_hash"] == second.content_hash


def test_changed_report_alone_is_rewritten_with_the_same_content_hash(lake, day_data):
    candles, report, gaps = day_data
    path = path_of(lake)
    first = lake.write_partition(path, candles, report, gaps)

    second = lake.write_partition(path, candles, {**report, "refetched": 3}, gaps)

    assert second.written is True
    assert second.content_hash == first.content_hash
    assert lake.read_report(path)[0]["refetched"] == 3


# --- footer report ----------------------------------------------------------------------


def test_read_report_round_trips_report_and_gaps(lake, day_data):
    candles, report, gaps = day_data
    result = lake.write_partition(path_of(lake), candles, report, gaps)

    stored_report, stored_gaps = lake.read_report(result.path)

    expected = json.loads(json.dumps({**report, "content_hash": result.content_hash}, default=str))
    assert stored_report == expected
    assert stored_report["first_ts"] == "2021-04-25 00:00:00+00:00"
    assert_frame_equal(stored_gaps, gaps)
    assert stored_gaps.schema == GAPS


def test_read_report_round_trips_an_empty_gap_table(lake, day_data):
    candles, report, _ = day_data
    no_gaps = gap_report([], np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    path = path_of(lake)
    lake.write_partition(path, candles, report, no_gaps)

    _, stored_gaps = lake.read_report(path)

    assert stored_gaps.is_empty()
    assert stored_gaps.schema == GAPS


def test_read_report_of_missing_file_is_none(lake):
    assert lake.read_report(path_of(lake)) is None
    assert lake.read(path_of(lake)) is None


def test_read_report_of_foreign_parquet_names_the_file(lake, day_data):
    path = path_of(lake)
    path.parent.mkdir(parents=True)
    day_data[0].write_parquet(path)

    with pytest.raises(LakeError, match="has no candlestack report") as info:
        lake.read_report(path)
    assert str(path) in str(info.value)


def test_torn_file_raises_lake_error_naming_it(lake, day_data):
    path = path_of(lake)
    lake.write_partition(path, *day_data)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(LakeError) as info:
        lake.read(path)
    assert str(path) in str(info.value)


def test_reports_lists_each_partition(lake, day_data):
    candles, report, gaps = day_data
    lake.write_partition(path_of(lake), candles, report, gaps)
    other = path_of(lake, date(2021, 4, 26))
    lake.write_partition(other, candles, {**report, "imputed": 0}, gaps)

    reports = lake.reports("binance")

    assert reports["date"].to_list() == [date(2021, 4, 25), date(2021, 4, 26)]
    assert reports["symbol"].to_list() == ["BTC-USDT"] * 2
    assert reports["imputed"].to_list() == [284, 0]
    assert reports["first_ts"].dt.epoch("ms").to_list() == [day_start_ms(DAY)] * 2


def test_reports_of_a_day_without_any_candle(lake, day_data):
    candles, report, gaps = day_data
    empty = candles.clear()
    lake.write_partition(
        path_of(lake),
        empty,
        {**report, "rows": 0, "missing": 1440, "first_ts": None, "last_ts": None},
        gaps,
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
    from pathlib import Path
    import polars as pl
    from candlestack.lake import Lake

    path = Path(sys.argv[1])
    lake = Lake(sys.argv[2])
    candles = lake.read(path)
    report, gaps = lake.read_report(path)
    report.pop("content_hash")
    changed = candles.with_columns(pl.col("close") * 1.01)
    os.replace = lambda *args, **kwargs: os._exit(1)  # power cut just before the rename
    lake.write_partition(path, changed, report, gaps)
    print("rename happened", flush=True)
    """
)


def test_crash_between_write_and_rename_keeps_the_previous_file(lake, day_data, tmp_path):
    candles, report, gaps = day_data
    path = path_of(lake)
    old = lake.write_partition(path, candles, report, gaps)
    old_sha = sha(path)

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), str(lake.root)],
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
    assert lake.read_report(path)[0]["content_hash"] == old.content_hash
    # The new content sits in a dot-prefixed temp file next to it ...
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1
    tmp = leftovers[0]
    assert tmp.name.startswith(".data.parquet.") and tmp.name.endswith(".tmp")
    assert pl.read_parquet(tmp)["close"][0] == pytest.approx(candles["close"][0] * 1.01)
    # ... which no reader of *.parquet sees.
    assert list(path.parent.glob("*.parquet")) == [path]
    assert [p for _, _, p in lake.candle_files("binance")] == [path]
    glob = str(lake.root / "ohlcv" / "**" / "*.parquet")
    with duckdb.connect() as con:
        seen = con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0]
    assert seen == 1440
    counts = build_catalog(lake, tmp_path / "catalog.duckdb")
    assert counts["ohlcv"] == 1440
    assert counts["partitions"] == 1
    # The next write goes through normally.
    again = lake.write_partition(path, bump_one_close(candles), report, gaps)
    assert again.written is True
    assert lake.read_report(path)[0]["content_hash"] == again.content_hash


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
    old = lake.write_partition(path, candles, report, gaps)
    old_sha = sha(path)

    monkeypatch.setattr(lake_module.pq, "write_table", partial_write_then(exc))
    with pytest.raises(type(exc)):
        lake.write_partition(path, bump_one_close(candles), report, gaps)
    monkeypatch.undo()

    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]
    assert sha(path) == old_sha
    assert lake.read_report(path)[0]["content_hash"] == old.content_hash


def test_failed_rename_leaves_no_temp_file(lake, day_data, monkeypatch):
    candles, report, gaps = day_data
    path = path_of(lake)
    lake.write_partition(path, candles, report, gaps)
    old_sha = sha(path)

    def refuse(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(lake_module.os, "replace", refuse)
    with pytest.raises(OSError, match="cross-device"):
        lake.write_partition(path, bump_one_close(candles), report, gaps)
    monkeypatch.undo()

    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]
    assert sha(path) == old_sha


def test_first_write_creates_the_partition_folders(tmp_path, day_data):
    path = tmp_path / "a" / "b" / "c" / "data.parquet"
    size = write_parquet_atomic(path, day_data[0].to_arrow(), {b"k": b"v"})

    assert size == path.stat().st_size
    assert pq.read_schema(path).metadata[b"k"] == b"v"


# --- file layout ----------------------------------------------------------------------


def test_partition_path_is_hive_style(lake):
    assert path_of(lake).relative_to(lake.root).as_posix() == (
        "ohlcv/exchange=binance/timeframe=1m/symbol=BTC-USDT/date=2021-04-25/data.parquet"
    )


def test_parquet_encodings_have_no_dictionary_delta_ts_and_split_floats(lake, day_data):
    result = lake.write_partition(path_of(lake), *day_data)

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
