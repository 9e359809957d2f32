"""Ingesting 1-minute candles for symbol-days: fetch, validate, re-request gaps, impute, write."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl

from candlestack.config import symbol_key
from candlestack.gaps import (
    PREVIOUS_CLOSE_LOOKBACK_MS,
    fill,
    gap_report,
    missing_runs,
    request_windows,
)
from candlestack.lake import DayData, Lake, LakePath, StoredMonth, WriteResult, month_of
from candlestack.schema import DAY_MS, MINUTE_MS, RAW_CANDLES, REJECTED, REVISIONS, TS, day_start_ms
from candlestack.sources.base import CandleSource
from candlestack.validate import describe_rejections, intended_epoch_ms, validate

log = logging.getLogger(__name__)

# One page on the exchanges we know: a re-request window needs a single call.
REFETCH_WINDOW_MINUTES = 1000
# Days fetched in one stream: a whole year at once held ~160 MiB more than a month, so memory
# grew with the days of a backfill; days are written as they finish, a stream at a time.
MAX_STREAM_DAYS = 31


@dataclass(frozen=True)
class PartitionOutcome:
    symbol: str
    day: date
    path: LakePath  # the month file holding the day
    report: dict
    gaps: pl.DataFrame
    rejected: pl.DataFrame
    revisions: pl.DataFrame  # stored candles this run found revised by the source
    write: WriteResult


def contiguous_runs(days: Iterable[date]) -> list[list[date]]:
    runs: list[list[date]] = []
    for day in sorted(set(days)):
        if runs and (day - runs[-1][-1]).days == 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return runs


def _in(frame: pl.DataFrame, start_ms: int, end_ms: int) -> pl.DataFrame:
    return frame.filter(pl.col("ts").is_between(start_ms, end_ms, closed="left"))


def is_final(report: dict) -> bool:
    """A closed day stored with every minute real: the exchange's history of it cannot change,
    so it is never fetched again. Open days and days with imputed or missing minutes are
    re-requested by every run of their month."""
    return bool(report["day_closed"]) and not report["missing"] and not report["imputed"]


class Ingestor:
    """Ingests one symbol's days from a source into the lake, a month file at a time.

    A contiguous run of days is fetched as paginated streams of up to MAX_STREAM_DAYS
    (a year is ~540 requests at 1,000 candles a page, not 365 x 2); then each day is
    checked and repaired on its own, so every day's rows and report depend only on the
    source, never on which other days were in the same run; each month's days are then
    written in one atomic write of its file.
    """

    def __init__(self, source: CandleSource, lake: Lake, refetch_attempts: int = 2) -> None:
        self.source = source
        self.lake = lake
        self.refetch_attempts = refetch_attempts
        self._repair = DayRepair(self._fetch, source.kind, refetch_attempts)
        # Made once: an empty polars frame costs ~0.5 ms, and a year has 365 days.
        self._no_candles = pl.DataFrame(schema=RAW_CANDLES)
        self._no_rejected = pl.DataFrame(schema=REJECTED)
        self._no_revisions = pl.DataFrame(schema=REVISIONS)

    def path(self, symbol: str, day: date) -> LakePath:
        return self.lake.month_path("ohlcv", self.source.exchange, "1m", symbol_key(symbol), day)

    def days_to_ingest(self, symbol: str, days: Sequence[date]) -> list[date]:
        """Of `days`, those the source can have: started by its clock (a closed minute), and
        inside a recording's whole days (a replay source's `covered_days`)."""
        closed_end = self.source.now_ms() // MINUTE_MS * MINUTE_MS
        covered = getattr(self.source, "covered_days", None)
        first, last = covered(symbol) or (None, None) if covered else (None, None)
        return [
            day
            for day in days
            if day_start_ms(day) < closed_end and (first is None or first <= day <= last)
        ]

    def ingest(
        self, symbol: str, days: Sequence[date], keep_closed: bool = False, finalise: bool = True
    ) -> list[PartitionOutcome]:
        """Ingest `days`, each month's in one write of its file. Final days are kept as
        stored; with `keep_closed` (the minutely top-up of the open month) every day stored
        closed is, so a minute fetches the open day and any day not yet stored closed, and
        its work does not grow with the day of the month.

        Without `finalise` (the live collector's write of a streamed close), a day whose
        last minute has closed is topped up like the open day, and stored as not closed: its
        re-fetch in full, which records the exchange's revisions, is left to a later pass
        (the collector's own, right after; or the schedules'), off the close's path."""
        closed_end = self.source.now_ms() // MINUTE_MS * MINUTE_MS
        not_started = sorted(d for d in days if day_start_ms(d) >= closed_end)
        if not_started:
            raise ValueError(f"{symbol} {not_started[0]}: the day has no closed minute yet")
        by_month: dict[date, list[date]] = {}
        for day in sorted(set(days)):
            by_month.setdefault(month_of(day), []).append(day)
        outcomes, key = [], symbol_key(symbol)
        for month, month_days in by_month.items():
            # Read, merged and written under the month's lock: the live collector writes the
            # open month too, and neither may write over minutes the other stored meanwhile.
            with self.lake.month_lock("ohlcv", self.source.exchange, "1m", key, month):
                outcomes.extend(
                    self._ingest_month(symbol, month, month_days, closed_end, keep_closed, finalise)
                )
        return outcomes

    def _ingest_month(
        self,
        symbol: str,
        month: date,
        days: list[date],
        closed_end: int,
        keep_closed: bool,
        finalise: bool,
    ) -> list[PartitionOutcome]:
        exchange, key = self.source.exchange, symbol_key(symbol)
        # Re-hashed: a re-fetched day is merged with the stored rows, and final days are
        # kept as they are, so both must be the rows the footer vouches for.
        stored = self.lake.read_month("ohlcv", exchange, "1m", key, month, rehash=True)
        stored_reports = stored.reports if stored else {}
        final = [
            d
            for d in days
            if d in stored_reports
            and (is_final(stored_reports[d]) or (keep_closed and stored_reports[d]["day_closed"]))
        ]
        finished: list[tuple[date, DayData, pl.DataFrame, pl.DataFrame]] = []
        for run in contiguous_runs(set(days) - set(final)):
            for first in range(0, len(run), MAX_STREAM_DAYS):
                stream = run[first : first + MAX_STREAM_DAYS]
                finished.extend(self._ingest_run(symbol, stream, closed_end, stored, finalise))
        writes = self.lake.write_month(
            "ohlcv",
            exchange,
            "1m",
            key,
            month,
            {day: data for day, data, *_ in finished},
            stored=stored,
        )
        outcomes = [
            _outcome(symbol, day, data, rejected, revised, writes[day])
            for day, data, rejected, revised in finished
        ]
        path = self.path(symbol, month)
        # Built once, not per kept day: a polars frame costs ~0.5 ms to make, and a top-up
        # keeps up to 30 days.
        size = path.stat().st_size if final else 0
        no_rows = pl.DataFrame()
        gaps = stored.gaps if final and stored.gaps is not None else None
        gaps_by_day = (
            {
                day_key[0]: frame.drop("_day")
                for day_key, frame in gaps.with_columns(_day=pl.col("gap_start").dt.date())
                .partition_by("_day", as_dict=True)
                .items()
            }
            if gaps is not None
            else {}
        )
        no_gaps = gaps.clear() if gaps is not None else None
        for day in final:
            # As a fetched day reports it: the footer's JSON keeps the times as text.
            report = {
                **stored_reports[day],
                **{
                    k: datetime.fromisoformat(v)
                    for k in ("first_ts", "last_ts")
                    if isinstance(v := stored_reports[day][k], str)
                },
            }
            write = WriteResult(path, size, report["content_hash"], written=False)
            kept = DayData(no_rows, report, gaps_by_day.get(day, no_gaps))
            outcomes.append(
                _outcome(symbol, day, kept, self._no_rejected, self._no_revisions, write)
            )
        return sorted(outcomes, key=lambda o: o.day)

    def _fetch(self, symbol: str, start_ms: int, end_ms: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        if start_ms >= end_ms:
            return self._no_candles, self._no_rejected
        return validate(self.source.fetch_candles(symbol, start_ms, end_ms), start_ms, end_ms)

    def _stored_real(self, stored: StoredMonth | None, day: date) -> pl.DataFrame:
        if stored is None or day not in stored.reports:
            return self._no_candles
        real = stored.day(day).filter(~pl.col("imputed")).drop("imputed")
        return real.with_columns(pl.col("ts").dt.epoch("ms")).cast(RAW_CANDLES)

    def _ingest_run(
        self,
        symbol: str,
        run: list[date],
        closed_end: int,
        stored: StoredMonth | None,
        finalise: bool,
    ) -> list[tuple[date, DayData, pl.DataFrame, pl.DataFrame]]:
        run_start = day_start_ms(run[0])
        run_end = min(day_start_ms(run[-1]) + DAY_MS, closed_end)
        # Each day's stored real candles, made once: the top-up and the day's merge both use
        # the open day's.
        stored_reals = {day: self._stored_real(stored, day) for day in run}
        if run_end < day_start_ms(run[-1]) + DAY_MS or not finalise:
            # The open day is topped up: real candles stored by the previous pass are kept
            # and only the minutes from the newest of them on are asked for. The newest is
            # asked for again, so a candle stored while still forming (a clock ahead of the
            # exchange's) is replaced by its final values.
            open_start = day_start_ms(run[-1])
            kept = stored_reals[run[-1]]
            fetch_from_open_day = int(kept["ts"].max()) if kept.height else open_start
            closed_part = self._fetch(symbol, run_start, open_start)
            open_part = self._fetch(symbol, fetch_from_open_day, run_end)
            clean = (
                pl.concat([closed_part[0], open_part[0], kept])
                .unique("ts", keep="first", maintain_order=True)
                .sort("ts")
            )
            rejected = pl.concat([closed_part[1], open_part[1]])
        else:
            clean, rejected = self._fetch(symbol, run_start, run_end)
        # Rows the source sent for the wrong time are charged to the nearest day asked for
        # (a row in the wrong unit: the nearest to the minute it stands for).
        at = intended_epoch_ms(pl.col("ts"))
        rejected = rejected.with_columns(
            _day=at.fill_null(run_start).clip(run_start, run_end - 1) // DAY_MS
        )

        finished = []
        previous: pl.DataFrame | None = None
        for day in run:
            start = day_start_ms(day)
            end = min(start + DAY_MS, closed_end)
            fetched = _in(clean, start, end)
            stored_real = stored_reals[day]
            # Nothing stored (a backfill's days): nothing to revise, and no join to pay for.
            revisions = (
                _revisions(fetched, stored_real) if stored_real.height else self._no_revisions
            )
            if revisions.height and not stored.reports[day]["day_closed"]:
                # The newest real candle of a day stored open may have been stored while
                # forming: its final values are not a revision.
                forming = stored_real["ts"].max()
                revisions = revisions.filter(pl.col("ts").dt.epoch("ms") != forming)
            data, rejected_rows, real = self._repair.finish_day(
                symbol,
                day,
                start,
                end,
                fetched,
                rejected.filter(pl.col("_day") == start // DAY_MS).drop("_day"),
                previous,
                stored_real,
                finalise,
            )
            earlier = stored.day_revisions(day) if stored is not None else self._no_revisions
            data = DayData(
                data.frame,
                {**data.report, "revised": earlier.height + revisions.height},
                data.gaps,
                pl.concat([earlier, revisions]) if revisions.height else earlier,
            )
            previous = real
            finished.append((day, data, rejected_rows, revisions))
        return finished


class DayRepair:
    """One day's candles made whole: its missing minutes re-requested (bounded attempts),
    what the source still lacks imputed at the previous close, and its report."""

    def __init__(
        self,
        fetch: Callable[[str, int, int], tuple[pl.DataFrame, pl.DataFrame]],
        kind: str,
        refetch_attempts: int,
    ) -> None:
        self._fetch = fetch  # (symbol, start ms, end ms) -> (clean, rejected), validated
        self.kind = kind
        self.refetch_attempts = refetch_attempts

    def _previous_close(
        self, symbol: str, start: int, previous_day_real: pl.DataFrame | None
    ) -> float | None:
        """Last real close in the lookback before `start`.

        The day before, when this run just repaired it, answers; otherwise the source is
        asked, and the minutes missing at the end of its answer are re-requested as the
        day's own repair would have. Both give the same answer, so a day never depends on
        the run it was in.
        """
        lookback = start - PREVIOUS_CLOSE_LOOKBACK_MS
        if previous_day_real is None:
            previous_day_real, _ = self._fetch(symbol, lookback, start)
            for _ in range(self.refetch_attempts):
                runs = missing_runs(previous_day_real["ts"].to_numpy(), lookback, start)
                if not runs or runs[-1][1] != start - MINUTE_MS:
                    break
                *_, (window_start, window_end) = request_windows(runs[-1:], REFETCH_WINDOW_MINUTES)
                found, _ = self._fetch(symbol, window_start, window_end)
                previous_day_real = pl.concat([previous_day_real, found]).sort("ts")
        window = _in(previous_day_real, lookback, start)
        return float(window["close"][-1]) if window.height else None

    def finish_day(
        self,
        symbol: str,
        day: date,
        start: int,
        end: int,
        clean: pl.DataFrame,
        rejected: pl.DataFrame,
        previous_day_real: pl.DataFrame | None,
        stored_real: pl.DataFrame,
        finalise: bool,
    ) -> tuple[DayData, pl.DataFrame, pl.DataFrame]:
        """The day's candles, report and gaps, its rejected rows, and its real candles.

        What is stored is never replaced by less: a stored real candle the source no longer
        delivers (missing, or refused by validation) is kept, never imputed over; the
        source's valid candles win (a changed one is a revision, recorded by the caller)."""
        fetched = clean
        if stored_real.height:
            clean = (
                pl.concat([clean, stored_real])
                .unique("ts", keep="first", maintain_order=True)
                .sort("ts")
            )
        kept = clean.height - fetched.height
        first_pass = missing_runs(clean["ts"].to_numpy(), start, end)
        runs = first_pass
        # A source that had no row at all for the day, good or bad, proved it empty with
        # the one request: asking again, or for the close before it, proves nothing more.
        proven_empty = clean.is_empty() and rejected.is_empty()
        for _ in range(0 if proven_empty else self.refetch_attempts):
            if not runs:
                break
            recovered = []
            for window_start, window_end in request_windows(runs, REFETCH_WINDOW_MINUTES):
                found, refused = self._fetch(symbol, window_start, window_end)
                recovered.append(found)
                rejected = pl.concat([rejected, refused])
            clean = pl.concat([clean, *recovered]).unique("ts", keep="first").sort("ts")
            runs = missing_runs(clean["ts"].to_numpy(), start, end)
        # A bad row served again on re-request is still one bad row.
        rejected = rejected.unique(maintain_order=True)

        previous_close = None
        if runs and runs[0][0] == start and not proven_empty:
            previous_close = self._previous_close(symbol, start, previous_day_real)
        candles = fill(clean, start, end, previous_close)
        imputed = candles.filter("imputed")["ts"].dt.epoch("ms").to_numpy()
        gaps = gap_report(first_pass, candles["ts"].dt.epoch("ms").to_numpy(), imputed)
        missing_found = int(gaps["minutes"].sum())
        real = candles.height - int(imputed.size)
        report = {
            "expected": (end - start) // MINUTE_MS,
            "rows": candles.height,
            "missing_found": missing_found,
            "refetched": int(gaps["refetched"].sum()),
            "imputed": int(imputed.size),
            "missing": (end - start) // MINUTE_MS - candles.height,
            "rejected": rejected.height,
            "real": real,
            "zero_volume": candles.filter(~pl.col("imputed") & (pl.col("volume") == 0)).height,
            "kept": kept,
            "first_ts": candles["ts"].min(),
            "last_ts": candles["ts"].max(),
            "source": self.kind,
            "day_closed": end == start + DAY_MS and finalise,
        }
        return DayData(candles, report, gaps), rejected, clean


def _revisions(fetched: pl.DataFrame, stored_real: pl.DataFrame) -> pl.DataFrame:
    """Stored real candles the source now delivers with other values, old beside new."""
    values = ("open", "high", "low", "close", "volume")
    both = fetched.join(stored_real, on="ts", suffix="_stored")
    changed = both.filter(pl.any_horizontal(pl.col(c) != pl.col(f"{c}_stored") for c in values))
    return changed.select(
        pl.col("ts").cast(TS),
        *(pl.col(f"{c}_stored").alias(f"old_{c}") for c in values),
        *values,
        revised_at=pl.lit(datetime.now(UTC)).cast(TS),
    ).match_to_schema(REVISIONS)


def _outcome(
    symbol: str,
    day: date,
    data: DayData,
    rejected: pl.DataFrame,
    revisions: pl.DataFrame,
    write: WriteResult,
) -> PartitionOutcome:
    report = {**data.report, "content_hash": write.content_hash}
    missing_found = report["missing_found"]
    log.info(
        "%s %s: %d rows, %d missing found, %d re-fetched, %d imputed, %d missing, "
        "%d kept as stored, %d revised, %d rejected%s",
        symbol,
        day,
        report["rows"],
        missing_found,
        report["refetched"],
        report["imputed"],
        report["missing"],
        report.get("kept", 0),
        revisions.height,
        report["rejected"],
        f" ({describe_rejections(rejected, limit=3)})" if rejected.height else "",
    )
    return PartitionOutcome(symbol, day, write.path, report, data.gaps, rejected, revisions, write)
