"""Bars of month files: chained timeframes equal the minutes' own bars bit for bit, and the
reconcile check reads the stored file back, so a corrupted one is caught and named; a file
changed behind its footer's back is moved aside and rebuilt."""

from __future__ import annotations

from datetime import date, timedelta

import polars as pl
import pyarrow.parquet as pq
import pytest

from candlestack.bars import BarBuilder, usable_minutes
from candlestack.ingest import Ingestor
from candlestack.lake import GAPS_KEY, REPORT_KEY, Lake, write_parquet_atomic
from candlestack.resample import SOURCE_TIMEFRAME, bars_per_day, resample
from candlestack.schema import BARS
from candlestack.sources.replay import ReplaySource
from tests.conftest import REPLAY_FILES

# The real BTC/USDT recording across a month boundary, the 284-minute maintenance gap of
# 2021-04-25 included (built here: the imputed share allowed is 25 %).
DAYS = [date(2021, 4, 21) + timedelta(days=i) for i in range(13)]  # to 2021-05-03
APRIL, MAY = date(2021, 4, 1), date(2021, 5, 1)
SHARE = 0.25
ORDER = ("5m", "1h", "10m", "4h", "1d")  # each source timeframe before the ones chained on it
CHAINED = ("10m", "4h", "1d")


def bits(frame: pl.DataFrame) -> dict[str, bytes]:
    """Each column's exact bytes (the decimals as text): equal means bit-identical."""
    return {
        c: (
            "\n".join(frame[c].cast(pl.String).to_list()).encode()
            if isinstance(frame[c].dtype, pl.Decimal)
            else frame[c].to_physical().to_numpy().tobytes()
        )
        for c in frame.columns
    }


@pytest.fixture
def lake(tmp_path_factory, shared_data) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("lake"))
    source = ReplaySource({"BTC/USDT": REPLAY_FILES["BTC/USDT"]})
    Ingestor(source, lake).ingest("BTC/USDT", DAYS)
    return lake


def build_all(lake: Lake, month: date) -> dict[str, dict[date, object]]:
    builder = BarBuilder(lake, "binance", SHARE)
    return {tf: {o.day: o for o in builder.build(tf, "BTC-USDT", month)} for tf in ORDER}


def direct(lake: Lake, timeframe: str, month: date) -> pl.DataFrame:
    """Bars resampled straight from the month's stored minutes."""
    usable = usable_minutes(lake, "binance", "BTC-USDT", month, SHARE)
    closed_end = max(map(usable.closed_end_ms, usable.reports))
    return resample(usable.minutes, timeframe, closed_end)


def corrupt_keeping_the_footer(path, change) -> None:
    """Rewrite a bar file's rows through `change`, its footer (reports, content hashes) as
    it was: a rebuild that trusted the footer would see nothing to do."""
    footer = {k: v for k, v in pq.read_schema(path).metadata.items() if k in (REPORT_KEY, GAPS_KEY)}
    write_parquet_atomic(path, change(pl.read_parquet(path)).to_arrow(), footer)


def build_changing_the_file_after_its_write(
    lake: Lake, timeframe: str, change, monkeypatch
) -> dict[date, object]:
    """Rebuild April's bars of a timeframe, the stored file's rows changed behind its
    footer's back between the write and the reconcile check's read-back of it."""
    path = lake.month_path("bars", "binance", timeframe, "BTC-USDT", APRIL)
    write_month = lake.write_month

    def write_then_change(*args):
        writes = write_month(*args)
        corrupt_keeping_the_footer(path, change)
        return writes

    monkeypatch.setattr(lake, "write_month", write_then_change)
    return {
        o.day: o for o in BarBuilder(lake, "binance", SHARE).build(timeframe, "BTC-USDT", APRIL)
    }


@pytest.mark.parametrize("month", [APRIL, MAY])
def test_chained_bars_equal_bars_straight_from_the_months_minutes(lake, month):
    outcomes = build_all(lake, month)
    days = [d for d in DAYS if d.month == month.month]

    # The maintenance day is built too: its 284 imputed minutes are in the bars.
    assert date(2021, 4, 25) in usable_minutes(lake, "binance", "BTC-USDT", APRIL, SHARE).reports
    for timeframe in ORDER:
        stored = lake.read_month("bars", "binance", timeframe, "BTC-USDT", month)
        assert list(stored.reports) == days, timeframe
        expected = direct(lake, timeframe, month)
        assert stored.frame.schema == BARS
        assert stored.frame.equals(expected), timeframe
        assert bits(stored.frame) == bits(expected), timeframe
        for day in days:
            outcome = outcomes[timeframe][day]
            assert outcome.skipped is None and outcome.mismatch is None, (timeframe, day)
            assert outcome.bars == bars_per_day(timeframe), (timeframe, day)
            report = stored.reports[day]
            assert report["source_timeframe"] == SOURCE_TIMEFRAME[timeframe]
            assert report["content_hash"] == outcome.content_hash
    if month == APRIL:
        # The maintenance window's 4h bar carries its imputed minutes, chained or not.
        four_h = lake.read_month("bars", "binance", "4h", "BTC-USDT", month)
        window = four_h.day(date(2021, 4, 25)).filter(pl.col("ts").dt.hour() == 4)
        assert window["n_imputed"].to_list() == [239]


