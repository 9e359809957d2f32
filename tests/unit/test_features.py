"""Features: configuration errors at load time, TA-Lib's values, warm-up, partition invariance
(of the computation, and of the month files the feature store writes).

Real 1-minute BTC/USDT candles from Binance (2021-04-20 to 2021-05-20, the 19 May crash
included), gaps forward-filled onto the full minute grid.
"""

from __future__ import annotations

import pickle
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import talib
from polars.testing import assert_frame_equal
from pydantic import ValidationError
from talib import abstract

import candlestack.features as features
from candlestack.bars import BarBuilder
from candlestack.feature_store import FeatureBuilder
from candlestack.feature_warmup import convergence_bars
from candlestack.features import (
    DEFAULT_FEATURES,
    FeatureInputError,
    FeatureSet,
    FeatureSpec,
    bar_arrays,
    compute,
    default_features,
    feature_columns,
    feature_schema,
    warmup_bars,
    window_start,
)
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, month_of
from candlestack.resample import bars_per_day
from candlestack.schema import MINUTE_MS
from candlestack.sources.synthetic import SyntheticSource
from tests.conftest import OHLCV

BTC = OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"
PRICES = ("open", "high", "low", "close", "volume")
CRASH_DAY = datetime(2021, 5, 19, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


def minute_bars(path) -> pl.DataFrame:
    raw = pl.read_csv(path, schema_overrides={c: pl.Float64 for c in PRICES})
    first, last = raw["ts_ms"].min(), raw["ts_ms"].max()
    grid = pl.DataFrame({"ts_ms": np.arange(first, last + MINUTE_MS, MINUTE_MS)})
    return (
        grid.join(raw, on="ts_ms", how="left", maintain_order="left")
        .select(
            pl.col("ts_ms").cast(pl.Datetime("ms", "UTC")).alias("ts"),
            *(pl.col(c).forward_fill() for c in PRICES),
        )
        .rechunk()
    )


@pytest.fixture(scope="module")
def btc(shared_data) -> pl.DataFrame:
    return minute_bars(BTC)


def between(bars: pl.DataFrame, start: datetime, end: datetime) -> pl.DataFrame:
    return bars.filter(pl.col("ts").is_between(start, end, closed="left"))


def spec(**fields) -> FeatureSpec:
    return FeatureSpec.model_validate(fields)


def bits(frame: pl.DataFrame) -> dict[str, tuple[list[int], bytes]]:
    """Each column's null rows and the exact bytes of its values: equal means bit-identical."""
    return {
        c: (frame[c].is_null().arg_true().to_list(), frame[c].drop_nulls().to_numpy().tobytes())
        for c in frame.columns
    }


def relative_error(ours: np.ndarray, full: np.ndarray) -> float:
    """|ours - full| over the value, or over the column's mean magnitude where the output
    crosses zero (MACD's lines): relative to a value near 0, any rounding is huge."""
    differ = ours != full  # equal infinities (COSH of a price) are no error
    if not differ.any():
        return 0.0
    scale = np.maximum(np.abs(full), np.mean(np.abs(full[np.isfinite(full)])))
    return float(np.max(np.abs(ours - full)[differ] / scale[differ]))


# --- configuration errors, at load time ---------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "culprit"),
    [
        ({"function": "RSX"}, "unknown TA-Lib function 'RSX' (did you mean RSI"),
        ({"function": "RSI", "params": {"timeperod": 14}}, "no parameter 'timeperod'"),
        ({"function": "RSI", "params": {"timeperiod": 14.5}}, "must be an integer, got 14.5"),
        ({"function": "RSI", "params": {"timeperiod": "14"}}, "must be a number, got '14'"),
        ({"function": "RSI", "params": {"timeperiod": True}}, "must be a number, got True"),
        ({"function": "RSI", "params": {"timeperiod": 0}}, "outside the range TA-Lib accepts"),
        ({"function": "BBANDS", "params": {"matype": 99}}, "outside the range TA-Lib accepts"),
        ({"function": "RSI", "timeframe": "2m"}, "unknown timeframe '2m'"),
        ({"function": "RSI", "inputs": {"price": "vwap"}}, "reads column 'vwap'"),
        ({"function": "ATR", "inputs": {"price": "close"}}, "ATR has no input 'price'"),
        ({"function": "MAVP"}, "input 'periods' reads column 'periods'"),
        ({"function": "MACD", "outputs": ["signal"]}, "MACD has no output 'signal'"),
        ({"function": "RSI", "period": 14}, "unknown field(s) 'period'"),
        ({"function": "OBV"}, "path-dependent"),
        ({"function": "SAR"}, "path-dependent"),
        ({"function": "MAXINDEX"}, "returns positions"),
    ],
)
def test_a_wrong_feature_is_refused_when_loaded_naming_it_and_the_culprit(fields, culprit):
    with pytest.raises(ValidationError) as error:
        FeatureSet.model_validate({"features": [{"name": "my_feature", **fields}]})
    message = str(error.value)
    assert "feature 'my_feature'" in message
    assert culprit in message


