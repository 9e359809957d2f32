"""The live collector with real ccxt.pro against a loopback Binance kline stream
(FakeBinanceWS) and the loopback REST server (FakeBinance): what lands in the lake.

Nothing in ccxt is mocked. The stream replays recorded minutes on a compressed clock (a
minute every MINUTE_SECONDS), and the REST server's clock is the stream's, so it serves
exactly the minutes the stream has closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest

from candlestack.config import symbol_key
from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.live import LiveCollector, PersistedCandle
from candlestack.live_status import StreamedOpens, read_status
from candlestack.sources.ccxt_source import CLOSE_MARGIN_MS, CcxtSource
from tests.integration.fake_binance import OHLCV_DIR, FakeBinance
from tests.integration.fake_binance_ws import FakeBinanceWS

ROOT = Path(__file__).resolve().parents[2]
MARKETS = {
    "BTCUSDT": OHLCV_DIR / "tooyipjee_binance_BTCUSDT_1m.csv",
    "ETHUSDT": OHLCV_DIR / "tooyipjee_binance_ETHUSDT_1m.csv",
}
SYMBOLS = {"BTC/USDT": "BTCUSDT", "ETH/USDT": "ETHUSDT"}
DAY = date(2021, 4, 22)
DAY_START_MS = int(datetime(2021, 4, 22, tzinfo=UTC).timestamp() * 1000)
MINUTE_MS = 60_000
# The stream starts a few minutes into the day: the collector's first write repairs them.
STREAM_START_MS = DAY_START_MS + 3 * MINUTE_MS
MINUTE_SECONDS = 0.4


@pytest.fixture
def servers(shared_data):
    ws = FakeBinanceWS(MARKETS, start_ms=STREAM_START_MS, minute_seconds=MINUTE_SECONDS)
    with ws, FakeBinance(MARKETS, now_ms=ws.now_ms) as rest:
        yield ws, rest


def ccxt_options(ws: FakeBinanceWS, rest: FakeBinance) -> dict:
    config = rest.ccxt_config()
    config["urls"]["api"] |= ws.ccxt_config()["urls"]["api"]
    return {**config, "timeout": 5000}


class Running:
    """A collector streaming in a thread of its own, stopped as SIGTERM would stop it."""

    def __init__(self, make: Callable[[], LiveCollector]) -> None:
        self.persisted: list[PersistedCandle] = []
        self._make = make
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.collector = self._make()
        self.collector.on_persisted.append(self.persisted.append)
        self._started.set()
        await self.collector.run(self._stop)

    @property
    def state(self):
        return self.collector.state

    def streamed(self, symbol: str) -> list[int]:
        return [c.ts_ms for c in self.persisted if c.symbol == symbol]

    def wait_streamed(self, symbol: str, count: int, timeout: float = 20.0) -> None:
        """Wait for `count` more candles of `symbol` persisted from the stream."""
        target = len(self.streamed(symbol)) + count
        wait_until(lambda: len(self.streamed(symbol)) >= target, timeout)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the collector did not stop"
        if self._error is not None:
            raise self._error


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.01)


def collector(lake: Lake, ws: FakeBinanceWS, rest: FakeBinance, **kwargs) -> Running:
    options = ccxt_options(ws, rest)
    source = CcxtSource("binance", options)
    return Running(lambda: LiveCollector(list(SYMBOLS), lake, source, options, **kwargs))


def recorded(market_id: str, start_ms: int, end_ms: int) -> pl.DataFrame:
    """The recording's candles opening in [start_ms, end_ms), as the lake holds them."""
    frame = pl.read_csv(MARKETS[market_id])
    return (
        frame.filter(pl.col("ts_ms").is_between(start_ms, end_ms, closed="left"))
        .select(
            pl.col("ts_ms").cast(pl.Datetime("ms", "UTC")).alias("ts"),
            *(pl.col(c).cast(pl.Float64) for c in ("open", "high", "low", "close", "volume")),
        )
        .sort("ts")
    )


def stored(lake: Lake, symbol: str) -> pl.DataFrame:
    frame = lake.read_days("ohlcv", "binance", "1m", symbol.replace("/", "-"), DAY, DAY)
    assert frame is not None, f"nothing of {symbol} in the lake"
    return frame


