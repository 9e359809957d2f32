"""Real ccxt (4.5.90, sync ``ccxt.binance``) against the loopback FakeBinance.

What each injected fault surfaces as in ccxt (observed by running these tests):

    "429"            -> ccxt.DDoSProtection (NOT RateLimitExceeded: binance.handle_errors
                        raises DDoSProtection for any 418/429 before reading the -1003 code;
                        both are NetworkError subclasses but siblings, not parent/child)
    "500"            -> ccxt.ExchangeNotAvailable (gateway-style non-JSON body)
    "503"            -> ccxt.ExchangeNotAvailable (gateway-style non-JSON body)
    "500"/"503" with Binance JSON body {"code":-1000|-1001,...}
                     -> ccxt.OperationFailed itself, which is NOT a NetworkError
    "timeout"        -> ccxt.RequestTimeout (when client timeout < server.timeout_sleep)
    "truncated"      -> NO exception: fetch_ohlcv returns [] (ccxt's JSON parse fails
                        silently on a 200 and the raw string goes to parse_ohlcvs).
                        On exchangeInfo, load_markets() returns {} just as silently;
                        later market lookups raise ccxt.BadSymbol client-side
    "bad_row"        -> NO exception: the row comes back with high < low as-is
    unknown symbol (400 -1121) -> ccxt.BadSymbol

ccxt only requested /api/v3/exchangeInfo (load_markets) and /api/v3/klines
(fetch_ohlcv); it never called /ping or /time. ccxt's default for
maxRetriesOnFailure is 0, so every fault reaches the caller on the first try.
"""

from __future__ import annotations

import csv
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ccxt
import pytest

from tests.integration.fake_binance import OHLCV_DIR, FakeBinance, Fault

ETH_CSV = OHLCV_DIR / "tooyipjee_binance_ETHUSDT_1m.csv"
BTC_CSV = OHLCV_DIR / "tooyipjee_binance_BTCUSDT_1m.csv"
ETH_FIRST_MS = 1618951200000  # 2021-04-20T20:40Z
GAP_BEFORE_MS = 1619323200000  # 2021-04-25T04:00Z, last candle before the maintenance gap
GAP_AFTER_MS = 1619340300000  # 2021-04-25T08:45Z, first candle after it (284 missing)


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))[1:]


ETH_ROWS = _csv_rows(ETH_CSV)


@pytest.fixture
def srv() -> Iterator[FakeBinance]:
    with FakeBinance({"ETHUSDT": ETH_CSV, "BTCUSDT": BTC_CSV}) as server:
        yield server
        assert server.errors == []


def _exchange(server: FakeBinance, timeout_ms: int = 1000) -> ccxt.binance:
    # No rate limiter: it would only slow these tests down.
    return ccxt.binance({**server.ccxt_config(), "timeout": timeout_ms, "enableRateLimit": False})


@pytest.fixture
def ex(srv: FakeBinance) -> ccxt.binance:
    exchange = _exchange(srv)
    exchange.load_markets()
    srv.clear_requests()
    return exchange


def _raw_get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_load_markets_parses_real_filters(srv: FakeBinance) -> None:
    exchange = _exchange(srv)
    markets = exchange.load_markets()

    assert len(markets) == 13
    btc = markets["BTC/USDT"]
    assert btc["id"] == "BTCUSDT"
    # From the 2021-03-24 exchangeInfo: LOT_SIZE stepSize/minQty 0.000001, maxQty 9000,
    # PRICE_FILTER tickSize 0.01, MIN_NOTIONAL 10.
    assert btc["precision"]["amount"] == 0.000001
    assert btc["precision"]["price"] == 0.01
    assert btc["limits"]["amount"] == {"min": 0.000001, "max": 9000.0}
    assert btc["limits"]["price"] == {"min": 0.01, "max": 1000000.0}
    assert btc["limits"]["cost"]["min"] == 10.0
    assert [p for p, _ in srv.requests] == ["/api/v3/exchangeInfo"]