def test_a_feature_name_must_be_a_lower_case_identifier():
    with pytest.raises(ValidationError, match="feature 'RSI 14': a feature name must be"):
        spec(name="RSI 14", function="RSI")


def test_a_feature_may_not_write_a_bar_column():
    with pytest.raises(ValidationError, match="output column 'close' is reserved"):
        spec(name="close", function="SMA")


@pytest.mark.parametrize(
    ("second", "column"),
    [
        ({"name": "sma_20", "function": "EMA"}, "sma_20"),
        ({"name": "macd_macd", "function": "EMA"}, "macd_macd"),
    ],
)
def test_two_features_writing_one_column_are_refused(second, column):
    first = [
        {"name": "sma_20", "function": "SMA", "params": {"timeperiod": 20}},
        {"name": "macd", "function": "MACD"},
    ]
    with pytest.raises(ValidationError) as error:
        FeatureSet.model_validate({"features": [*first, second]})
    assert f"and '{second['name']}' both write column '{column}' at 1m" in str(error.value)


def test_one_name_may_serve_several_timeframes():
    both = FeatureSet.model_validate(
        {"features": [*default_features("1m").features, *default_features("4h").features]}
    )
    assert both.timeframes == ["1m", "4h"]
    assert feature_columns(both.for_timeframe("4h")) == feature_columns(DEFAULT_FEATURES)
    assert pickle.loads(pickle.dumps(both)) == both


def test_a_feature_set_loads_from_yaml():
    import yaml  # PyYAML comes with dagster

    text = """
features:
  - {name: vol_sma_20, function: sma, inputs: {price: volume}, params: {timeperiod: 20}}
  - name: bb
    function: BBANDS
    params: {timeperiod: 20, nbdevup: 2, nbdevdn: 2}  # integers where TA-Lib wants floats
    outputs: [upperband, lowerband]
    timeframe: 1h
"""
    loaded = FeatureSet.model_validate(yaml.safe_load(text))
    assert [s.function for s in loaded.features] == ["SMA", "BBANDS"]
    assert feature_columns(loaded) == ["vol_sma_20", "bb_upperband", "bb_lowerband"]
    assert loaded.timeframes == ["1m", "1h"]
    assert [s.name for s in loaded.for_timeframe("1h")] == ["bb"]


# --- output columns and values ------------------------------------------------------------


def test_default_output_columns_and_schema():
    assert feature_columns(DEFAULT_FEATURES) == [
        "sma_20",
        "ema_50",
        "ema_200",
        "rsi_14",
        "macd_macd",
        "macd_macdsignal",
        "macd_macdhist",
        "bbands_upperband",
        "bbands_middleband",
        "bbands_lowerband",
        "atr_14",
    ]
    schema = feature_schema(DEFAULT_FEATURES)
    assert schema["ts"] == pl.Datetime("ms", "UTC")
    assert all(schema[c] == pl.Float64 for c in feature_columns(DEFAULT_FEATURES))
    candle = spec(name="doji", function="CDLDOJI")
    assert feature_schema([candle])["doji"] == pl.Int32


