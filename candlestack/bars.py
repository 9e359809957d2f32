"""Building one symbol-month of bars from what the lake holds, and reconciling it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from candlestack.checks import gap_failure, ohlc_violations_by_day
from candlestack.lake import DayData, Lake, LakePath, WriteResult, file_identity, split_days
from candlestack.provenance import code_version
from candlestack.resample import (
    SOURCE_TIMEFRAME,
    TIMEFRAME_MINUTES,
    bars_per_day,
    minute_bars,
    resample,
)
from candlestack.schema import CANDLES_1M, MINUTE_MS, day_start_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BarsOutcome:
    symbol_key: str
    day: date
    timeframe: str
    path: LakePath  # the month file
    bars: int  # 0 when skipped
    expected: int  # closed periods of the day (all of a skipped day's)
    complete: int  # bars with every minute real
    imputed_minutes: int
    zero_volume_minutes: int  # real minutes that traded nothing
    content_hash: str | None
    skipped: str | None  # why no bars were built
    mismatch: str | None = None  # why the stored bars differ from the minutes' own


@dataclass(frozen=True)
class UsableMinutes:
    """A month's 1-minute candles as bars, for the days anything may be built on."""

    minutes: pl.DataFrame  # minute_bars of the usable days only
    reports: dict[date, dict]  # usable day -> its candle report
    unusable: dict[date, str]  # stored day -> why nothing may be built on it

    def closed_end_ms(self, day: date) -> int:
        return day_start_ms(day) + self.reports[day]["expected"] * MINUTE_MS


def usable_minutes(
    lake: Lake, exchange: str, symbol_key: str, month: date, imputed_max_share: float
) -> UsableMinutes:
    """A month's 1-minute candles as bars, for the stored days that pass the blocking rules
    (gaps, OHLC sanity), and why each other stored day may not be built on."""
    stored = lake.read_month("ohlcv", exchange, "1m", symbol_key, month)
    if stored is None:
        return UsableMinutes(minute_bars(pl.DataFrame(schema=CANDLES_1M)), {}, {})
    violations = ohlc_violations_by_day(stored.frame)
    unusable: dict[date, str] = {}
    usable: dict[date, dict] = {}
    for day, report in stored.reports.items():
        why = gap_failure(report, imputed_max_share)
        if why:
            unusable[day] = f"1m candles fail gaps: {why}"
        elif violations.get(day):
            unusable[day] = f"1m candles fail {violations[day]}"
        elif day not in violations:
            unusable[day] = "no 1-minute candles"
        else:
            usable[day] = report
    frame = stored.frame
    if unusable:
        frame = frame.filter(pl.col("ts").dt.date().is_in(list(usable)))
    minutes = minute_bars(frame)
    return UsableMinutes(minutes, usable, unusable)


class MonthMinutes:
    """`usable_minutes` of symbol-months, computed again only once the month's candle file
    changed: for builds that run at every close (the live collector's), where the month
    before (the features' warm-up) does not change and every timeframe that closes reads
    the open month. Keeps the two newest months of each symbol, on local lakes only (an
    object store's file identity is its size alone); `keep=False` reads every time."""

    KEPT_MONTHS = 2

    def __init__(
        self, lake: Lake, exchange: str, imputed_max_share: float, keep: bool = True
    ) -> None:
        self.lake = lake
        self.exchange = exchange
        self.imputed_max_share = imputed_max_share
        self.keep = keep and isinstance(lake.root, Path)
        self._kept: dict[str, dict[date, tuple[tuple, UsableMinutes]]] = {}

    def __call__(self, symbol_key: str, month: date) -> UsableMinutes:
        if not self.keep:
            return usable_minutes(
                self.lake, self.exchange, symbol_key, month, self.imputed_max_share
            )
        path = self.lake.month_path("ohlcv", self.exchange, "1m", symbol_key, month)
        try:
            # Taken before the read: a file replaced meanwhile is read again next time.
            identity = file_identity(path)
        except FileNotFoundError:
            identity = None
        months = self._kept.setdefault(symbol_key, {})
        kept = months.get(month)
        if kept is not None and kept[0] == identity:
            return kept[1]
        usable = usable_minutes(self.lake, self.exchange, symbol_key, month, self.imputed_max_share)
        months[month] = (identity, usable)
        for old in sorted(months)[: -self.KEPT_MONTHS]:
            del months[old]
        return usable