def test_fetch_ohlcv_returns_exactly_the_csv_rows(srv: FakeBinance, ex: ccxt.binance) -> None:
    candles = ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=1000)

    expected = [[int(r[0]), *map(float, r[1:])] for r in ETH_ROWS[:1000]]
    assert candles == expected
    assert srv.requests == [
        (
            "/api/v3/klines",
            {
                "interval": "1m",
                "limit": "1000",
                "symbol": "ETHUSDT",
                "startTime": str(ETH_FIRST_MS),
            },
        )
    ]


def test_raw_klines_keep_csv_digits_and_binance_shape(srv: FakeBinance) -> None:
    status, _, body = _raw_get(f"{srv.url}/klines?symbol=ETHUSDT&interval=1m&limit=3")
    assert status == 200
    # No startTime: Binance returns the latest candles, here the end of the CSV.
    rows = json.loads(body)
    assert [r[0] for r in rows] == [int(r[0]) for r in ETH_ROWS[-3:]]

    # Round numbers like "2310" must stay "2310", not "2310.0".
    i = next(i for i, r in enumerate(ETH_ROWS) if r[1] == "2310")
    start = int(ETH_ROWS[i][0])
    _, _, body = _raw_get(
        f"{srv.url}/klines?symbol=ETHUSDT&interval=1m&startTime={start}&endTime={start}"
    )
    (row,) = json.loads(body)
    assert len(row) == 12
    assert row[:6] == [start, *ETH_ROWS[i][1:]]
    assert row[6] == start + 59_999


def test_gap_stays_missing_and_limit_counts_present_rows(ex: ccxt.binance) -> None:
    candles = ex.fetch_ohlcv("ETH/USDT", "1m", since=GAP_BEFORE_MS - 60_000, limit=4)
    assert [c[0] for c in candles] == [
        GAP_BEFORE_MS - 60_000,
        GAP_BEFORE_MS,
        GAP_AFTER_MS,
        GAP_AFTER_MS + 60_000,
    ]


def test_end_time_is_inclusive(ex: ccxt.binance) -> None:
    until = ETH_FIRST_MS + 2 * 60_000
    candles = ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, params={"until": until})
    assert [c[0] for c in candles] == [ETH_FIRST_MS, ETH_FIRST_MS + 60_000, until]


def test_only_closed_candles_are_served() -> None:
    # At now = open + 5.5 min, the candle opened at +5 min is still forming.
    now = ETH_FIRST_MS + 5 * 60_000 + 30_000
    with FakeBinance({"ETHUSDT": ETH_CSV}, now_ms=lambda: now) as server:
        exchange = _exchange(server)
        exchange.load_markets()
        since = exchange.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=1000)
        latest = exchange.fetch_ohlcv("ETH/USDT", "1m", limit=2)
        server.now_ms = now + 60_000  # the clock is live: one more candle closes
        later = exchange.fetch_ohlcv("ETH/USDT", "1m", limit=2)

    assert [c[0] for c in since] == [ETH_FIRST_MS + k * 60_000 for k in range(5)]
    assert [c[0] for c in latest] == [ETH_FIRST_MS + 3 * 60_000, ETH_FIRST_MS + 4 * 60_000]
    assert [c[0] for c in later] == [ETH_FIRST_MS + 4 * 60_000, ETH_FIRST_MS + 5 * 60_000]


def test_unknown_symbol_is_bad_symbol(srv: FakeBinance, ex: ccxt.binance) -> None:
    # SOL/USDT is in exchangeInfo (so ccxt sends the request) but has no CSV.
    with pytest.raises(ccxt.BadSymbol):
        ex.fetch_ohlcv("SOL/USDT", "1m", since=ETH_FIRST_MS)
    status, _, body = _raw_get(f"{srv.url}/klines?symbol=NOPE&interval=1m")
    assert (status, json.loads(body)) == (400, {"code": -1121, "msg": "Invalid symbol."})