def test_default_features_per_timeframe():
    hourly = default_features("1h")
    assert {s.timeframe for s in hourly.features} == {"1h"}
    assert hourly.for_timeframe("1h") == hourly.features
    assert hourly.for_timeframe("1m") == []
    assert DEFAULT_FEATURES.for_timeframe("1m") == DEFAULT_FEATURES.features
    with pytest.raises(ValueError, match="unknown timeframe '7m'"):
        DEFAULT_FEATURES.for_timeframe("7m")


def test_values_are_talib_s_on_the_same_arrays(btc):
    bars = btc.head(20_000)
    result = compute(bars, DEFAULT_FEATURES)
    h, low, c = (bars[x].to_numpy() for x in ("high", "low", "close"))
    expected = {
        "sma_20": talib.SMA(c, timeperiod=20),
        "ema_50": talib.EMA(c, timeperiod=50),
        "ema_200": talib.EMA(c, timeperiod=200),
        "rsi_14": talib.RSI(c, timeperiod=14),
        "atr_14": talib.ATR(h, low, c, timeperiod=14),
    }
    macd = talib.MACD(c, fastperiod=12, slowperiod=26, signalperiod=9)
    bands = talib.BBANDS(c, timeperiod=20, nbdevup=2.0, nbdevdn=2.0, matype=0)
    expected |= dict(zip(["macd_macd", "macd_macdsignal", "macd_macdhist"], macd, strict=True))
    names = ["bbands_upperband", "bbands_middleband", "bbands_lowerband"]
    expected |= dict(zip(names, bands, strict=True))
    assert result["ts"].equals(bars["ts"])
    for s in DEFAULT_FEATURES.features:
        w = warmup_bars(s)
        for column in s.columns:
            # Bit for bit: the same function on the same array from the same first bar.
            assert result[column][w:].to_numpy().tobytes() == expected[column][w:].tobytes()


def test_inputs_and_outputs_are_mapped(btc):
    bars = btc.head(3_000)
    mapped = [
        spec(name="vol_sma", function="SMA", inputs={"price": "volume"}),
        spec(name="hist", function="MACD", outputs=["macdhist"]),
        spec(name="doji", function="CDLDOJI"),
    ]
    result = compute(bars, mapped)
    assert result.columns == ["ts", "vol_sma", "hist_macdhist", "doji"]
    v, c = bars["volume"].to_numpy(), bars["close"].to_numpy()
    np.testing.assert_array_equal(result["vol_sma"][29:].to_numpy(), talib.SMA(v)[29:])
    np.testing.assert_array_equal(result["hist_macdhist"][396:].to_numpy(), talib.MACD(c)[2][396:])
    doji = talib.CDLDOJI(*(bars[x].to_numpy() for x in ("open", "high", "low", "close")))
    assert result["doji"].dtype == pl.Int32
    assert result["doji"].null_count() == 10
    np.testing.assert_array_equal(result["doji"][10:].to_numpy(), doji[10:])


# --- warm-up ------------------------------------------------------------------------------


def test_convergence_horizon_of_ema_200_is_about_2100_bars():
    alpha = 2 / 201
    k = convergence_bars(alpha)
    assert k == 2_073
    assert (1 - alpha) ** k <= 1e-9 < (1 - alpha) ** (k - 1)
    assert convergence_bars(1 / 14) == 280  # an average of period 14, to 1e-9
    assert convergence_bars(1.0) == 0  # a period of 1 does not smooth


def test_warmup_of_the_default_set():
    by_name = {s.name: warmup_bars(s) for s in DEFAULT_FEATURES.features}
    assert by_name == {
        "sma_20": 19,  # lookback only: a full window is exact
        "ema_50": 49 + 519,
        "ema_200": 199 + 2_073,
        # Wilder: a seed up to 100x the average; RSI, a ratio of two: half that again each.
        "rsi_14": 14 + 352,
        "macd": 33 + 270 + 93,  # lookback + EMA(26) + signal EMA(9)
        "bbands": 19,
        "atr_14": 14 + 342,
    }
    assert warmup_bars(DEFAULT_FEATURES) == 2_272
    first = datetime(2021, 5, 19, tzinfo=UTC)
    assert window_start(first, DEFAULT_FEATURES) == first - timedelta(minutes=2_272)
    hourly = default_features("1h")
    assert window_start(first, hourly) == first - timedelta(hours=2_272)
    assert window_start(int(first.timestamp() * 1000), hourly, "4h") == first - timedelta(
        hours=4 * 2_272
    )