def assert_every_minute_once(lake: Lake, symbol: str) -> pl.DataFrame:
    """The lake holds the symbol's day from its first minute on, each minute once, with
    the recorded (closed) values, none imputed."""
    frame = stored(lake, symbol)
    ts = frame["ts"].dt.epoch("ms")
    assert ts.is_unique().all() and ts.is_sorted()
    assert ts.to_list() == list(range(DAY_START_MS, int(ts.max()) + MINUTE_MS, MINUTE_MS))
    assert not frame["imputed"].any()
    expected = recorded(SYMBOLS[symbol], DAY_START_MS, int(ts.max()) + MINUTE_MS)
    assert frame.drop("imputed").equals(expected)
    return frame


def repaired_over_rest(rest: FakeBinance, symbol: str, minutes: list[int]) -> bool:
    """Whether every one of `minutes` was inside a klines request to the REST server."""
    windows = [
        (int(q["startTime"]), int(q["endTime"]))
        for q in rest.requests_to()
        if q.get("symbol") == SYMBOLS[symbol] and "startTime" in q
    ]
    return all(any(lo <= m <= hi for lo, hi in windows) for m in minutes)


def not_streamed(frame: pl.DataFrame, running: Running, symbol: str) -> list[int]:
    return sorted(set(frame["ts"].dt.epoch("ms").to_list()) - set(running.streamed(symbol)))


def test_streamed_day_equals_a_rest_backfill_of_the_same_minutes(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "streamed", keep_months=True)
    running = collector(lake, ws, rest)
    running.wait_streamed("ETH/USDT", 8)
    running.wait_streamed("BTC/USDT", 8)
    running.stop()
    requests_while_streaming = rest.requests_to()

    for symbol in SYMBOLS:
        frame = assert_every_minute_once(lake, symbol)
        newest = int(frame["ts"].dt.epoch("ms").max())
        # Only the minutes before the first one streamed came over REST (those before the
        # stream started, and any that closed while the collector was still subscribing):
        # the streamed ones did not.
        first_streamed = min(running.streamed(symbol))
        assert STREAM_START_MS <= first_streamed <= STREAM_START_MS + 3 * MINUTE_MS
        assert not_streamed(frame, running, symbol) == list(
            range(DAY_START_MS, first_streamed, MINUTE_MS)
        )
        assert all(
            int(q["startTime"]) < first_streamed
            for q in requests_while_streaming
            if q["symbol"] == SYMBOLS[symbol]
        )
        # The same minutes backfilled over REST into a second lake, with the clock at the
        # end of the newest streamed minute.
        backfilled = Lake(tmp_path / f"backfilled-{symbol.replace('/', '-')}")
        source = CcxtSource("binance", ccxt_options(ws, rest))
        source.client.milliseconds = lambda end=newest + MINUTE_MS: end + CLOSE_MARGIN_MS
        Ingestor(source, backfilled).ingest(symbol, [DAY])
        key = symbol.replace("/", "-")
        assert stored(backfilled, symbol).equals(frame)
        streamed_report = lake.month_reports("ohlcv", "binance", "1m", key, DAY)[DAY]
        backfilled_report = backfilled.month_reports("ohlcv", "binance", "1m", key, DAY)[DAY]
        assert streamed_report["content_hash"] == backfilled_report["content_hash"]
        assert streamed_report["rows"] == backfilled_report["rows"] == frame.height
        assert running.state.symbols[symbol].newest_closed_ts == newest

    latencies = [c.latency_ms for c in running.persisted]
    assert latencies and all(0 < ms < 2000 for ms in latencies)
    # The server pinged every second and would have dropped a client that did not answer.
    assert running.state.reconnects == 0 and ws.connections_opened == 1