@pytest.mark.parametrize(
    ("fault", "body", "exc"),
    [
        ("429", None, ccxt.DDoSProtection),
        ("500", None, ccxt.ExchangeNotAvailable),
        ("503", None, ccxt.ExchangeNotAvailable),
        ("500", '{"code":-1000,"msg":"An unknown error occurred."}', ccxt.OperationFailed),
        ("503", '{"code":-1001,"msg":"Internal error."}', ccxt.OperationFailed),
        ("timeout", None, ccxt.RequestTimeout),
    ],
)
def test_error_faults_raise_then_recover(
    srv: FakeBinance, ex: ccxt.binance, fault: Fault, body: str | None, exc: type[Exception]
) -> None:
    srv.timeout_sleep = 1.5  # > the client's 1000 ms
    srv.inject(fault, body=body)

    with pytest.raises(exc) as info:
        ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=5)
    assert type(info.value) is exc  # the exact class, not just a subclass of it
    # One-shot: the next request is served normally.
    assert len(ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=5)) == 5
    assert srv.pending_faults == []
    assert len(srv.requests_to()) == 2


def test_429_carries_retry_after(srv: FakeBinance) -> None:
    srv.inject("429", path=None)
    status, headers, body = _raw_get(f"{srv.url}/ping")
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert json.loads(body)["code"] == -1003


def test_truncated_klines_silently_return_nothing(srv: FakeBinance, ex: ccxt.binance) -> None:
    srv.inject("truncated")
    assert ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=5) == []
    assert len(ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=5)) == 5


def test_truncated_exchange_info_gives_empty_markets(srv: FakeBinance) -> None:
    srv.inject("truncated", path="/api/v3/exchangeInfo")
    exchange = _exchange(srv)
    assert exchange.load_markets() == {}
    # The damage shows up later, as a client-side BadSymbol with no request sent.
    with pytest.raises(ccxt.BadSymbol):
        exchange.market("ETH/USDT")
    # Empty markets count as "not loaded", so a plain load_markets() fetches again.
    assert "BTC/USDT" in exchange.load_markets()
    assert [p for p, _ in srv.requests] == ["/api/v3/exchangeInfo"] * 2


def test_bad_row_passes_through_ccxt(srv: FakeBinance, ex: ccxt.binance) -> None:
    srv.inject("bad_row", symbol="ETHUSDT")
    candles = ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=3)
    _, _, high, low, _, _ = candles[0]
    assert high < low
    assert [c[0] for c in candles] == [ETH_FIRST_MS + k * 60_000 for k in range(3)]
    assert all(c[2] >= c[3] for c in candles[1:])


def test_hidden_minutes_reappear_on_refetch(srv: FakeBinance, ex: ccxt.binance) -> None:
    hole = (ETH_FIRST_MS + 60_000, ETH_FIRST_MS + 2 * 60_000)
    srv.hide("ETHUSDT", *hole, times=1)
    # A request not reaching the hidden range does not use up `times`.
    assert len(ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=1)) == 1

    first = ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=5)
    again = ex.fetch_ohlcv("ETH/USDT", "1m", since=hole[0], params={"until": hole[1]})

    step = [ETH_FIRST_MS + k * 60_000 for k in range(7)]
    assert [c[0] for c in first] == [step[0], *step[3:7]]  # limit filled past the hole
    assert [c[0] for c in again] == list(hole)
    assert srv.requests_to()[-1]["startTime"] == str(hole[0])


def test_hide_until_unhide(ex: ccxt.binance, srv: FakeBinance) -> None:
    srv.hide("ETHUSDT", ETH_FIRST_MS, ETH_FIRST_MS)
    for _ in range(2):
        assert ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=1)[0][0] != ETH_FIRST_MS
    srv.unhide()
    assert ex.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=1)[0][0] == ETH_FIRST_MS


def test_parked_timeout_blocks_neither_requests_nor_shutdown() -> None:
    with FakeBinance({"ETHUSDT": ETH_CSV}, timeout_sleep=60) as server:
        exchange = _exchange(server, timeout_ms=200)
        exchange.load_markets()
        server.inject("timeout")
        with pytest.raises(ccxt.RequestTimeout):
            exchange.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS)
        # The parked handler (60 s) must not hold up other requests...
        assert len(exchange.fetch_ohlcv("ETH/USDT", "1m", since=ETH_FIRST_MS, limit=2)) == 2
        started = time.monotonic()  # ...nor the shutdown in __exit__.
    assert time.monotonic() - started < 2
    assert server.errors == []