def test_a_rebuild_of_unchanged_bars_writes_nothing_and_reconciles(lake):
    build_all(lake, APRIL)
    path = lake.month_path("bars", "binance", "10m", "BTC-USDT", APRIL)
    before = (path.stat().st_mtime_ns, path.read_bytes())

    again = BarBuilder(lake, "binance", SHARE).build("10m", "BTC-USDT", APRIL)

    assert all(o.mismatch is None and o.skipped is None for o in again)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


@pytest.mark.parametrize("timeframe", [*CHAINED, "5m"])
def test_a_corrupted_bar_file_is_caught_naming_the_column(lake, timeframe, monkeypatch):
    build_all(lake, APRIL)
    bad_day = date(2021, 4, 27)
    path = lake.month_path("bars", "binance", timeframe, "BTC-USDT", APRIL)
    row = pl.read_parquet(path)["ts"].dt.date().to_list().index(bad_day)  # its first bar

    outcomes = build_changing_the_file_after_its_write(
        lake,
        timeframe,
        lambda bars: bars.with_columns(
            close=pl.when(pl.int_range(pl.len()) == row)
            .then(pl.col("close") + 0.01)
            .otherwise("close")
        ),
        monkeypatch,
    )

    assert outcomes[bad_day].mismatch == "differs from the minutes in close"
    assert [d for d, o in outcomes.items() if o.mismatch] == [bad_day]


def test_a_bar_missing_from_a_chained_file_is_caught_with_the_counts(lake, monkeypatch):
    build_all(lake, APRIL)
    bad_day = date(2021, 4, 22)
    path = lake.month_path("bars", "binance", "4h", "BTC-USDT", APRIL)
    start = pl.read_parquet(path)["ts"].dt.date().to_list().index(bad_day)

    outcomes = build_changing_the_file_after_its_write(
        lake, "4h", lambda bars: bars.filter(pl.int_range(pl.len()) != start), monkeypatch
    )

    assert outcomes[bad_day].mismatch == "5 bars stored, 6 from the minutes"
    assert [d for d, o in outcomes.items() if o.mismatch] == [bad_day]


def test_chained_bars_built_on_corrupted_source_bars_are_caught(lake):
    """4h is built from the stored 1h bars: a wrong 1h high shows in the 4h reconcile."""
    build_all(lake, APRIL)
    bad_day = date(2021, 4, 29)
    source = lake.month_path("bars", "binance", "1h", "BTC-USDT", APRIL)
    row = pl.read_parquet(source)["ts"].dt.date().to_list().index(bad_day) + 2  # 02:00
    corrupt_keeping_the_footer(
        source,
        lambda bars: bars.with_columns(
            high=pl.when(pl.int_range(pl.len()) == row).then(pl.col("high") * 2).otherwise("high")
        ),
    )

    outcomes = {o.day: o for o in BarBuilder(lake, "binance", SHARE).build("4h", "BTC-USDT", APRIL)}

    assert outcomes[bad_day].mismatch == "differs from the minutes in high"
    assert [d for d, o in outcomes.items() if o.mismatch] == [bad_day]


def test_a_rebuild_moves_aside_a_bar_file_changed_behind_its_footer_and_writes_it_anew(lake):
    """Its footer is the one the rebuild would write, so the write used to be skipped and
    the changed rows kept; the rows no longer hash to the footer's content hashes."""
    build_all(lake, APRIL)
    path = lake.month_path("bars", "binance", "4h", "BTC-USDT", APRIL)
    corrupt_keeping_the_footer(path, lambda bars: bars.with_columns(pl.col("close") * 1.01))
    changed = path.read_bytes()

    outcomes = BarBuilder(lake, "binance", SHARE).build("4h", "BTC-USDT", APRIL)

    assert all(o.mismatch is None and o.skipped is None for o in outcomes)
    assert lake.read_month("bars", "binance", "4h", "BTC-USDT", APRIL).frame.equals(
        direct(lake, "4h", APRIL)
    )
    (moved,) = (lake.root / "_quarantine").rglob("data.parquet.*")
    assert moved.read_bytes() == changed