def test_a_day_s_last_minute_is_stored_from_the_stream_and_the_day_then_fetched_again(
    shared_data, tmp_path
):
    """The close of a day's last minute does not wait for the day to be fetched again: it
    is stored from the stream like any minute. Right after, the day is fetched again in
    full over REST and stored closed, as the REST top-up closes a day."""
    midnight_ms = DAY_START_MS + 1440 * MINUTE_MS
    ws = FakeBinanceWS(MARKETS, start_ms=midnight_ms - 8 * MINUTE_MS, minute_seconds=0.5)
    with ws, FakeBinance(MARKETS, now_ms=ws.now_ms) as rest:
        requests_by = {}  # (symbol, minute persisted) -> its klines requests made before

        def note(candle: PersistedCandle) -> None:
            requests_by[(candle.symbol, candle.ts_ms)] = [
                q for q in rest.requests_to() if q.get("symbol") == SYMBOLS[candle.symbol]
            ]

        lake = Lake(tmp_path / "lake", keep_months=True)
        running = collector(lake, ws, rest, on_persisted=[note])
        for symbol in SYMBOLS:
            wait_until(lambda s=symbol: midnight_ms in running.streamed(s), 20)
            wait_until(
                lambda s=symbol: lake.month_reports("ohlcv", "binance", "1m", symbol_key(s), DAY)[
                    DAY
                ]["day_closed"],
                10,
            )
        running.stop()

    for symbol in SYMBOLS:
        first = min(running.streamed(symbol))
        last = midnight_ms - MINUTE_MS
        assert first < last, "the stream must have delivered minutes before the last"
        # No request between the first streamed minute's write and the last minute's.
        assert requests_by[(symbol, last)] == requests_by[(symbol, first)]
        of_symbol = [q for q in rest.requests_to() if q.get("symbol") == SYMBOLS[symbol]]
        after = of_symbol[len(requests_by[(symbol, last)]) :]
        assert any(int(q["startTime"]) == DAY_START_MS for q in after)
        frame = assert_every_minute_once(lake, symbol)
        assert frame.height == 1440
        report = lake.month_reports("ohlcv", "binance", "1m", symbol_key(symbol), DAY)[DAY]
        assert report["day_closed"] and report["real"] == 1440


