"""Building one symbol-day of bars from what the lake holds, and reconciling it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

import polars as pl

from candlestack.checks import gap_failure, ohlc_violations
from candlestack.ingest import day_start_ms
from candlestack.lake import Lake, LakePath
from candlestack.resample import (
    SOURCE_TIMEFRAME,
    TIMEFRAME_MINUTES,
    bars_per_day,
    minute_bars,
    resample,
)
from candlestack.schema import MINUTE_MS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BarsOutcome:
    symbol_key: str
    day: date
    timeframe: str
    path: LakePath
    bars: int  # 0 when skipped
    expected: int  # closed periods of the day (all of a skipped day's)
    complete: int
    imputed_minutes: int
    content_hash: str | None
    skipped: str | None  # why no bars were built


def usable_minutes(
    lake: Lake, exchange: str, symbol_key: str, day: date, imputed_max_share: float
) -> tuple[dict, pl.DataFrame] | str:
    """A day's 1-minute candles as bars, with their report, if anything may be built on
    them; otherwise why not (the blocking rules: gaps, OHLC sanity)."""
    path = lake.candles_path(exchange, "1m", symbol_key, day)
    stored = lake.read_report(path)
    if stored is None:
        return "no 1-minute candles"
    report = stored[0]
    why = gap_failure(report, imputed_max_share)
    if why:
        return f"1m candles fail gaps: {why}"
    candles = lake.read(path)
    broken = {k: v for k, v in ohlc_violations(candles, day_start_ms(day)).items() if v}
    if broken:
        return f"1m candles fail {broken}"
    return report, minute_bars(candles)


class BarBuilder:
    """Bars of one timeframe for symbol-days, from the lake, into the lake.

    A day whose 1-minute candles fail the blocking rules (gaps, OHLC sanity) gets no bars,
    and any bars it had are removed: nothing downstream may read them until it is fixed.
    """

    def __init__(self, lake: Lake, exchange: str, imputed_max_share: float) -> None:
        self.lake = lake
        self.exchange = exchange
        self.imputed_max_share = imputed_max_share

    def _skip(self, path: LakePath, symbol_key: str, day: date, timeframe: str, why: str):
        path.unlink(missing_ok=True)
        log.warning("%s %s %s: no bars, %s", symbol_key, day, timeframe, why)
        # A day without usable candles misses all its periods.
        expected = bars_per_day(timeframe)
        return BarsOutcome(symbol_key, day, timeframe, path, 0, expected, 0, 0, None, why)

    def build(self, timeframe: str, symbol_key: str, day: date) -> BarsOutcome:
        path = self.lake.bars_path(self.exchange, timeframe, symbol_key, day)
        usable = usable_minutes(self.lake, self.exchange, symbol_key, day, self.imputed_max_share)
        if isinstance(usable, str):
            return self._skip(path, symbol_key, day, timeframe, usable)
        report, minutes = usable
        start = day_start_ms(day)
        closed_end = start + report["expected"] * MINUTE_MS
        source_timeframe = SOURCE_TIMEFRAME[timeframe]
        source = minutes
        if source_timeframe != "1m":
            source_path = self.lake.bars_path(self.exchange, source_timeframe, symbol_key, day)
            source = self.lake.read(source_path)
            if source is None:
                why = f"no {source_timeframe} bars to build from"
                return self._skip(path, symbol_key, day, timeframe, why)
        bars = resample(source, timeframe, closed_end)
        expected = (closed_end - start) // (TIMEFRAME_MINUTES[timeframe] * MINUTE_MS)
        summary = {
            "timeframe": timeframe,
            "source_timeframe": source_timeframe,
            "bars": bars.height,
            "expected": expected,
            "complete": int(bars["complete"].sum()),
            "imputed_minutes": int(bars["n_imputed"].sum()),
            "candles_hash": report["content_hash"],
        }
        write = self.lake.write_partition(path, bars, summary)
        return BarsOutcome(
            symbol_key,
            day,
            timeframe,
            path,
            bars.height,
            expected,
            summary["complete"],
            summary["imputed_minutes"],
            write.content_hash,
            None,
        )

    def reconcile(self, outcome: BarsOutcome) -> str | None:
        """Why stored bars differ from bars built straight from the 1-minute candles."""
        if outcome.skipped:
            return None
        start = day_start_ms(outcome.day)
        candles_path = self.lake.candles_path(self.exchange, "1m", outcome.symbol_key, outcome.day)
        report, _ = self.lake.read_report(candles_path)
        direct = resample(
            minute_bars(self.lake.read(candles_path)),
            outcome.timeframe,
            start + report["expected"] * MINUTE_MS,
        )
        stored = self.lake.read(outcome.path)
        if stored is None:
            return "bar file missing"
        if stored.equals(direct):
            return None
        if stored.height != direct.height:
            return f"{stored.height} bars stored, {direct.height} from the minutes"
        columns = [c for c in direct.columns if not stored[c].equals(direct[c])]
        return f"differs from the minutes in {', '.join(columns)}"


def outcomes_frame(outcomes: list[BarsOutcome]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "date": str(o.day),
                "symbol": o.symbol_key,
                "bars": o.bars,
                "expected": o.expected,
                "complete": o.complete,
                "skipped": o.skipped or "",
            }
            for o in outcomes
        ],
        schema=["date", "symbol", "bars", "expected", "complete", "skipped"],
    )
