"""Replay: every recorded format reads to the same candles; market rules from exchangeInfo."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack.errors import SourceError, SourceFormatError
from candlestack.ingest import day_start_ms
from candlestack.schema import DAY_MS, MARKETS, MINUTE_MS, RAW_CANDLES
from candlestack.sources.replay import ReplaySource, read_candle_file, read_exchange_info
from candlestack.validate import LATEST_MS
from tests.conftest import SHARED

DATA = SHARED
BTC = DATA / "ohlcv" / "tooyipjee_binance_BTCUSDT_1m.csv"
ADA = DATA / "ohlcv" / "francomalatacca_binance_ADAEUR_1m.csv"
ADA_KLINES = DATA / "exchange" / "spot_api_v3_klines_ADAEUR_1m_2021-03-23T2210Z_1440rows_raw.json"
EXCHANGE_INFO = DATA / "exchange" / "spot_api_v3_exchangeInfo_2021-03-24_mainnet_subset13.json"

# 2021-04-25 03:00 .. 10:00 around the maintenance gap: 420 minutes, 284 of them absent.
SLICE_START = day_start_ms(date(2021, 4, 25)) + 3 * 60 * MINUTE_MS
SLICE = (SLICE_START, SLICE_START + 7 * 60 * MINUTE_MS)


@pytest.fixture(scope="module")
def btc() -> pl.DataFrame:
    return read_candle_file(BTC)


@pytest.fixture(scope="module")
def rows() -> list[tuple[int, float, float, float, float, float]]:
    """The slice's rows as the CSV has them, parsed with the standard library."""
    with open(BTC, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["ts_ms", "open", "high", "low", "close", "volume"]
        parsed = [(int(r[0]), *map(float, r[1:])) for r in reader]
    return [r for r in parsed if SLICE[0] <= r[0] < SLICE[1]]


@pytest.fixture(scope="module")
def expected(btc) -> pl.DataFrame:
    return btc.filter(pl.col("ts").is_between(*SLICE, closed="left"))


def test_normalised_csv(btc, rows, expected):
    assert btc.schema == RAW_CANDLES
    assert btc.height == 42_915
    assert btc["ts"].is_sorted() and btc["ts"].n_unique() == btc.height
    assert expected.rows() == rows
    assert expected.height == 420 - 284


# Writers of one recording format each, from the rows of the normalised CSV.


def freqtrade_json(rows, path: Path) -> None:
    path.write_text(json.dumps([list(r) for r in rows]))


def frame_of(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=RAW_CANDLES, orient="row")


def parquet_ts_datetime(rows, path: Path) -> None:
    frame_of(rows).with_columns(pl.col("ts").cast(pl.Datetime("ms", "UTC"))).write_parquet(path)


def parquet_ts_datetime_ns(rows, path: Path) -> None:
    frame = frame_of(rows).with_columns((pl.col("ts") * 1_000_000).cast(pl.Datetime("ns", "UTC")))
    frame.write_parquet(path)


def parquet_ts_ms(rows, path: Path) -> None:
    frame_of(rows).write_parquet(path)


def parquet_ts_ms_column(rows, path: Path) -> None:
    frame_of(rows).rename({"ts": "ts_ms"}).write_parquet(path)


def freqtrade_feather(rows, path: Path) -> None:
    # freqtrade: date as datetime64[ns, UTC], then the OHLCV columns.
    frame = frame_of(rows).select(
        (pl.col("ts") * 1_000_000).cast(pl.Datetime("ns", "UTC")).alias("date"),
        "open",
        "high",
        "low",
        "close",
        "volume",
    )
    frame.write_ipc(path)


def kline_row(r, unit: int) -> list[str]:
    ts, o, h, lo, c, v = r
    close_time = (ts + MINUTE_MS) * unit - 1
    prices = [repr(x) for x in (o, h, lo, c, v)]
    return [str(ts * unit), *prices, str(close_time), "123.4", "17", "1.5", "98.7", "0"]


def binance_kline_csv(rows, path: Path, unit: int = 1, header: bool = False) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(
                [
                    "open_time",
                    "open",
                    "high",
                    "low",
                    "close",
                    "volume",
                    "close_time",
                    "quote_volume",
                    "count",
                    "taker_buy_volume",
                    "taker_buy_quote_volume",
                    "ignore",
                ]
            )
        writer.writerows(kline_row(r, unit) for r in rows)


FORMATS: dict[str, tuple[str, Callable]] = {
    "freqtrade-json": ("BTC_USDT-1m.json", freqtrade_json),
    "parquet-ts-datetime": ("btc.parquet", parquet_ts_datetime),
    "parquet-ts-datetime-ns": ("btc.parquet", parquet_ts_datetime_ns),
    "parquet-ts-ms": ("btc.parquet", parquet_ts_ms),
    "parquet-ts_ms-column": ("btc.parquet", parquet_ts_ms_column),
    "freqtrade-feather": ("BTC_USDT-1m.feather", freqtrade_feather),
    "kline-csv-ms": ("BTCUSDT-1m-2021-04-25.csv", binance_kline_csv),
    "kline-csv-us": (
        "BTCUSDT-1m-2025-01-01.csv",
        lambda rows, path: binance_kline_csv(rows, path, unit=1000),
    ),
    "kline-csv-header": (
        "BTCUSDT-1m.CSV",
        lambda rows, path: binance_kline_csv(rows, path, header=True),
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_frame(fmt, rows, expected, tmp_path):
    name, write = FORMATS[fmt]
    path = tmp_path / name
    write(rows, path)

    assert_frame_equal(read_candle_file(path), expected)


def test_unsorted_recording_is_sorted(rows, expected, tmp_path):
    path = tmp_path / "shuffled.json"
    freqtrade_json(rows[::-1], path)
    assert_frame_equal(read_candle_file(path), expected)


def test_raw_binance_klines_match_the_normalised_csv(tmp_path):
    raw = json.loads(ADA_KLINES.read_text())
    assert len(raw) == 1440 and len(raw[0]) == 12
    normalised = read_candle_file(ADA)

    csv_path = tmp_path / "ADAEUR-1m-2021-03-23.csv"
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows(raw)
    us_path = tmp_path / "ADAEUR-1m-us.csv"
    with open(us_path, "w", newline="") as handle:
        csv.writer(handle).writerows([r[0] * 1000, *r[1:6], r[6] * 1000 + 999, *r[7:]] for r in raw)

    assert normalised.height == 1440
    assert_frame_equal(read_candle_file(csv_path), normalised)
    assert_frame_equal(read_candle_file(us_path), normalised)
    # The payload as saved from the API (string prices) reads as the JSON format.
    assert_frame_equal(read_candle_file(ADA_KLINES), normalised)


def test_json_with_integral_prices_first_keeps_later_fractions(tmp_path):
    rows = [[SLICE_START + i * MINUTE_MS, 100, 101, 99, 100, 5] for i in range(150)]
    rows.append([SLICE_START + 150 * MINUTE_MS, 100.5, 101.25, 99.75, 100.5, 5.5])
    path = tmp_path / "integral.json"
    path.write_text(json.dumps(rows))

    last = read_candle_file(path).row(-1)

    assert last == (SLICE_START + 150 * MINUTE_MS, 100.5, 101.25, 99.75, 100.5, 5.5)


# --- errors name the file ---------------------------------------------------------------


def test_unknown_extension_names_the_file(tmp_path):
    path = tmp_path / "candles.txt"
    path.write_text("ts_ms,open,high,low,close,volume\n")
    with pytest.raises(SourceFormatError, match="unsupported extension") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


def test_unknown_csv_header_names_the_file(tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text("when,price\n1,2\n")
    with pytest.raises(SourceFormatError, match="unrecognised CSV header") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)
    assert "when,price" in str(info.value)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(SourceFormatError, match="does not exist") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


def test_parquet_without_time_column_names_the_file(tmp_path):
    path = tmp_path / "no_time.parquet"
    pl.DataFrame({"open": [1.0], "close": [1.0]}).write_parquet(path)
    with pytest.raises(SourceFormatError, match="no ts, ts_ms, date or open_time") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("payload", ['{"ts": 1}', "[[1, 2, 3]]", "not json"])
def test_bad_json_names_the_file(payload, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(payload)
    with pytest.raises(SourceFormatError) as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


def test_corrupt_parquet_is_a_format_error(tmp_path):
    path = tmp_path / "torn.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceFormatError, match="cannot read candles from") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


# --- timestamps in the wrong unit ------------------------------------------------------


def normalised_csv(frame: pl.DataFrame, path: Path) -> None:
    frame.rename({"ts": "ts_ms"}).write_csv(path)


IN_SECONDS: dict[str, tuple[str, Callable]] = {
    "normalised-csv": ("btc.csv", lambda rows, path: normalised_csv(frame_of(rows), path)),
    "freqtrade-json": ("BTC_USDT-1m.json", freqtrade_json),
    "parquet-ts-ms": ("btc.parquet", parquet_ts_ms),
}


@pytest.mark.parametrize("fmt", IN_SECONDS)
def test_a_recording_in_seconds_is_refused_naming_the_file(fmt, rows, tmp_path):
    name, write = IN_SECONDS[fmt]
    path = tmp_path / name
    write([(r[0] // 1000, *r[1:]) for r in rows], path)

    with pytest.raises(SourceFormatError, match="timestamps look like seconds") as info:
        read_candle_file(path)
    assert str(path) in str(info.value)


def with_ts(frame: pl.DataFrame, at: int, ts: int | None) -> pl.DataFrame:
    """`frame` with the timestamp of its row at `at` replaced."""
    return frame.with_columns(
        ts=pl.when(pl.col("ts") == at).then(pl.lit(ts, pl.Int64)).otherwise(pl.col("ts"))
    )


def test_a_row_in_seconds_is_served_with_the_minute_it_stands_for(btc, tmp_path):
    stray = SLICE_START + 17 * MINUTE_MS
    path = tmp_path / "btc.csv"
    normalised_csv(with_ts(btc, stray, stray // 1000), path)
    source = ReplaySource({"BTC/USDT": path})

    minute = source.fetch_candles("BTC/USDT", stray, stray + MINUTE_MS)
    assert minute.rows() == [(stray // 1000, *btc.filter(pl.col("ts") == stray).row(0)[1:])]
    assert source.fetch_candles("BTC/USDT", 0, stray).filter(pl.col("ts") < SLICE_START).height
    assert stray // 1000 not in source.fetch_candles("BTC/USDT", 0, stray)["ts"]
    # Nor does it stretch the recording back to 1970.
    assert source.covered_days("BTC/USDT") == (date(2021, 4, 21), date(2021, 5, 19))


def test_one_row_in_microseconds_among_milliseconds_is_not_converted(btc, tmp_path):
    # Only a file in µs as a whole is (Binance public data since 2025): a stray row is left
    # for validation to refuse, not silently made a candle.
    stray = SLICE_START + 17 * MINUTE_MS
    path = tmp_path / "BTCUSDT-1m.csv"
    normalised_csv(with_ts(btc, stray, stray * 1000), path)

    served = ReplaySource({"BTC/USDT": path}).fetch_candles("BTC/USDT", *SLICE)

    assert served.height == 420 - 284
    assert stray * 1000 in served["ts"] and stray not in served["ts"]


def test_a_row_no_unit_places_in_time_is_served_once_with_the_first_whole_day(btc, tmp_path):
    garbled = pl.DataFrame(
        [(-MINUTE_MS, 1.0, 1.0, 1.0, 1.0, 1.0), (None, 2.0, 2.0, 2.0, 2.0, 2.0)],
        schema=RAW_CANDLES,
        orient="row",
    )
    path = tmp_path / "btc.parquet"
    pl.concat([btc, garbled]).write_parquet(path)
    source = ReplaySource({"BTC/USDT": path})
    first_day = day_start_ms(date(2021, 4, 21))

    served = source.fetch_candles("BTC/USDT", first_day, first_day + MINUTE_MS)

    assert served["ts"].to_list() == [-MINUTE_MS, first_day, None]
    assert source.fetch_candles("BTC/USDT", 0, LATEST_MS).height == btc.height + 2


# --- market rules ---------------------------------------------------------------------


def binance_filters(symbol: dict) -> dict[str, dict]:
    return {f["filterType"]: f for f in symbol["filters"]}


@pytest.fixture(scope="module")
def exchange_info() -> tuple[dict, pl.DataFrame]:
    return json.loads(EXCHANGE_INFO.read_text()), read_exchange_info(EXCHANGE_INFO)


def test_exchange_info_btc_usdt_rules_match_the_filters(exchange_info):
    payload, markets = exchange_info
    raw = next(s for s in payload["symbols"] if s["symbol"] == "BTCUSDT")
    filters = binance_filters(raw)

    btc = markets.filter(pl.col("symbol") == "BTC/USDT").row(0, named=True)

    assert btc["market_id"] == "BTCUSDT"
    assert (btc["base"], btc["quote"]) == ("BTC", "USDT")
    assert btc["amount_step"] == float(filters["LOT_SIZE"]["stepSize"]) == 1e-6
    assert btc["price_tick"] == float(filters["PRICE_FILTER"]["tickSize"]) == 0.01
    assert btc["min_cost"] == float(filters["MIN_NOTIONAL"]["minNotional"]) == 10.0
    assert btc["min_amount"] == float(filters["LOT_SIZE"]["minQty"])
    assert btc["max_amount"] == float(filters["LOT_SIZE"]["maxQty"])
    assert btc["active"] is True


def test_exchange_info_every_market_matches_its_filters(exchange_info):
    payload, markets = exchange_info
    assert markets.schema == MARKETS
    assert markets.height == len(payload["symbols"]) == 13
    by_id = {r["market_id"]: r for r in markets.iter_rows(named=True)}
    for raw in payload["symbols"]:
        filters = binance_filters(raw)
        market = by_id[raw["symbol"]]
        assert market["symbol"] == f"{raw['baseAsset']}/{raw['quoteAsset']}"
        assert market["amount_step"] == float(filters["LOT_SIZE"]["stepSize"]), raw["symbol"]
        assert market["price_tick"] == float(filters["PRICE_FILTER"]["tickSize"]), raw["symbol"]
        assert market["min_cost"] == float(filters["MIN_NOTIONAL"]["minNotional"]), raw["symbol"]


# --- ReplaySource ---------------------------------------------------------------------


def test_replay_source_for_unconfigured_symbol_names_it():
    source = ReplaySource({"BTC/USDT": BTC})
    with pytest.raises(SourceError, match="SOL/USDT") as info:
        source.fetch_candles("SOL/USDT", 0, DAY_MS)
    assert "BTC/USDT" in str(info.value)  # and says what is configured


def test_replay_source_serves_the_half_open_window(expected):
    source = ReplaySource({"BTC/USDT": str(BTC)}, clock=lambda: 1_700_000_000.0)
    got = source.fetch_candles("BTC/USDT", *SLICE)

    assert_frame_equal(got, expected)
    edge = source.fetch_candles("BTC/USDT", SLICE[0], SLICE[0] + MINUTE_MS)
    assert edge["ts"].to_list() == [SLICE[0]]
    assert source.now_ms() == 1_700_000_000_000
    assert source.kind == "replay" and source.exchange == "binance"


def test_replay_source_markets():
    assert ReplaySource({}).load_markets().equals(pl.DataFrame(schema=MARKETS))
    markets = ReplaySource({}, markets_file=EXCHANGE_INFO).load_markets()
    assert "ETH/USDT" in markets["symbol"].to_list()