def test_a_connection_dropped_mid_minute_is_repaired_over_rest(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    # The first reconnect waits 0.75-1.5 s: two to four replayed minutes go by unstreamed.
    running = collector(lake, ws, rest, backoff_base_seconds=1.5)
    running.wait_streamed("BTC/USDT", 3)
    time.sleep(MINUTE_SECONDS / 2)
    ws.drop_connections()
    running.wait_streamed("BTC/USDT", 3)
    running.wait_streamed("ETH/USDT", 1)
    running.stop()

    assert running.state.reconnects >= 1
    assert ws.connections_opened >= 2
    for symbol in SYMBOLS:
        frame = assert_every_minute_once(lake, symbol)
        missed = [m for m in not_streamed(frame, running, symbol) if m >= STREAM_START_MS]
        assert missed, "the drop cost no minute: the test proves nothing"
        assert repaired_over_rest(rest, symbol, missed)
        assert running.state.symbols[symbol].repaired >= len(missed)


def test_a_server_restart_is_repaired_over_rest(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    running = collector(lake, ws, rest, backoff_base_seconds=0.2, backoff_max_seconds=0.5)
    running.wait_streamed("BTC/USDT", 3)
    ws.stop()
    time.sleep(4 * MINUTE_SECONDS)
    ws.start()
    running.wait_streamed("BTC/USDT", 3)
    running.wait_streamed("ETH/USDT", 1)
    running.stop()

    for symbol in SYMBOLS:
        frame = assert_every_minute_once(lake, symbol)
        missed = [m for m in not_streamed(frame, running, symbol) if m >= STREAM_START_MS]
        assert len(missed) >= 3
        assert repaired_over_rest(rest, symbol, missed)


def test_a_collector_restart_resumes_from_the_lake(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    first = collector(lake, ws, rest)
    first.wait_streamed("BTC/USDT", 3)
    first.stop()
    time.sleep(3 * MINUTE_SECONDS)
    second = collector(lake, ws, rest)
    second.wait_streamed("BTC/USDT", 2)
    second.wait_streamed("ETH/USDT", 1)
    second.stop()

    for symbol in SYMBOLS:
        frame = assert_every_minute_once(lake, symbol)
        streamed = set(first.streamed(symbol)) | set(second.streamed(symbol))
        missed = [m for m in frame["ts"].dt.epoch("ms").to_list() if m not in streamed]
        assert [m for m in missed if m >= STREAM_START_MS]
        assert repaired_over_rest(rest, symbol, missed)


def test_the_minutely_rest_top_up_and_the_collector_share_the_open_month(servers, tmp_path):
    """The schedule's REST top-up keeps running beside the collector: both rewrite the open
    month, and still every minute is stored once, with its recorded values."""
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    running = collector(lake, ws, rest)
    source = CcxtSource("binance", ccxt_options(ws, rest))
    source.client.milliseconds = ws.now_ms
    topping_up = threading.Event()
    top_ups = []

    def top_up() -> None:
        ingestor = Ingestor(source, Lake(tmp_path / "lake"))
        while not topping_up.is_set():
            for symbol in SYMBOLS:
                top_ups.extend(ingestor.ingest(symbol, [DAY], keep_closed=True))

    thread = threading.Thread(target=top_up)
    thread.start()
    try:
        running.wait_streamed("BTC/USDT", 8)
        running.wait_streamed("ETH/USDT", 1)
    finally:
        topping_up.set()
        thread.join(10)
    running.stop()

    assert sum(o.write.written for o in top_ups) >= 2, "the top-up never wrote: no contest"
    for symbol in SYMBOLS:
        assert_every_minute_once(lake, symbol)
        report = lake.month_reports("ohlcv", "binance", "1m", symbol.replace("/", "-"), DAY)
        assert report[DAY]["revised"] == 0


def test_each_minute_s_open_is_published_as_the_minute_opens(servers, tmp_path):
    """The dry-run's fill price (the open of the minute after a bar) is there the instant
    the minute opens, from the stream, long before the minute closes."""
    ws, rest = servers
    opens = StreamedOpens(tmp_path / "opens")
    published: list[tuple[str, int, float, int]] = []

    def publish(symbol: str, ts_ms: int, open_: float) -> None:
        opens.record(symbol, ts_ms, open_)
        published.append((symbol, ts_ms, open_, ws.now_ms()))

    running = collector(Lake(tmp_path / "lake", keep_months=True), ws, rest, on_opened=[publish])
    running.wait_streamed("BTC/USDT", 4)
    running.stop()
    for symbol, market_id in SYMBOLS.items():
        minutes = [(ts, o, at) for s, ts, o, at in published if s == symbol]
        ts = [m[0] for m in minutes]
        assert ts == list(range(ts[0], ts[-1] + MINUTE_MS, MINUTE_MS)), "each minute once"
        expected = recorded(market_id, ts[0], ts[-1] + MINUTE_MS)["open"].to_list()
        assert [m[1] for m in minutes] == expected
        # Published in the first half of the minute (on the replay's clock, where a minute
        # is 0.4 s: the slack is the event loop's under load), long before its close, after
        # the minute that was forming when the collector subscribed.
        assert all(at - ts_ms < MINUTE_MS / 2 for ts_ms, _, at in minutes[1:])
        assert opens.open_at(symbol, ts[-1]) == expected[-1]
        assert opens.open_at(symbol, ts[-2]) is None  # it moved on: the lake holds that one


def test_bad_input_is_rejected_and_counted_while_the_stream_goes_on(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    running = collector(lake, ws, rest)
    running.wait_streamed("BTC/USDT", 2)
    # Sent right after a minute closed: the next minute is forming, for a whole minute.
    running.wait_streamed("BTC/USDT", 1)
    closed = running.streamed("BTC/USDT")[-1]
    forming = closed + MINUTE_MS
    ws.send_raw(ws.kline("BTCUSDT", closed, closed=True))  # the same close again
    ws.send_raw(ws.kline("BTCUSDT", forming, closed=True, h="1.0", l="2.0"))
    ws.send_raw(ws.kline("BTCUSDT", closed - 3 * MINUTE_MS, closed=True))
    ws.send_raw('{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":')
    ws.send_raw(ws.kline("DOGEUSDT", forming, closed=True))  # listed, not streamed
    ws.send_raw(ws.kline("NOSUCHPAIR", forming, closed=False))
    ws.send_raw(ws.kline("BTCUSDT", forming, closed=True, o="oops"))
    eth_before = len(running.streamed("ETH/USDT"))
    running.wait_streamed("BTC/USDT", 3)
    running.wait_streamed("ETH/USDT", 1)
    running.stop()

    btc = running.state.symbols["BTC/USDT"]
    assert btc.rejected == {
        "duplicate kline": 1,
        "high < low": 1,
        "out-of-order kline": 1,
        "malformed kline": 1,
    }
    assert running.state.rejected == {"malformed JSON": 1, "unknown symbol": 2}
    assert running.state.symbols["ETH/USDT"].rejected == {}
    # Nothing dropped the connection; both symbols kept streaming, nothing bad was stored.
    assert running.state.reconnects == 0 and ws.connections_opened == 1
    assert len(running.streamed("ETH/USDT")) > eth_before
    assert forming in running.streamed("BTC/USDT")
    for symbol in SYMBOLS:
        assert_every_minute_once(lake, symbol)


def test_a_stalled_socket_is_reconnected_within_the_timeout(servers, tmp_path):
    ws, rest = servers
    lake = Lake(tmp_path / "lake", keep_months=True)
    stall_seconds = 1.5
    running = collector(lake, ws, rest, stall_seconds=stall_seconds, backoff_base_seconds=0.1)
    running.wait_streamed("BTC/USDT", 2)
    ws.stall()
    stalled_at = time.monotonic()
    wait_until(lambda: running.state.stalls == 1, stall_seconds + 2)
    detected_after = time.monotonic() - stalled_at
    running.wait_streamed("BTC/USDT", 2)
    running.stop()

    # Silence is noticed after stall_seconds of no kline, not before, and not much after.
    assert stall_seconds - MINUTE_SECONDS <= detected_after <= stall_seconds + 1.0
    assert ws.connections_opened == 2
    for symbol in SYMBOLS:
        frame = assert_every_minute_once(lake, symbol)
        missed = [m for m in not_streamed(frame, running, symbol) if m >= STREAM_START_MS]
        assert missed and repaired_over_rest(rest, symbol, missed)


def test_sigterm_mid_stream_exits_cleanly_and_leaves_no_partial_file(servers, tmp_path):
    ws, rest = servers
    lake_root = tmp_path / "lake"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")},
        "PYTHONPATH": str(ROOT),
        "CANDLESTACK_SOURCE": "ccxt",
        "CANDLESTACK_SYMBOLS": ",".join(SYMBOLS),
        "CANDLESTACK_LAKE": str(lake_root),
        "CANDLESTACK_CCXT_OPTIONS": json.dumps(ccxt_options(ws, rest)),
        "CANDLESTACK_LIVE_STATUS": str(tmp_path / "live" / "status.json"),
    }
    process = subprocess.Popen(
        # faulthandler: a collector that hangs shows where, on SIGABRT.
        [sys.executable, "-X", "faulthandler", "-m", "candlestack.live"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lake = Lake(lake_root)
    try:
        wait_until(lambda: lake.newest_ts("ohlcv", "binance", "1m", "ETH-USDT") is not None, 30)
        first = lake.newest_ts("ohlcv", "binance", "1m", "ETH-USDT")
        # Stopped while minutes keep closing: a write may well be in flight.
        wait_until(lambda: lake.newest_ts("ohlcv", "binance", "1m", "ETH-USDT") > first, 10)
        time.sleep(MINUTE_SECONDS * 0.9)
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            output, _ = process.communicate()
            raise AssertionError(f"no exit within 15 s of SIGTERM:\n{output}") from None
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "stopped" in output
    # Its last status, for the metrics endpoint and the live_feed sensor.
    status = read_status(tmp_path / "live" / "status.json")
    for symbol in SYMBOLS:
        streamed = status["symbols"][symbol]
        assert streamed["messages"] > streamed["persisted"] > 0
        assert streamed["latency_count"] == streamed["persisted"]
        newest = lake.newest_ts("ohlcv", "binance", "1m", symbol_key(symbol))
        assert streamed["newest_closed_ts"] == int(newest.timestamp() * 1000)
    leftovers = [p for p in lake_root.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert all(p.name == "data.parquet" for p in leftovers), leftovers
    for symbol in SYMBOLS:
        assert_every_minute_once(lake, symbol)