def test_every_unstable_talib_function_has_a_horizon_or_is_refused():
    for name in talib.get_functions():
        flags = abstract.Function(name).info.get("function_flags") or []
        if "Function has an unstable period" not in flags:
            continue
        loaded = spec(name="f", function=name)
        assert warmup_bars(loaded) > abstract.Function(name).lookback, name


def test_rows_within_the_warmup_are_null_even_where_talib_has_a_number(btc):
    bars = btc.head(4_000)
    result = compute(bars, DEFAULT_FEATURES)
    for s in DEFAULT_FEATURES.features:
        for column in s.columns:
            assert result[column].is_null().arg_true().to_list() == list(range(warmup_bars(s)))
    # TA-Lib's EMA(200) has numbers from row 199; ours only from 2,272.
    assert not np.isnan(talib.EMA(bars["close"].to_numpy(), 200)[199])


def test_history_shorter_than_the_warmup_gives_nulls_not_approximations(btc):
    first = btc["ts"][2_000]
    result = compute(btc.head(2_500), DEFAULT_FEATURES, first_output_ts=first)
    assert result.height == 500
    assert result["ts"][0] == first
    # EMA(200) needs 2,272 bars and has 2,000 before the first row: 272 rows stay null.
    assert result["ema_200"].is_null().arg_true().to_list() == list(range(272))
    assert result.drop("ema_200").null_count().sum_horizontal().item() == 0
    assert compute(btc.head(1_000), DEFAULT_FEATURES)["ema_200"].null_count() == 1_000


# --- partition invariance -----------------------------------------------------------------


def test_a_day_is_bit_identical_alone_after_the_day_before_and_from_all_history(btc):
    day_end = CRASH_DAY + DAY
    alone = compute(
        between(btc, window_start(CRASH_DAY, DEFAULT_FEATURES), day_end),
        DEFAULT_FEATURES,
        first_output_ts=CRASH_DAY,
    )
    assert alone.height == 1_440
    assert alone.null_count().sum_horizontal().item() == 0

    # After the day before: the frame holds that day and its warm-up too.
    after = compute(
        between(btc, window_start(CRASH_DAY - DAY, DEFAULT_FEATURES), day_end),
        DEFAULT_FEATURES,
        first_output_ts=CRASH_DAY,
    )
    # And from all the history there is.
    everything = compute(between(btc, btc["ts"][0], day_end), DEFAULT_FEATURES, CRASH_DAY)

    for other in (after, everything):
        assert_frame_equal(other, alone, check_exact=True)
        assert bits(other) == bits(alone)


@pytest.mark.parametrize(
    "file",
    [
        "tooyipjee_binance_BTCUSDT_1m.csv",
        "tooyipjee_binance_ETHUSDT_1m.csv",
        "cl8550_binanceus_BTCUSDT_1m.csv",  # 2023, with zero-volume flat minutes
        "freqtrade-testdata_bittrex_POWRBTC_1m.csv",  # illiquid, prices about 1e-4
    ],
)
def test_every_day_agrees_with_the_full_history_within_1e_9(shared_data, file):
    bars = minute_bars(OHLCV / file)
    full = compute(bars, DEFAULT_FEATURES)
    first_day = bars["ts"][0].replace(hour=0, minute=0) + DAY
    # Every day on its own window: its warm-up before it, nothing more.
    starts = pl.datetime_range(first_day, bars["ts"][-1], DAY, eager=True).to_list()
    days = pl.concat(
        compute(between(bars, window_start(start, DEFAULT_FEATURES), start + DAY),
                DEFAULT_FEATURES, first_output_ts=start)
        for start in starts
    )  # fmt: skip
    assert days["ts"].equals(full["ts"].filter(full["ts"] >= first_day))
    joined = days.join(full, on="ts", suffix="_full", maintain_order="left")
    bars_before = (days["ts"] - bars["ts"][0]).dt.total_minutes().to_numpy()
    for s in DEFAULT_FEATURES.features:
        for column in s.columns:
            ours = joined[column].to_numpy()
            reference = joined[f"{column}_full"].to_numpy()
            valid = ~np.isnan(ours)
            # Null exactly where there is less history than the warm-up, nowhere else.
            assert np.array_equal(~valid, bars_before < warmup_bars(s)), column
            assert relative_error(ours[valid], reference[valid]) <= 1e-9, column


