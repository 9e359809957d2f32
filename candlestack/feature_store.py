"""Features of symbol-days from the bars in the lake, into the lake."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from pathlib import Path

import polars as pl
import yaml
from pydantic import ValidationError

from candlestack.bars import usable_minutes
from candlestack.errors import ConfigError
from candlestack.features import (
    FeatureSet,
    compute_periods,
    default_features,
    warmup_bars,
    window_start,
)
from candlestack.ingest import contiguous_runs
from candlestack.lake import Lake, LakePath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureOutcome:
    symbol_key: str
    day: date
    timeframe: str
    path: LakePath
    rows: int
    warm: bool  # the lake held the whole warm-up before the day
    nulls_after_warmup: int  # must be 0 on a warm day
    content_hash: str | None
    skipped: str | None


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
    """Features of one timeframe for symbol-days, computed from the bars the lake holds.

    A day's history is the unbroken run of days with bars before it: indicators are never
    computed across a day without bars, and rows without their full warm-up are null.
    """

    def __init__(
        self, lake: Lake, exchange: str, features: FeatureSet, imputed_max_share: float
    ) -> None:
        self.lake = lake
        self.exchange = exchange
        self.features = features
        self.imputed_max_share = imputed_max_share

    def _bars(self, timeframe: str, symbol_key: str, day: date) -> pl.DataFrame | None:
        """The day's bars, or None when it has none a strategy may use."""
        if timeframe != "1m":
            return self.lake.read(self.lake.bars_path(self.exchange, timeframe, symbol_key, day))
        usable = usable_minutes(self.lake, self.exchange, symbol_key, day, self.imputed_max_share)
        return None if isinstance(usable, str) else usable[1]

    def build(self, timeframe: str, symbol_key: str, days: list[date]) -> list[FeatureOutcome]:
        specs = self.features.for_timeframe(timeframe)
        outcomes = []
        for run in contiguous_runs(days):
            segment: dict[date, pl.DataFrame] = {}
            day = window_start(_midnight(run[0]), specs, timeframe).date()
            while day <= run[-1]:
                bars = self._bars(timeframe, symbol_key, day)
                if bars is not None and bars.height:
                    segment[day] = bars
                else:
                    # History never spans a day without bars: it restarts after it.
                    outcomes += self._write(timeframe, symbol_key, run, segment, specs)
                    segment = {}
                    if day in run:
                        outcomes.append(self._skip(timeframe, symbol_key, day))
                day += timedelta(days=1)
            outcomes += self._write(timeframe, symbol_key, run, segment, specs)
        return sorted(outcomes, key=lambda o: o.day)

    def _skip(self, timeframe: str, symbol_key: str, day: date) -> FeatureOutcome:
        path = self.lake.features_path(self.exchange, timeframe, symbol_key, day)
        path.unlink(missing_ok=True)
        why = f"no usable {timeframe} bars"
        log.warning("%s %s %s: no features, %s", symbol_key, day, timeframe, why)
        return FeatureOutcome(symbol_key, day, timeframe, path, 0, False, 0, None, why)

    def _write(self, timeframe, symbol_key, run, segment, specs) -> list[FeatureOutcome]:
        """Features of the target days in one unbroken segment of days with bars."""
        targets = [day for day in run if day in segment]
        if not targets:
            return []
        warmup = warmup_bars(specs)
        days = sorted(segment)
        computed = compute_periods(
            pl.concat([segment[d] for d in days]), specs, first_output_ts=_midnight(targets[0])
        )
        outcomes = []
        for day in targets:
            path = self.lake.features_path(self.exchange, timeframe, symbol_key, day)
            start = _midnight(day)
            frame = computed.filter(
                pl.col("ts").is_between(start, start + timedelta(days=1), closed="left")
            )
            history = sum(segment[d].height for d in days if d < day)
            nulls = int(frame.drop("ts").null_count().sum_horizontal()[0])
            report = {
                "timeframe": timeframe,
                "rows": frame.height,
                "warmup_bars": warmup,
                "history_bars": history,
                "warm": history >= warmup,
                "nulls": nulls,
            }
            write = self.lake.write_partition(path, frame, report)
            outcomes.append(
                FeatureOutcome(
                    symbol_key, day, timeframe, path, frame.height, history >= warmup,
                    nulls if history >= warmup else 0, write.content_hash, None,
                )
            )  # fmt: skip
        return outcomes


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
