"""Indicator features computed with TA-Lib from bars, configured as data, partition-invariant.

A feature set is configuration (`FeatureSet` of `FeatureSpec`): any TA-Lib function, its
inputs, parameters and timeframe. Everything that can be wrong with it is found when it is
loaded: a misspelt function, an unknown or mistyped parameter, a parameter out of TA-Lib's
range, an unknown input or timeframe, two features writing the same column.

Partition invariance. TA-Lib seeds its recursive indicators (EMA, RSI, ATR, ...) from the
first bars it is given, so a value depends on where the input starts. Two rules make a
day's features independent of how it was scheduled:

- each feature is computed from exactly `warmup_bars(spec)` bars before the first bar to
  output (`compute(..., first_output_ts=...)` cuts that window itself, so extra history
  passed by a caller changes nothing, bit for bit), and
- a row with fewer than `warmup_bars(spec)` bars of history in its window is null, never an
  approximation.

`warmup_bars` is long enough for the value to agree with a computation over the full
history within `WARMUP_TOLERANCE` (1e-9) relative; `candlestack.feature_warmup` gives the
formula.

Data moves without copies where the types allow: the Float64, null-free columns of the bars
are handed to TA-Lib as views of polars' buffers (`bar_arrays`).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import talib
from pydantic import BaseModel, ConfigDict, model_validator
from talib import abstract

from candlestack.errors import FeatureInputError
from candlestack.feature_warmup import SMOOTHING
from candlestack.resample import TIMEFRAME_MINUTES

logger = logging.getLogger(__name__)

TIMEFRAMES = tuple(TIMEFRAME_MINUTES)
PRICE_COLUMNS = ("open", "high", "low", "close", "volume")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Columns a feature may not write: the output frame's key and the bar columns it is joined to.
_RESERVED_COLUMNS = frozenset({"ts", *PRICE_COLUMNS})
_SPEC_KEYS = ("name", "function", "inputs", "params", "outputs", "timeframe")
_UNSTABLE = "Function has an unstable period"
_PATH_DEPENDENT = "Output is path-dependent"
# These return positions in the array they were given: meaningless once the window moves.
_INDEX_FUNCTIONS = frozenset({"MAXINDEX", "MININDEX", "MINMAXINDEX"})
_NAN_GROUPS = frozenset({"Math Transform", "Math Operators"})


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FeaturePlan:
    """A validated feature reduced to what one TA-Lib call needs (plain data, picklable)."""

    function: str
    columns: tuple[str, ...]  # bar columns, in TA-Lib's positional order
    params: tuple[int | float, ...]  # every parameter, in TA-Lib's positional order
    outputs: tuple[tuple[int, str], ...]  # (position in TA-Lib's result, column name)
    dtypes: tuple[pl.DataType, ...]  # per output column
    lookback: int
    warmup: int
    # TA-Lib guards its divisions: from finite bars only these functions can return NaN past
    # the lookback (ACOS outside [-1, 1], 0/0 on zero volume in VWMA, RVOL, ...), so only
    # their outputs are scanned. A scan costs about as much as a cheap indicator.
    may_emit_nan: bool


@cache
def _talib_function(function: str) -> Callable[..., Any]:
    # The package wraps each function for pandas/polars inputs; call the extension directly.
    return inspect.unwrap(getattr(talib, function))


@cache
def _function_info(function: str) -> dict[str, Any]:
    return abstract.Function(function).info


def _input_slots(info: Mapping[str, Any]) -> dict[str, str]:
    """TA-Lib's inputs, flattened in call order: slot name -> default bar column.

    Single series keep TA-Lib's name (`price`, `price0`, `periods`); the members of a
    `prices` list are named by their column (`high`, `low`, `close`, ...).
    """
    slots: dict[str, str] = {}
    for key, value in info["input_names"].items():
        if isinstance(value, list):
            slots.update({column: column for column in value})
        else:
            slots[key] = value
    return slots


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _probe(function: str, columns: tuple[str, ...], params: tuple, lookback: int) -> list:
    """Run the function once on a few synthetic bars: TA-Lib refuses bad parameters here, at
    load time, and the output types are learnt for the schema."""
    n = lookback + 2
    base = 100.0 + np.sin(np.arange(n, dtype=np.float64))
    series = {"open": base, "high": base + 1.0, "low": base - 1.0, "close": base + 0.5}
    series["volume"] = base * 10.0
    result = _talib_function(function)(*(series[c] for c in columns), *params)
    return list(result) if isinstance(result, tuple) else [result]


@cache
def _plan(
    name: str,
    function: str,
    inputs: tuple[tuple[str, str], ...] | None,
    params: tuple[tuple[str, int | float], ...],
    outputs: tuple[str, ...] | None,
) -> FeaturePlan:
    """Validate one feature against TA-Lib's own description of the function; every error
    names the feature and the culprit."""
    where = f"feature {name!r}"
    if function not in talib.get_functions():
        raise ValueError(
            f"{where}: unknown TA-Lib function {function!r}"
            f"{_suggest(function, talib.get_functions())}"
        )
    info = _function_info(function)
    flags = info.get("function_flags") or []
    if _PATH_DEPENDENT in flags:
        raise ValueError(
            f"{where}: {function}'s output is path-dependent (it depends on where the history "
            "starts, forever), so it cannot be computed the same way for every partition"
        )
    if function in _INDEX_FUNCTIONS:
        raise ValueError(
            f"{where}: {function} returns positions in the array it is given, which change "
            "with the window; use MAX/MIN/MINMAX for the values"
        )

    defaults: dict[str, int | float] = dict(info["parameters"])
    values = dict(defaults)
    for param, value in params:
        if param not in defaults:
            known = ", ".join(defaults) or "none"
            raise ValueError(
                f"{where}: {function} has no parameter {param!r}{_suggest(param, defaults)};"
                f" its parameters: {known}"
            )
        if isinstance(defaults[param], int):
            if not isinstance(value, int):
                raise ValueError(
                    f"{where}: parameter {param!r} of {function} must be an integer, got {value!r}"
                )
        else:
            value = float(value)  # a float parameter written as `2` means 2.0
        values[param] = value
    # matype 11 is "the function's own default" moving average: its default, for the warm-up.
    resolved = {
        k: defaults[k] if k.endswith("matype") and v == 11 else v for k, v in values.items()
    }
    ta = abstract.Function(function)
    ta.set_parameters(dict(values))
    lookback = ta.lookback
    if lookback < 0:
        raise ValueError(
            f"{where}: parameters {dict(params)} are outside the range TA-Lib accepts for "
            f"{function} (defaults: {defaults})"
        )

    slots = _input_slots(info)
    mapping = dict(slots)
    for slot, column in inputs or ():
        if slot not in slots:
            raise ValueError(
                f"{where}: {function} has no input {slot!r}; its inputs: {', '.join(slots)}"
            )
        mapping[slot] = column
    for slot, column in mapping.items():
        if column not in PRICE_COLUMNS:
            raise ValueError(
                f"{where}: input {slot!r} reads column {column!r}, which is not one of "
                f"{', '.join(PRICE_COLUMNS)}"
                + ("; map it in `inputs`" if (slot, column) in slots.items() else "")
            )

    names = list(info["output_names"])
    chosen = list(outputs) if outputs is not None else names
    if not chosen:
        raise ValueError(f"{where}: `outputs` is empty; {function} has {', '.join(names)}")
    for output in chosen:
        if output not in names:
            raise ValueError(
                f"{where}: {function} has no output {output!r}; its outputs: {', '.join(names)}"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{where}: `outputs` repeats a name: {chosen}")
    single = len(names) == 1
    columns = [name if single else f"{name}_{output}" for output in chosen]
    for column in columns:
        if column in _RESERVED_COLUMNS:
            raise ValueError(f"{where}: output column {column!r} is reserved for the bars")

    smoothing = SMOOTHING.get(function)
    if smoothing is None and _UNSTABLE in flags:
        raise ValueError(
            f"{where}: {function} has an unstable period (its value depends on where the "
            "history starts) and no convergence horizon is known for it in candlestack"
        )
    warmup = lookback + (smoothing(resolved) if smoothing else 0)

    call_columns = tuple(mapping[slot] for slot in slots)
    call_params = tuple(values[p] for p in defaults)
    try:
        results = _probe(function, call_columns, call_params, lookback)
    except Exception as error:  # TA-Lib raises bare Exception on TA_BAD_PARAM
        raise ValueError(f"{where}: TA-Lib refuses {function}{dict(params)}: {error}") from error
    dtypes = tuple(
        pl.Float64 if results[names.index(o)].dtype == np.float64 else pl.Int32 for o in chosen
    )
    return FeaturePlan(
        function=function,
        columns=call_columns,
        params=call_params,
        outputs=tuple((names.index(o), c) for o, c in zip(chosen, columns, strict=True)),
        dtypes=dtypes,
        lookback=lookback,
        warmup=warmup,
        may_emit_nan=info["group"] in _NAN_GROUPS or "volume" in call_columns,
    )


class FeatureSpec(BaseModel):
    """One TA-Lib function applied to bars of one timeframe.

    `inputs` maps TA-Lib's input slots to bar columns (`{"price": "volume"}` for an SMA of
    volume; `{"high": ..., "low": ..., "close": ...}` for functions that read several), and
    `outputs` picks some of a multi-output function's results. Output columns are `name` for
    a single-output function, `{name}_{output}` otherwise (macd_macd, macd_macdsignal, ...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    function: str
    inputs: dict[str, str] | None = None
    params: dict[str, int | float] = {}
    outputs: list[str] | None = None
    timeframe: str = "1m"

    @model_validator(mode="before")
    @classmethod
    def _check_raw(cls, data: Any) -> Any:
        # Checked before pydantic's own coercion so that every message names the feature.
        if not isinstance(data, dict):
            return data
        name = data.get("name")
        where = f"feature {name!r}"
        unknown = [k for k in data if k not in _SPEC_KEYS]
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a feature has "
                f"{', '.join(_SPEC_KEYS)} (TA-Lib parameters go under `params`)"
            )
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{where}: a feature name must be lower case letters, digits and _ "
                "starting with a letter"
            )
        data = dict(data)
        if isinstance(data.get("function"), str):
            data["function"] = data["function"].strip().upper()
        params = data.get("params")
        for param, value in params.items() if isinstance(params, dict) else ():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}: parameter {param!r} must be a number, got {value!r}")
        timeframe = data.get("timeframe", "1m")
        if timeframe not in TIMEFRAMES:
            raise ValueError(
                f"{where}: unknown timeframe {timeframe!r}; one of {', '.join(TIMEFRAMES)}"
            )
        return data

    @model_validator(mode="after")
    def _check_function(self) -> FeatureSpec:
        self.plan()
        return self

    def plan(self) -> FeaturePlan:
        """The TA-Lib call, output columns, lookback and warm-up (validated, cached)."""
        return _plan(
            self.name,
            self.function,
            tuple(sorted(self.inputs.items())) if self.inputs is not None else None,
            tuple(sorted(self.params.items())),
            tuple(self.outputs) if self.outputs is not None else None,
        )

    @property
    def columns(self) -> list[str]:
        """The output columns this feature writes."""
        return [column for _, column in self.plan().outputs]