@pytest.mark.parametrize(
    "recording",
    [
        "tooyipjee_binance_ETHUSDT_1m.csv",
        "tooyipjee_binance_BTCUSDT_1m.csv",
        "cl8550_binanceus_BTCUSDT_1m.csv",
    ],
)
@pytest.mark.parametrize(
    "feature",
    [
        {"name": "rsi_14", "function": "RSI", "params": {"timeperiod": 14}},
        {"name": "atr_14", "function": "ATR", "params": {"timeperiod": 14}},
    ],
    ids=["rsi_14", "atr_14"],
)
def test_wilder_indicators_of_every_hour_agree_with_the_full_history_within_1e_9(
    recording, feature, shared_data
):
    """Reported: RSI(14) of real ETH/USDT minutes reached 1.09e-9 relative with a warm-up
    that only made its seed weigh 1e-9: RSI is a ratio of two averages, whose errors add,
    and a Wilder average's seed error counts against the (smaller) average of a quiet
    stretch. Each hour of the series is computed on its own window, as a partition starting
    there would be. Hours whose window overlaps an outage are left out: its minutes are
    forward-filled flat, and flat bars do not count towards the warm-up."""
    path = OHLCV / recording
    bars = minute_bars(path)
    wilder = spec(**feature)
    name = feature["name"]
    recorded = pl.read_csv(path, columns=["ts_ms"])["ts_ms"].cast(pl.Datetime("ms", "UTC"))
    outage = bars["ts"].filter(~bars["ts"].is_in(recorded))
    first_hour = (bars["ts"][0] + timedelta(minutes=warmup_bars(wilder))).replace(minute=0) + HOUR
    parts = []
    for start in pl.datetime_range(first_hour, bars["ts"][-1], HOUR, eager=True):
        window = between(bars, window_start(start, wilder), start + HOUR)
        if not window["ts"].is_in(outage).any():
            parts.append(compute(window, [wilder], first_output_ts=start))
    hours = pl.concat(parts)
    joined = hours.join(compute(bars, [wilder]), on="ts", suffix="_full")
    assert joined.height == hours.height > 300 * 60
    ours, reference = joined[name].to_numpy(), joined[f"{name}_full"].to_numpy()
    assert relative_error(ours, reference) <= 1e-9


def test_extra_history_does_not_change_a_single_bit(btc):
    first = btc["ts"][10_000]
    exact = compute(btc.slice(10_000 - 2_272), DEFAULT_FEATURES, first_output_ts=first)
    for extra in (1, 7, 500, 10_000 - 2_272):
        more = compute(btc.slice(10_000 - 2_272 - extra), DEFAULT_FEATURES, first_output_ts=first)
        assert bits(more) == bits(exact)


# --- month files: features of a month alone, after the month before, inside a range --------

MONTH_DAYS = [date(2023, 12, 20) + timedelta(days=i) for i in range(76)]  # to 2024-03-04
MONTHS = [date(2023, 12, 1), date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)]
# EMA(50) needs 568 bars: 24 days of 1h bars, so each month's warm-up reaches back into the
# month before (and from the 1st to the 8th of February, into January's file).
MONTH_FEATURES = FeatureSet.model_validate(
    {
        "features": [
            {"name": name, "function": function, "params": params, "timeframe": tf}
            for tf in ("15m", "1h")
            for name, function, params in (
                ("sma_20", "SMA", {"timeperiod": 20}),
                ("ema_50", "EMA", {"timeperiod": 50}),
                ("rsi_14", "RSI", {"timeperiod": 14}),
            )
        ]
    }
)


