"""Features of symbol-months from the bars in the lake, into the lake."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import ValidationError

from candlestack.bars import MonthMinutes
from candlestack.errors import ConfigError
from candlestack.features import (
    FeatureSet,
    compute,
    default_features,
    warmup_bars,
    window_start,
)
from candlestack.lake import DayData, Lake, LakePath, month_days, month_of, split_days

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureOutcome:
    symbol_key: str
    day: date
    timeframe: str
    path: LakePath  # the month file
    rows: int
    warm: bool  # the lake held the whole warm-up before the day
    nulls_after_warmup: int  # must be 0 on a warm day
    content_hash: str | None
    skipped: str | None
    data: DayData | None = field(default=None, repr=False, compare=False)  # what is stored


DEFAULT_FEATURE_TIMEFRAMES = ("1m", "15m", "1h")


@cache
def load_feature_set(path: Path | None) -> FeatureSet:
    """The feature set a deployment computes: a YAML (or JSON) file, or the default set on
    DEFAULT_FEATURE_TIMEFRAMES. Any mistake in the file fails here, when the code loads.
    Read once per process: the assets and the catalog's lineage use the same set."""
    if path is None:
        return FeatureSet(
            features=[
                spec for tf in DEFAULT_FEATURE_TIMEFRAMES for spec in default_features(tf).features
            ]
        )
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"CANDLESTACK_FEATURES: cannot read {path}: {exc}") from exc
    try:
        return FeatureSet.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"CANDLESTACK_FEATURES {path}: {exc}") from exc


class FeatureBuilder:
    """Features of one timeframe for symbol-months, computed from the bars the lake holds.

    A month is computed on its own, from its bars and the warm-up history before it (read
    from the month or months before): so it is bit-identical computed alone, after the
    month before or inside a range, and memory does not grow with the days of a range.
    History is the unbroken run of days with bars: indicators are never computed across a
    day without bars, and rows without their full warm-up are null.
    """

    def __init__(
        self,
        lake: Lake,
        exchange: str,
        features: FeatureSet,
        imputed_max_share: float,
        minutes: MonthMinutes | None = None,
    ) -> None:
        """`minutes`: as BarBuilder's, the 1m features' bars."""
        self.lake = lake
        self.exchange = exchange
        self.features = features
        self.imputed_max_share = imputed_max_share
        self.minutes = minutes or MonthMinutes(lake, exchange, imputed_max_share, keep=False)

    def _bars(
        self, timeframe: str, symbol_key: str, first: date, last: date
    ) -> dict[date, pl.DataFrame]:
        """Bars a strategy may use of the days first..last, by day."""
        if timeframe != "1m":
            frame = self.lake.read_days("bars", self.exchange, timeframe, symbol_key, first, last)
            return split_days(frame) if frame is not None else {}
        days: dict[date, pl.DataFrame] = {}
        month = month_of(first)
        while month <= last:
            usable = self.minutes(symbol_key, month)
            days.update(split_days(usable.minutes))
            month = month_of(month + timedelta(days=31))
        return {day: frame for day, frame in days.items() if first <= day <= last}

    def build(self, timeframe: str, symbol_key: str, month: date) -> list[FeatureOutcome]:
        """Compute and store one month of features: one write of its file."""
        specs = self.features.for_timeframe(timeframe)
        days_of_month = month_days(month)
        first = window_start(_midnight(days_of_month[0]), specs, timeframe).date()
        bars = self._bars(timeframe, symbol_key, first, days_of_month[-1])
        # The month's days with 1-minute candles: each gets features, or why not.
        targets = sorted(self.lake.month_reports("ohlcv", self.exchange, "1m", symbol_key, month))
        path = self.lake.month_path("features", self.exchange, timeframe, symbol_key, month)
        stored: dict[date, DayData | None] = {}
        outcomes = []
        segment: dict[date, pl.DataFrame] = {}
        day = first
        while targets and day <= targets[-1]:
            if day in bars and bars[day].height:
                segment[day] = bars[day]
            else:
                # History never spans a day without bars: it restarts after it.
                outcomes += self._segment(path, timeframe, symbol_key, targets, segment, specs)
                segment = {}
                if day in targets:
                    why = f"no usable {timeframe} bars"
                    log.warning("%s %s %s: no features, %s", symbol_key, day, timeframe, why)
                    outcomes.append(
                        FeatureOutcome(symbol_key, day, timeframe, path, 0, False, 0, None, why)
                    )
            day += timedelta(days=1)
        outcomes += self._segment(path, timeframe, symbol_key, targets, segment, specs)
        for outcome in outcomes:
            stored[outcome.day] = outcome.data
        writes = self.lake.write_month(
            "features", self.exchange, timeframe, symbol_key, month, stored
        )
        return sorted(
            (
                # The frames are stored: a range's outcomes must not hold every month's rows.
                replace(o, content_hash=writes[o.day].content_hash, data=None) if o.data else o
                for o in outcomes
            ),
            key=lambda o: o.day,
        )

    def _segment(
        self, path, timeframe, symbol_key, targets, segment, specs
    ) -> list[FeatureOutcome]:
        """Features of the target days in one unbroken segment of days with bars."""
        days = [day for day in targets if day in segment]
        if not days:
            return []
        warmup = warmup_bars(specs)
        history_days = sorted(segment)
        computed = compute(
            pl.concat([segment[d] for d in history_days]), specs, first_output_ts=_midnight(days[0])
        )
        by_day = split_days(computed)
        nulls_by_day = dict(
            computed.group_by(pl.col("ts").dt.date().alias("_day"))
            .agg(pl.sum_horizontal(pl.exclude("ts", "_day").null_count()))
            .iter_rows()
        )
        outcomes = []
        history = sum(segment[d].height for d in history_days if d < days[0])
        for day in days:
            frame = by_day.get(day, computed.clear())
            nulls = int(nulls_by_day.get(day, 0))
            warm = history >= warmup
            report = {
                "timeframe": timeframe,
                "rows": frame.height,
                "warmup_bars": warmup,
                "history_bars": history,
                "warm": warm,
                "nulls": nulls,
            }
            outcomes.append(
                FeatureOutcome(
                    symbol_key, day, timeframe, path, frame.height, warm, nulls if warm else 0,
                    None, None, DayData(frame, report),
                )
            )  # fmt: skip
            history += segment[day].height
        return outcomes


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