class FeatureSet(BaseModel):
    """Features by configuration, e.g. `FeatureSet.model_validate(yaml.safe_load(text))`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: list[FeatureSpec]

    @model_validator(mode="after")
    def _check_columns(self) -> FeatureSet:
        # Each timeframe is computed into its own frame: names need only differ within one.
        owner: dict[tuple[str, str], str] = {}
        for spec in self.features:
            for column in spec.columns:
                key = (spec.timeframe, column)
                if key in owner:
                    raise ValueError(
                        f"features {owner[key]!r} and {spec.name!r} both write column "
                        f"{column!r} at {spec.timeframe}; rename one"
                    )
                owner[key] = spec.name
        return self

    def for_timeframe(self, timeframe: str) -> list[FeatureSpec]:
        """The features computed on bars of `timeframe`."""
        if timeframe not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {timeframe!r}; one of {', '.join(TIMEFRAMES)}")
        return [spec for spec in self.features if spec.timeframe == timeframe]

    @property
    def timeframes(self) -> list[str]:
        return [tf for tf in TIMEFRAMES if any(s.timeframe == tf for s in self.features)]


_DEFAULT_SPECS: list[dict[str, Any]] = [
    {"name": "sma_20", "function": "SMA", "params": {"timeperiod": 20}},
    {"name": "ema_50", "function": "EMA", "params": {"timeperiod": 50}},
    {"name": "ema_200", "function": "EMA", "params": {"timeperiod": 200}},
    {"name": "rsi_14", "function": "RSI", "params": {"timeperiod": 14}},
    {
        "name": "macd",
        "function": "MACD",
        "params": {"fastperiod": 12, "slowperiod": 26, "signalperiod": 9},
    },
    {
        "name": "bbands",
        "function": "BBANDS",
        "params": {"timeperiod": 20, "nbdevup": 2.0, "nbdevdn": 2.0, "matype": 0},
    },
    {"name": "atr_14", "function": "ATR", "params": {"timeperiod": 14}},
]


def default_features(timeframe: str = "1m") -> FeatureSet:
    """The default set (SMA 20, EMA 50 and 200, RSI 14, MACD 12/26/9, Bollinger 20/2/2,
    ATR 14) for bars of `timeframe`."""
    return FeatureSet.model_validate(
        {"features": [{**spec, "timeframe": timeframe} for spec in _DEFAULT_SPECS]}
    )


DEFAULT_FEATURES = default_features("1m")


# --- warm-up and windows -------------------------------------------------------------------


def _specs(specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec]) -> list[FeatureSpec]:
    if isinstance(specs, FeatureSet):
        return list(specs.features)
    if isinstance(specs, FeatureSpec):
        return [specs]
    return list(specs)


def warmup_bars(specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec]) -> int:
    """Bars of history a feature needs before a row so that its value agrees with a
    computation over the full history within WARMUP_TOLERANCE (1e-9) relative: TA-Lib's
    lookback plus the function's convergence horizon (`candlestack.feature_warmup` gives the
    formula and each function's horizon). For a set or list of features: the largest of
    them (the history a caller must load).
    """
    return max((spec.plan().warmup for spec in _specs(specs)), default=0)


def _timeframe(specs: list[FeatureSpec]) -> str | None:
    timeframes = {spec.timeframe for spec in specs}
    if len(timeframes) > 1:
        raise ValueError(
            f"features of several timeframes ({', '.join(sorted(timeframes))}) cannot be "
            "computed on one frame of bars; use FeatureSet.for_timeframe"
        )
    return next(iter(timeframes), None)


def _as_datetime(ts: datetime | int) -> datetime:
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError(f"{ts!r} is naive; bar times are UTC")
        return ts
    return datetime.fromtimestamp(ts / 1000, tz=UTC)


def window_start(
    first_output_ts: datetime | int,
    specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec],
    timeframe: str | None = None,
) -> datetime:
    """Open time of the first bar a caller must load to compute features from
    `first_output_ts` on: `warmup_bars(specs)` bars of `timeframe` before it.

    With bars on a full grid this is exactly the window `compute` uses; if bars can be
    missing, load earlier: `compute` counts rows, not time, and ignores extra history.
    """
    specs = _specs(specs)
    timeframe = timeframe or _timeframe(specs) or "1m"
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"unknown timeframe {timeframe!r}; one of {', '.join(TIMEFRAMES)}")
    bars = warmup_bars(specs)
    return _as_datetime(first_output_ts) - timedelta(minutes=bars * TIMEFRAME_MINUTES[timeframe])


# --- computing -------------------------------------------------------------------------------


def feature_columns(specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec]) -> list[str]:
    return [column for spec in _specs(specs) for column in spec.columns]


def feature_schema(specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec]) -> pl.Schema:
    """Schema of `compute`'s result: ts, then each feature's columns in order."""
    schema: dict[str, pl.DataType] = {"ts": pl.Datetime("ms", "UTC")}
    for spec in _specs(specs):
        plan = spec.plan()
        schema.update({c: t for (_, c), t in zip(plan.outputs, plan.dtypes, strict=True)})
    return pl.Schema(schema)


def bar_arrays(bars: pl.DataFrame, columns: Iterable[str]) -> dict[str, np.ndarray]:
    """C-contiguous float64 views of the bar columns, as TA-Lib takes them.

    A Float64 column without nulls in one chunk is not copied (the array shares polars'
    buffer, read-only); another numeric type is cast, a chunked column joined, both logged.
    A null is refused: bars given to features must be complete. NaN and infinities are not
    scanned for (a pass costs as much as a cheap indicator): candle validation refuses them
    before they reach the lake (candlestack.validate).
    """
    arrays: dict[str, np.ndarray] = {}
    for column in dict.fromkeys(columns):
        if column not in bars.columns:
            raise FeatureInputError(f"bars have no column {column!r} (columns: {bars.columns})")
        series = bars.get_column(column)
        if series.null_count():
            first = series.is_null().arg_true()[0]
            ts = bars.get_column("ts")[first] if "ts" in bars.columns else first
            raise FeatureInputError(
                f"bars column {column!r} has {series.null_count()} null(s), the first at "
                f"{ts}; features need complete bars (fill gaps first)"
            )
        if series.dtype != pl.Float64:
            logger.debug("casting bars column %r from %s to Float64 (a copy)", column, series.dtype)
            series = series.cast(pl.Float64)
        elif series.n_chunks() > 1:
            logger.debug(
                "bars column %r is in %d chunks: joined (a copy)", column, series.n_chunks()
            )
        array = series.to_numpy()
        if array.dtype != np.float64 or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=np.float64)
        arrays[column] = array
    return arrays


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PER_MICROSECOND = {"ms": (1, 1000), "us": (1, 1), "ns": (1000, 1)}


def _epoch(value: datetime | int, unit: str) -> int:
    """A bar time (an aware datetime, or epoch ms) in the ts column's physical unit."""
    if not isinstance(value, datetime):
        return int(value) * {"ms": 1, "us": 1_000, "ns": 1_000_000}[unit]
    multiply, divide = _PER_MICROSECOND[unit]
    return (_as_datetime(value) - _EPOCH) // timedelta(microseconds=1) * multiply // divide