@pytest.fixture(scope="module")
def bar_lake(tmp_path_factory) -> Path:
    """A lake of synthetic 1m candles and their 15m and 1h bars, December to March."""
    root = tmp_path_factory.mktemp("bars") / "lake"
    lake = Lake(root)
    source = SyntheticSource(seed=7, symbols=["BTC/USDT"], clock=lambda: 1.8e9)
    Ingestor(source, lake).ingest("BTC/USDT", MONTH_DAYS)
    builder = BarBuilder(lake, "synthetic", 0.01)
    for month in MONTHS:
        for timeframe in ("15m", "1h"):
            assert all(o.skipped is None for o in builder.build(timeframe, "BTC-USDT", month))
    return root


def month_features(root: Path, into: Path, timeframe: str, months: list[date]) -> Lake:
    """Features built for `months`, in that order, on a copy of the bar lake."""
    copy = into / "-".join(f"{m:%Y%m}" for m in months)
    shutil.copytree(root, copy)
    lake = Lake(copy)
    builder = FeatureBuilder(lake, "synthetic", MONTH_FEATURES, 0.01)
    for month in months:
        builder.build(timeframe, "BTC-USDT", month)
    return lake


@pytest.mark.parametrize("timeframe", ["15m", "1h"])
@pytest.mark.parametrize("month", MONTHS[1:3], ids=["january", "february"])
def test_a_month_file_is_bit_identical_alone_after_the_month_before_and_in_a_range(
    bar_lake, tmp_path, timeframe, month
):
    before = month_of(month - timedelta(days=1))
    alone = month_features(bar_lake, tmp_path, timeframe, [month])
    after = month_features(bar_lake, tmp_path, timeframe, [before, month])
    in_range = month_features(bar_lake, tmp_path, timeframe, MONTHS)
    backwards = month_features(bar_lake, tmp_path, timeframe, MONTHS[::-1])

    def stored(lake: Lake):
        return lake.read_month("features", "synthetic", timeframe, "BTC-USDT", month)

    reference = stored(alone)
    days = [d for d in MONTH_DAYS if month_of(d) == month]
    assert list(reference.reports) == days
    assert reference.frame.height == len(days) * bars_per_day(timeframe)
    warm = [r["warm"] for r in reference.reports.values()]
    if month == MONTHS[2] or timeframe == "15m":
        # The whole warm-up was there before the month's first day: no nulls in the month.
        assert all(warm) and not any(r["nulls"] for r in reference.reports.values())
    else:
        # January's first 1h days have 12 days of history, under the 568 bars: null rows
        # until the warm-up is there, in the same rows however the month was computed.
        assert not warm[0] and warm[-1]
        assert reference.frame["ema_50"].null_count() > 0
    for lake in (after, in_range, backwards):
        other = stored(lake)
        assert other.path.read_bytes() == reference.path.read_bytes()
        assert other.reports == reference.reports
        for day in days:
            assert bits(other.day(day)) == bits(reference.day(day)), day
    # And what compute gives on the bars from the warm-up on, or on every bar there is.
    bars = alone.read_days(
        "bars", "synthetic", timeframe, "BTC-USDT", MONTH_DAYS[0], MONTH_DAYS[-1]
    )
    specs = MONTH_FEATURES.for_timeframe(timeframe)
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year, month.month + 1, 1, tzinfo=UTC)
    for history in (between(bars, window_start(start, specs, timeframe), end), bars):
        direct = between(compute(history, specs, first_output_ts=start), start, end)
        assert bits(direct) == bits(reference.frame)


def test_every_talib_function_agrees_with_the_full_history(btc):
    """The horizon table is complete: a recursive function missing from it would differ by
    far more than 1e-8 from the full history. (A few outputs that cross zero or are ratios
    of small numbers reach 1-2e-9 relative: CMO, DX, CVI, LINEARREG_ANGLE.)"""
    bars = btc.head(12_000)
    first = bars["ts"][7_000]
    checked = 0
    for name in talib.get_functions():
        try:
            loaded = spec(name="f", function=name)
        except ValidationError as error:
            assert any(
                reason in str(error)
                for reason in ("path-dependent", "returns positions", "'periods'")
            ), name
            continue
        assert warmup_bars(loaded) <= 7_000, name
        full = compute(bars, [loaded]).slice(7_000)
        part = compute(bars.slice(7_000 - warmup_bars(loaded)), [loaded], first_output_ts=first)
        for column in loaded.columns:
            ours, reference = part[column].to_numpy(), full[column].to_numpy()
            assert np.array_equal(np.isnan(ours), np.isnan(reference)), name
            valid = ~np.isnan(reference)
            assert relative_error(ours[valid], reference[valid]) <= 1e-8, name
        checked += 1
    assert checked > 170