class BarBuilder:
    """Bars of one timeframe for symbol-months, from the lake, into the lake.

    A day whose 1-minute candles fail the blocking rules (gaps, OHLC sanity) gets no bars,
    and any bars it had are removed: nothing downstream may read them until it is fixed.
    The other days of the month are built all the same.
    """

    def __init__(
        self,
        lake: Lake,
        exchange: str,
        imputed_max_share: float,
        minutes: MonthMinutes | None = None,
    ) -> None:
        """`minutes`: kept usable minutes to build from, shared with other builders (the
        live builds'); without it each build reads its month's candles."""
        self.lake = lake
        self.exchange = exchange
        self.imputed_max_share = imputed_max_share
        self.minutes = minutes or MonthMinutes(lake, exchange, imputed_max_share, keep=False)

    def build(
        self, timeframe: str, symbol_key: str, month: date, reuse_unchanged: bool = False
    ) -> list[BarsOutcome]:
        """Build, store and reconcile one month of bars: one read of the month's minutes
        (and of its source bars, for a chained timeframe), one write.

        With `reuse_unchanged` (the minutely top-up of the open month), a day whose stored
        bars were built by this code from the very candles (and source bars) it has now is
        kept as stored, neither rebuilt nor reconciled again: the work of a minute does not
        grow with the day of the month. A full build rebuilds and reconciles every day."""
        path = self.lake.month_path("bars", self.exchange, timeframe, symbol_key, month)
        usable = self.minutes(symbol_key, month)
        skipped = dict(usable.unusable)
        source_timeframe = SOURCE_TIMEFRAME[timeframe]
        inputs = {day: report["content_hash"] for day, report in usable.reports.items()}
        source = None
        if source_timeframe != "1m":
            source = self.lake.read_month(
                "bars", self.exchange, source_timeframe, symbol_key, month
            )
            for day in usable.reports:
                if source is None or day not in source.reports:
                    skipped[day] = f"no {source_timeframe} bars to build from"
                else:
                    inputs[day] += source.reports[day]["content_hash"]
        inputs = {day: digest for day, digest in inputs.items() if day not in skipped}
        # Only a top-up looks at what is stored: a full build rebuilds every day anyway.
        stored = (
            self.lake.month_reports("bars", self.exchange, timeframe, symbol_key, month)
            if reuse_unchanged
            else {}
        )
        version = code_version()
        kept = {
            day: stored[day]
            for day in inputs
            if stored.get(day, {}).get("inputs_hash") == inputs[day]
            and stored[day].get("code_version") == version
        }
        build = [day for day in inputs if day not in kept]
        closed_end = max(map(usable.closed_end_ms, build), default=None)
        minutes = _on(usable.minutes, build)
        built_from = minutes if source is None else _on(source.frame, build)
        bars = resample(built_from, timeframe, closed_end)
        by_day = split_days(bars)
        days: dict[date, DayData | None] = dict.fromkeys(skipped)
        for day in build:
            frame = by_day.get(day, bars.clear())
            summary = self._summary(timeframe, frame, usable, day, usable.reports[day])
            days[day] = DayData(
                frame, {**summary, "inputs_hash": inputs[day], "code_version": version}
            )
        writes = self.lake.write_month("bars", self.exchange, timeframe, symbol_key, month, days)
        mismatches = self.reconcile(timeframe, path, minutes, bars, list(writes), closed_end)
        for day, report in kept.items():
            days[day] = DayData(bars.clear(), report)
            writes[day] = WriteResult(path, 0, report["content_hash"], written=False)
        outcomes = []
        for day, data in sorted(days.items()):
            if data is None:
                log.warning("%s %s %s: no bars, %s", symbol_key, day, timeframe, skipped[day])
                # A day without usable candles misses all its periods.
                expected = bars_per_day(timeframe)
                outcomes.append(
                    BarsOutcome(
                        symbol_key, day, timeframe, path, 0, expected, 0, 0, 0, None, skipped[day]
                    )
                )
                continue
            summary = data.report
            outcomes.append(
                BarsOutcome(
                    symbol_key, day, timeframe, path, summary["bars"], summary["expected"],
                    summary["complete"], summary["imputed_minutes"],
                    summary.get("zero_volume_minutes", 0), writes[day].content_hash,
                    None, mismatches.get(day),
                )
            )  # fmt: skip
        return outcomes

    @staticmethod
    def _summary(
        timeframe: str, bars: pl.DataFrame, usable: UsableMinutes, day: date, report: dict
    ) -> dict:
        start = day_start_ms(day)
        expected = (usable.closed_end_ms(day) - start) // (TIMEFRAME_MINUTES[timeframe] * MINUTE_MS)
        return {
            "timeframe": timeframe,
            "source_timeframe": SOURCE_TIMEFRAME[timeframe],
            "bars": bars.height,
            "expected": expected,
            "complete": int(bars["complete"].sum()),
            "imputed_minutes": int(bars["n_imputed"].sum()),
            "zero_volume_minutes": int(bars["n_zero_volume"].sum()),
            "candles_hash": report["content_hash"],
        }

    def reconcile(
        self,
        timeframe: str,
        path: LakePath,
        minutes: pl.DataFrame,
        built: pl.DataFrame,
        days: list[date],
        closed_end: int | None,
    ) -> dict[date, str]:
        """Why the stored bars of each of `days` differ from bars built straight from their
        minutes (the `reconciles_with_1m` check).

        The stored file is read back, so this checks what readers will get. A timeframe built
        from the minutes compares against the very bars it built, a chained one (10m, 4h, 1d)
        against a fresh resample of the minutes: no resample is done twice, so the check
        costs one read of the month file and one comparison (bench/bars.py measures it)."""
        chained = SOURCE_TIMEFRAME[timeframe] != "1m"
        direct = resample(minutes, timeframe, closed_end) if chained else built
        stored = self.lake.read(path)
        if stored is not None and stored.equals(direct):
            return {}
        stored_days = split_days(stored) if stored is not None else {}
        direct_days = split_days(direct)
        why = {}
        for day in days:
            mine, theirs = stored_days.get(day), direct_days.get(day, direct.clear())
            if mine is None:
                why[day] = "bar file missing" if not theirs.is_empty() else None
            elif not mine.equals(theirs):
                if mine.height != theirs.height:
                    why[day] = f"{mine.height} bars stored, {theirs.height} from the minutes"
                else:
                    columns = [c for c in theirs.columns if not mine[c].equals(theirs[c])]
                    why[day] = f"differs from the minutes in {', '.join(columns)}"
        return {day: reason for day, reason in why.items() if reason}


def _on(frame: pl.DataFrame, days: list[date]) -> pl.DataFrame:
    return frame.filter(pl.col("ts").dt.date().is_in(days))


def outcomes_frame(outcomes: list[BarsOutcome]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "date": str(o.day),
                "symbol": o.symbol_key,
                "bars": o.bars,
                "expected": o.expected,
                "complete": o.complete,
                "imputed_minutes": o.imputed_minutes,
                "zero_volume_minutes": o.zero_volume_minutes,
                "skipped": o.skipped or "",
            }
            for o in outcomes
        ],
        schema=[
            "date",
            "symbol",
            "bars",
            "expected",
            "complete",
            "imputed_minutes",
            "zero_volume_minutes",
            "skipped",
        ],
    )