def _times(bars: pl.DataFrame) -> tuple[pl.Series, np.ndarray, str]:
    """The ts column, its integer view (no copy) and its time unit; refused unless sorted."""
    ts = bars.get_column("ts")
    if not isinstance(ts.dtype, pl.Datetime):
        raise FeatureInputError(f"bars ts is {ts.dtype}, not a Datetime")
    if not ts.is_sorted():
        raise FeatureInputError("bars are not sorted by ts")
    return ts, ts.to_physical().to_numpy(), ts.dtype.time_unit or "us"


def _column(
    name: str, values: np.ndarray, null_rows: int, dtype: pl.DataType, may_emit_nan: bool
) -> pl.Series:
    """A polars column over TA-Lib's output array, its first `null_rows` rows null."""
    null_rows = min(null_rows, len(values))
    if may_emit_nan and dtype == pl.Float64 and np.isnan(values[null_rows:]).any():
        # NaN past the warm-up comes from the maths (LN of a negative, ...): null too. A copy.
        values[:null_rows] = np.nan
        return pl.Series(name, values, nan_to_null=True)
    if not null_rows:
        return pl.Series(name, values)  # shares the array
    # Shares the array too: only an Arrow validity bitmap (1 bit a row, LSB first) is new.
    validity = np.zeros((len(values) + 7) // 8, dtype=np.uint8)
    validity[(null_rows + 7) // 8 :] = 0xFF
    if null_rows % 8:
        validity[null_rows // 8] = (0xFF << (null_rows % 8)) & 0xFF
    array = pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype),
        len(values),
        [pa.py_buffer(validity), pa.py_buffer(values)],
        null_count=null_rows,
    )
    return pl.Series(name, array)


def compute(
    bars: pl.DataFrame,
    specs: FeatureSet | FeatureSpec | Sequence[FeatureSpec],
    first_output_ts: datetime | int | None = None,
) -> pl.DataFrame:
    """Features of `bars` (one timeframe, sorted by ts, no nulls in the columns read).

    Returns ts and one column per output (`feature_schema`), for the rows from
    `first_output_ts` (a datetime or epoch ms; the first bar when None) to the last bar.
    Each feature reads exactly `warmup_bars(spec)` bars before the first output row, or
    from the first bar when the frame holds fewer: extra history changes nothing, so a
    partition computed from any larger frame is bit-identical. Rows with fewer than
    `warmup_bars(spec)` bars of history in that window are null.
    """
    specs = _specs(specs)
    _timeframe(specs)
    ts, times, unit = _times(bars)
    start = 0
    if first_output_ts is not None:
        start = int(np.searchsorted(times, _epoch(first_output_ts, unit), side="left"))
    plans = [spec.plan() for spec in specs]
    arrays = bar_arrays(bars, (c for plan in plans for c in plan.columns))
    columns = [ts.slice(start)]
    for plan in plans:
        window = max(0, start - plan.warmup)
        result = _talib_function(plan.function)(
            *(arrays[c][window:] for c in plan.columns), *plan.params
        )
        results = result if isinstance(result, tuple) else (result,)
        skip = start - window  # window rows before the first output row
        null_rows = max(0, plan.warmup - skip)
        for (index, column), dtype in zip(plan.outputs, plan.dtypes, strict=True):
            values = results[index][skip:]
            columns.append(_column(column, values, null_rows, dtype, plan.may_emit_nan))
    return pl.DataFrame(columns)