# --- zero copy and input checks -----------------------------------------------------------


def test_bar_columns_reach_talib_without_a_copy(btc, monkeypatch):
    bars = btc.head(5_000)
    calls = []
    real = features._talib_function

    def recording(function):
        run = real(function)

        def record(*args):
            result = run(*args)
            calls.append((function, args, result))
            return result

        return record

    monkeypatch.setattr(features, "_talib_function", recording)
    result = compute(bars, DEFAULT_FEATURES)
    buffers = {c: bars[c].to_numpy() for c in ("high", "low", "close")}
    assert len(calls) == len(DEFAULT_FEATURES.features)
    for owner, (function, args, output) in zip(DEFAULT_FEATURES.features, calls, strict=True):
        assert function == owner.function
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        assert arrays, function
        for array in arrays:
            assert array.dtype == np.float64 and array.flags.c_contiguous
            assert any(np.shares_memory(array, b) for b in buffers.values()), function
        # And the outputs come back as polars columns over TA-Lib's own arrays.
        outputs = output if isinstance(output, tuple) else (output,)
        for column, array in zip(owner.columns, outputs, strict=True):
            tail = result[column][warmup_bars(owner) :].to_numpy()
            assert np.shares_memory(tail, array), column

    arrays = bar_arrays(bars, ["close", "volume"])
    assert np.shares_memory(arrays["close"], bars["close"].to_numpy())
    assert np.shares_memory(arrays["volume"], bars["volume"].to_numpy())


def test_other_numeric_types_are_cast(btc):
    bars = btc.head(500).with_columns(pl.col("volume").round().cast(pl.Int64))
    arrays = bar_arrays(bars, ["volume"])
    assert arrays["volume"].dtype == np.float64
    np.testing.assert_array_equal(arrays["volume"], bars["volume"].to_numpy().astype(float))


def test_nulls_in_bars_are_refused_naming_the_column(btc):
    bars = btc.head(500).with_columns(
        pl.when(pl.int_range(pl.len()) == 123).then(None).otherwise(pl.col("high")).alias("high")
    )
    with pytest.raises(FeatureInputError, match="column 'high' has 1 null"):
        compute(bars, DEFAULT_FEATURES)
    # A feature that does not read the column does not mind.
    compute(bars, [spec(name="ema", function="EMA")])


def test_unsorted_bars_and_mixed_timeframes_are_refused(btc):
    with pytest.raises(FeatureInputError, match="not sorted"):
        compute(btc.head(100).reverse(), DEFAULT_FEATURES)
    mixed = [*DEFAULT_FEATURES.features, spec(name="h", function="EMA", timeframe="1h")]
    with pytest.raises(ValueError, match="several timeframes"):
        compute(btc.head(100), mixed)


def test_a_period_past_the_data_is_empty(btc):
    late = btc["ts"][-1] + DAY
    empty = compute(btc.head(100), DEFAULT_FEATURES, first_output_ts=late)
    assert empty.schema == feature_schema(DEFAULT_FEATURES)
    assert empty.height == 0


def test_a_feature_has_the_values_of_talib_called_directly(btc):
    bars = btc.head(500)
    atr = spec(name="atr", function="ATR", params={"timeperiod": 14})
    ours = compute(bars, [atr])["atr"].to_numpy()
    high, low, close = (bars[c].to_numpy() for c in ("high", "low", "close"))
    direct = talib.ATR(high, low, close, timeperiod=14)
    warm = warmup_bars(atr)
    np.testing.assert_array_equal(ours[warm:], direct[warm:])
