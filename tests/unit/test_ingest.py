"""Ingest: partition invariance, gap repair figures, honest leading gaps, clock checks."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack import ingest
from candlestack.checks import gap_failure, ohlc_violations, quality
from candlestack.errors import SourceFormatError
from candlestack.ingest import Ingestor, PartitionOutcome, day_start_ms
from candlestack.lake import Lake
from candlestack.schema import DAY_MS, MINUTE_MS
from candlestack.sources.ccxt_source import CcxtSource
from candlestack.sources.replay import ReplaySource, read_candle_file
from candlestack.sources.synthetic import SyntheticSource
from tests.conftest import OHLCV

SYMBOL = "BTC/USDT"
DAYS = [date(2024, 1, 1) + timedelta(days=i) for i in range(10)]
SPAN = [date(2023, 12, 28) + timedelta(days=i) for i in range(7)]  # across a month boundary
NOW_S = day_start_ms(date(2024, 3, 1)) / 1000
BTC = OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"


class MidnightOutage(SyntheticSource):
    """Synthetic market whose first minutes of some days never exist (exchange maintenance),
    so those days need the previous day's close to be filled."""

    OUTAGE_MINUTES = 3

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        frame = super().fetch_candles(symbol, start_ms, end_ms)
        minute_of_day = (pl.col("ts") % DAY_MS) // MINUTE_MS
        odd_day = (pl.col("ts") // DAY_MS) % 2 == 1
        return frame.filter(~(odd_day & (minute_of_day < self.OUTAGE_MINUTES)))


class MidnightOutageLateClose(MidnightOutage):
    """As MidnightOutage, and each day's last minute is missing from the first answer that
    covers it (late on the exchange): the close that fills the next day's outage is only
    right if that minute is re-requested, whichever run the day is in."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.served_late: set[int] = set()

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        frame = super().fetch_candles(symbol, start_ms, end_ms)
        late = frame.filter((pl.col("ts") % DAY_MS) == DAY_MS - MINUTE_MS)["ts"].to_list()
        first_time = [ts for ts in late if ts not in self.served_late]
        self.served_late.update(first_time)
        return frame.filter(~pl.col("ts").is_in(first_time))


SOURCES = {
    "synthetic": SyntheticSource,
    "midnight-outage": MidnightOutage,
    "midnight-outage-late-close": MidnightOutageLateClose,
}


def ingestor(tmp_path: Path, kind: str = "synthetic", now_s: float = NOW_S) -> Ingestor:
    source = SOURCES[kind](seed=7, symbols=[SYMBOL], clock=lambda: now_s)
    return Ingestor(source, Lake(tmp_path))


def by_day(outcomes: list[PartitionOutcome]) -> dict[date, PartitionOutcome]:
    return {o.day: o for o in outcomes}


@pytest.fixture(scope="module")
def ten_days(tmp_path_factory) -> dict[date, PartitionOutcome]:
    return by_day(ingestor(tmp_path_factory.mktemp("range")).ingest(SYMBOL, DAYS))


def stored_days(lake: Lake) -> dict[date, tuple[pl.DataFrame, dict, pl.DataFrame]]:
    """Every stored day of the symbol: its rows, its footer report and its gap ranges."""
    days = {}
    for month in lake.month_files("ohlcv", "synthetic", "1m", "BTC-USDT"):
        stored = lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", month)
        for day, report in stored.reports.items():
            gaps = stored.gaps.filter(pl.col("gap_start").dt.date() == day)
            days[day] = (stored.day(day), report, gaps)
    return days


def month_bytes(lake: Lake) -> dict[date, bytes]:
    return {
        m: p.read_bytes()
        for m, p in lake.month_files("ohlcv", "synthetic", "1m", "BTC-USDT").items()
    }


@pytest.mark.parametrize("kind", SOURCES)
def test_a_day_does_not_depend_on_the_run_it_was_in(kind, tmp_path):
    """Each day's rows, report and gaps are the same whether it was ingested alone, in a
    range (across a month boundary), after the day before or split across runs; and a month
    file holding the same days is the same file, byte for byte."""
    in_range_ing = ingestor(tmp_path / "range", kind)
    in_range = by_day(in_range_ing.ingest(SYMBOL, SPAN))
    alone = {d: ingestor(tmp_path / f"alone-{d}", kind) for d in SPAN}
    alone_outcomes = {d: ing.ingest(SYMBOL, [d])[0] for d, ing in alone.items()}
    sequential = ingestor(tmp_path / "sequential", kind)
    after_previous = {d: sequential.ingest(SYMBOL, [d])[0] for d in SPAN}
    split = ingestor(tmp_path / "split", kind)
    # Split inside a month, not at its boundary: both runs write to December's file.
    in_two_runs = by_day(split.ingest(SYMBOL, SPAN[:2]) + split.ingest(SYMBOL, SPAN[2:]))

    if kind.startswith("midnight-outage"):
        # The outage days really were filled from the previous day's close.
        assert sum(o.report["imputed"] >= 3 for o in in_range.values()) >= 4
    reference = stored_days(in_range_ing.lake)
    assert list(reference) == SPAN
    for day in SPAN:
        ref = in_range[day]
        for other in (alone_outcomes[day], after_previous[day], in_two_runs[day]):
            assert other.report["content_hash"] == ref.report["content_hash"], day
            assert other.report == ref.report, day
            assert_frame_equal(other.gaps, ref.gaps)
        rows, report, gaps = reference[day]
        assert report == {
            **ref.report,
            "first_ts": str(ref.report["first_ts"]),
            "last_ts": str(ref.report["last_ts"]),
        }, day
        assert_frame_equal(gaps, ref.gaps)
        for lake in (alone[day].lake, sequential.lake, split.lake):
            other_rows, other_report, other_gaps = stored_days(lake)[day]
            assert_frame_equal(other_rows, rows, check_exact=True)
            assert other_report == report, day
            assert_frame_equal(other_gaps, gaps)
    # The same days in a month: the same month files.
    files = month_bytes(in_range_ing.lake)
    assert list(files) == [date(2023, 12, 1), date(2024, 1, 1)]
    assert month_bytes(sequential.lake) == files
    assert month_bytes(split.lake) == files


@pytest.mark.parametrize("kind", SOURCES)
def test_a_long_range_is_fetched_a_bounded_stream_at_a_time(kind, tmp_path, monkeypatch):
    """Memory is bounded by the stream, not the range; the files are those of one stream."""
    one_stream = by_day(ingestor(tmp_path / "one", kind).ingest(SYMBOL, DAYS))
    monkeypatch.setattr(ingest, "MAX_STREAM_DAYS", 3)
    streamed = ingestor(tmp_path / "streams", kind)
    spans = []
    fetch = streamed.source.fetch_candles
    monkeypatch.setattr(
        streamed.source,
        "fetch_candles",
        lambda symbol, start, end: spans.append(end - start) or fetch(symbol, start, end),
    )
    outcomes = by_day(streamed.ingest(SYMBOL, DAYS))
    assert max(spans) <= 3 * DAY_MS
    assert {d: o.path.read_bytes() for d, o in outcomes.items()} == {
        d: o.path.read_bytes() for d, o in one_stream.items()
    }


def test_ingest_is_idempotent(tmp_path):
    ing = ingestor(tmp_path)
    first = ing.ingest(SYMBOL, DAYS[:3])
    path = first[0].path
    assert {o.path for o in first} == {path}  # one month file

    second = ing.ingest(SYMBOL, DAYS[:3])

    assert [o.report["content_hash"] for o in second] == [o.report["content_hash"] for o in first]
    # The second pass sees the once-withheld minutes at once, so only the gap table differs.
    for a, b in zip(first, second, strict=True):
        assert b.report["rows"] == a.report["rows"]
        assert b.report["imputed"] == a.report["imputed"]
        assert b.report["refetched"] == 0
    # A third pass finds exactly what the second stored: the file is not touched.
    before = (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes())
    third = ing.ingest(SYMBOL, DAYS[:3])
    assert [o.report for o in third] == [o.report for o in second]
    assert not any(o.write.written for o in third)
    assert (path.stat().st_mtime_ns, path.stat().st_ino, path.read_bytes()) == before


def test_a_final_day_is_never_fetched_again(tmp_path, monkeypatch):
    ing = ingestor(tmp_path)
    first = by_day(ing.ingest(SYMBOL, DAYS[:4]))
    final = [d for d, o in first.items() if ingest.is_final(o.report)]
    redone = [d for d in first if d not in final]
    assert final and redone, "the synthetic days should include both kinds"
    asked = []
    fetch = ing.source.fetch_candles
    monkeypatch.setattr(
        ing.source,
        "fetch_candles",
        lambda symbol, start, end: asked.append((start, end)) or fetch(symbol, start, end),
    )

    second = by_day(ing.ingest(SYMBOL, DAYS[:4]))

    for day in final:
        start = day_start_ms(day)
        # No request for any minute of the day (a lookback for the next day's first close
        # aside: only its last minutes could be asked for, and no day here needs it).
        assert not [(a, b) for a, b in asked if a < start + DAY_MS and b > start], day
        assert second[day].write.written is False
        assert second[day].report == first[day].report
        assert second[day].path == first[day].path
        assert_frame_equal(second[day].gaps, first[day].gaps)
    for day in redone:
        start = day_start_ms(day)
        assert [(a, b) for a, b in asked if a < start + DAY_MS and b > start], day
        assert second[day].report["content_hash"] == first[day].report["content_hash"]


def test_imputed_share_stays_under_one_percent(ten_days):
    reports = [o.report for o in ten_days.values()]
    imputed = sum(r["imputed"] for r in reports)
    expected = sum(r["expected"] for r in reports)

    assert expected == 10 * 1440
    assert 0 < imputed / expected < 0.01
    # Withheld minutes were recovered by re-requesting, not imputed.
    assert sum(r["refetched"] for r in reports) > 0
    for r in reports:
        assert r["rows"] == 1440 and r["missing"] == 0 and r["rejected"] == 0
        assert r["missing_found"] == r["refetched"] + r["imputed"]
        assert gap_failure(r, imputed_max_share=0.01) is None
        assert r["day_closed"] is True and r["source"] == "synthetic"


def test_stored_days_are_complete_and_consistent(ten_days):
    (path,) = {o.path for o in ten_days.values()}
    month = pl.read_parquet(path)
    # The month file holds the ten days and nothing else, in time order.
    assert month["ts"].dt.date().unique(maintain_order=True).to_list() == DAYS
    assert month["ts"].is_sorted()
    assert month.height == sum(o.report["rows"] for o in ten_days.values())
    for day, outcome in ten_days.items():
        stored = month.filter(pl.col("ts").dt.date() == day)
        start = day_start_ms(day)
        assert stored["ts"].dt.epoch("ms").to_list() == list(
            range(start, start + DAY_MS, MINUTE_MS)
        )
        assert set(ohlc_violations(stored, start).values()) == {0}
        imputed = stored.filter("imputed")
        assert imputed.height == outcome.report["imputed"]
        assert (imputed["volume"] == 0).all()
        assert (imputed["open"] == imputed["close"]).all()
        assert int(outcome.gaps["imputed"].sum()) == imputed.height


def test_leading_minutes_before_the_recording_stay_missing(tmp_path):
    source = ReplaySource({SYMBOL: BTC})
    first, second = Ingestor(source, Lake(tmp_path)).ingest(
        SYMBOL, [date(2021, 4, 20), date(2021, 4, 21)]
    )

    start = day_start_ms(date(2021, 4, 20))
    recording_starts = start + (20 * 60 + 42) * MINUTE_MS
    assert first.path == second.path
    stored = pl.read_parquet(first.path).filter(pl.col("ts").dt.date() == date(2021, 4, 20))
    assert stored["ts"].dt.epoch("ms").min() == recording_starts
    assert stored.height == first.report["rows"] == 198
    assert not stored["imputed"].any()
    assert first.report["missing"] == 1242
    assert first.report["imputed"] == 0
    gaps = first.gaps.with_columns(pl.col("gap_start", "gap_end").dt.epoch("ms")).rows()
    assert gaps == [(start, recording_starts - MINUTE_MS, 1242, 0, 0, 1242)]
    assert gap_failure(first.report, 0.01) == "1242 minutes still missing"
    assert quality(first.report) == "missing"
    # The next day is complete and real.
    assert second.report["rows"] == 1440 and second.report["missing"] == 0
    assert quality(second.report) == "complete"


def test_maintenance_gap_is_imputed_at_the_last_close(tmp_path):
    day = date(2021, 4, 25)
    (outcome,) = Ingestor(ReplaySource({SYMBOL: BTC}), Lake(tmp_path)).ingest(SYMBOL, [day])

    stored = pl.read_parquet(outcome.path).with_columns(pl.col("ts").dt.epoch("ms"))
    start = day_start_ms(day)
    gap_first, gap_last = start + 241 * MINUTE_MS, start + 524 * MINUTE_MS
    before = stored.filter(pl.col("ts") == gap_first - MINUTE_MS).row(0, named=True)
    flat = stored.filter(pl.col("ts").is_between(gap_first, gap_last))
    assert flat.height == 284
    assert flat["imputed"].all()
    assert flat.select("open", "high", "low", "close").unique().rows() == [(before["close"],) * 4]
    assert outcome.report["imputed"] == 284 and outcome.report["missing"] == 0
    assert "imputed share" in gap_failure(outcome.report, 0.01)


# --- timestamps in the wrong unit ------------------------------------------------------


def recording_csv(frame: pl.DataFrame, path: Path) -> Path:
    frame.rename({"ts": "ts_ms"}).write_csv(path)
    return path


def test_a_row_in_seconds_is_rejected_and_counted_on_its_own_day(tmp_path):
    days = [date(2021, 4, 21), date(2021, 4, 22)]
    stray = day_start_ms(days[1]) + 12 * 60 * MINUTE_MS
    candles = read_candle_file(BTC)
    in_seconds = pl.when(pl.col("ts") == stray).then(pl.col("ts") // 1000)
    path = recording_csv(candles.with_columns(ts=in_seconds.otherwise("ts")), tmp_path / "btc.csv")

    first, second = Ingestor(ReplaySource({SYMBOL: path}), Lake(tmp_path / "lake")).ingest(
        SYMBOL, days
    )

    assert first.report["rejected"] == 0
    assert second.report["rejected"] == 1
    assert second.rejected.select("ts", "reason").rows() == [
        (stray // 1000, "timestamp in seconds")
    ]
    # Its minute is missing like any other: asked for again (in vain), then imputed.
    assert second.report["missing_found"] == 1 and second.report["imputed"] == 1


def test_a_recording_in_seconds_is_refused_naming_the_file(tmp_path):
    candles = read_candle_file(BTC).with_columns(pl.col("ts") // 1000)
    path = recording_csv(candles, tmp_path / "btc_seconds.csv")
    lake = tmp_path / "lake"

    with pytest.raises(SourceFormatError, match="timestamps look like seconds") as info:
        Ingestor(ReplaySource({SYMBOL: path}), Lake(lake)).ingest(SYMBOL, [date(2021, 4, 22)])
    assert str(path) in str(info.value)
    assert not list(lake.rglob("*.parquet"))


def test_a_ccxt_row_in_microseconds_is_rejected_not_dropped(tmp_path):
    """An exchange that answers one minute in µs: the row reaches validation, is refused and
    counted, and its minute is re-requested."""
    day = date(2021, 4, 22)
    start = day_start_ms(day)
    stray = start + 600 * MINUTE_MS
    candles = read_candle_file(BTC).filter(pl.col("ts").is_between(start, start + DAY_MS, "left"))
    answers = [list(r) for r in candles.rows()]
    answers[600][0] = stray * 1000

    def fetch_ohlcv(symbol, timeframe, since, limit, params):
        # The exchange answers the minute's request with the row, its time in µs.
        def minute(ts: int) -> int:
            return stray if ts == stray * 1000 else ts

        return [r for r in answers if since <= minute(r[0]) <= params["until"]][:limit]

    source = CcxtSource("binance")
    source.client.load_markets = lambda: {SYMBOL: {}}
    source.client.markets = {SYMBOL: {}}
    source.client.fetch_ohlcv = fetch_ohlcv
    source.client.milliseconds = lambda: start + 2 * DAY_MS
    source.page_limit = 1_440

    (outcome,) = Ingestor(source, Lake(tmp_path)).ingest(SYMBOL, [day])

    assert outcome.rejected.select("ts", "reason").rows() == [
        (stray * 1000, "timestamp in microseconds")
    ]
    assert outcome.report["rejected"] == 1
    assert outcome.report["missing_found"] == 1 and outcome.report["imputed"] == 1


def test_a_day_not_started_yet_is_refused_by_name(tmp_path):
    now_s = day_start_ms(date(2024, 1, 5)) / 1000 + 12 * 3600
    ing = ingestor(tmp_path, now_s=now_s)

    with pytest.raises(ValueError, match=r"BTC/USDT 2024-01-06"):
        ing.ingest(SYMBOL, [date(2024, 1, 4), date(2024, 1, 5), date(2024, 1, 6)])
    assert not list(tmp_path.rglob("*.parquet"))

    with pytest.raises(ValueError, match="2024-01-09"):
        ing.ingest(SYMBOL, [date(2024, 1, 9)])


def test_today_is_ingested_up_to_the_last_closed_minute_and_topped_up(tmp_path):
    day = date(2024, 1, 5)
    start = day_start_ms(day)
    clock = [start / 1000 + 6 * 3600 + 30]  # 06:00:30
    source = SyntheticSource(seed=7, symbols=[SYMBOL], clock=lambda: clock[0])
    ing = Ingestor(source, Lake(tmp_path / "lake"))

    (morning,) = ing.ingest(SYMBOL, [day])
    assert morning.report["day_closed"] is False
    assert morning.report["expected"] == morning.report["rows"] == 360
    assert pl.read_parquet(morning.path)["ts"].dt.epoch("ms").max() == start + 359 * MINUTE_MS

    clock[0] = start / 1000 + 18 * 3600 + 30
    (evening,) = ing.ingest(SYMBOL, [day])
    fresh = ingestor(tmp_path / "fresh", now_s=clock[0]).ingest(SYMBOL, [day])[0]
    assert evening.report["expected"] == evening.report["rows"] == 1080
    assert evening.report["content_hash"] == fresh.report["content_hash"]


def test_an_open_month_is_topped_up_and_the_closed_month_left_alone(tmp_path):
    """January is closed; February is open up to 06:00 on the 3rd. A minute later the open
    month's file gains exactly the minute that closed, and January's file is not touched,
    whether the run asks for the open month alone or for the whole range again."""
    january = [date(2024, 1, 29)]  # stored with every minute real: final
    february = [date(2024, 2, 1), date(2024, 2, 2), date(2024, 2, 3)]
    today = day_start_ms(february[-1])
    clock = [today / 1000 + 6 * 3600 + 30]  # 06:00:30: 05:59 is the last closed minute
    source = SyntheticSource(seed=7, symbols=[SYMBOL], clock=lambda: clock[0])
    ing = Ingestor(source, Lake(tmp_path / "lake"))
    first = by_day(ing.ingest(SYMBOL, january + february))
    jan_file, feb_file = first[january[0]].path, first[february[0]].path
    assert jan_file != feb_file
    assert ingest.is_final(first[january[0]].report)
    assert first[february[-1]].report["day_closed"] is False
    assert first[february[-1]].report["expected"] == first[february[-1]].report["rows"] == 360
    jan_before = (jan_file.stat().st_mtime_ns, jan_file.stat().st_ino, jan_file.read_bytes())
    feb_before = ing.lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", february[0])

    clock[0] += 60  # 06:01:30: the 06:00 minute has closed
    second = by_day(ing.ingest(SYMBOL, february))
    feb_after = ing.lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", february[0])

    assert (jan_file.stat().st_mtime_ns, jan_file.stat().st_ino, jan_file.read_bytes()) == (
        jan_before
    )
    assert set(second) == set(february)
    assert feb_after.frame.height == feb_before.frame.height + 1
    new = feb_after.frame.join(feb_before.frame, on="ts", how="anti")
    assert new["ts"].dt.epoch("ms").to_list() == [today + 360 * MINUTE_MS]
    # Every minute stored before is stored unchanged.
    assert_frame_equal(
        feb_after.frame.filter(pl.col("ts").is_in(feb_before.frame["ts"].implode())),
        feb_before.frame,
        check_exact=True,
    )
    for day in february[:2]:
        assert feb_after.reports[day]["content_hash"] == feb_before.reports[day]["content_hash"]
    open_day = second[february[-1]].report
    assert open_day["expected"] == open_day["rows"] == 361
    assert open_day["day_closed"] is False
    # The topped-up month is what a first ingest at this minute gives.
    fresh = ingestor(tmp_path / "fresh", now_s=clock[0])
    fresh_days = by_day(fresh.ingest(SYMBOL, february))
    fresh_month = fresh.lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", february[0])
    assert_frame_equal(feb_after.frame, fresh_month.frame, check_exact=True)
    for day in february:
        assert second[day].report["content_hash"] == fresh_days[day].report["content_hash"]

    # The whole range again, a minute later still: January is neither fetched nor written.
    clock[0] += 60
    third = by_day(ing.ingest(SYMBOL, january + february))
    assert third[january[0]].write.written is False
    assert (jan_file.stat().st_mtime_ns, jan_file.stat().st_ino, jan_file.read_bytes()) == (
        jan_before
    )
    assert third[february[-1]].report["rows"] == 362
