"""The live collector: 1-minute candles streamed over WebSocket (ccxt.pro), each persisted
into the lake's open month the moment it closes.

This module is the stream: ccxt.pro's subscription kept alive (reconnects with backoff,
stalls detected) and each kline judged. A closed candle accepted goes to the
`live_writer.CandleWriter`, which persists it through the REST ingest's own pass: the same
validation, gap pass, imputation, atomic write and content hashes, so a streamed day and a
REST-backfilled day are the same rows, and minutes the stream missed are repaired over REST
in the same write.

A candle counts as closed when Binance's kline says so (its `x` flag, read by a small
override of ccxt.pro's kline handler): forming updates are never stored.

Run it with `python -m candlestack.live` (settings from CANDLESTACK_*).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import ccxt
import ccxt.pro
import polars as pl
from ccxt.async_support.base.ws.client import Client

from candlestack.config import Settings, load_settings, symbol_key
from candlestack.errors import ConfigError
from candlestack.feature_store import load_feature_set
from candlestack.lake import Lake
from candlestack.live_build import BuildOnClose
from candlestack.live_status import UNATTRIBUTED, WRITE_EVERY_S, StatusRecorder, StreamedOpens
from candlestack.live_writer import (
    TIMEFRAME,
    CandleWriter,
    CollectorState,
    PersistedCandle,
    SymbolState,
)
from candlestack.schema import MINUTE_MS, RAW_CANDLES
from candlestack.sources.ccxt_source import CcxtSource
from candlestack.validate import validate

log = logging.getLogger("candlestack.live")  # also when run as __main__

# Importers of the collector's types find them here too.
__all__ = ["CollectorState", "LiveCollector", "PersistedCandle", "SymbolState", "serve", "wired"]


class _TolerantClient(Client):
    """ccxt.pro's WebSocket client, but a frame that is not valid JSON is reported instead
    of raised: ccxt decodes frames inside its receive loop's callback, where an exception
    ends the loop, and the socket then stays open with nothing read from it again, for
    every symbol on it."""

    def handle_text_or_binary_message(self, data: Any) -> None:
        try:
            super().handle_text_or_binary_message(data)
        except json.JSONDecodeError as exc:  # orjson's error is a subclass
            self.on_message_callback(self, _Unreadable(data, f"malformed JSON: {exc}"))


@dataclass(frozen=True)
class _Unreadable:
    frame: Any
    why: str


def _streaming_exchange_class(exchange_id: str) -> type:
    """ccxt.pro's class of the exchange, with the kline handler reporting every kline (and
    its close flag) to the collector before ccxt caches it."""
    base = getattr(ccxt.pro, exchange_id, None)
    if not isinstance(base, type) or not issubclass(base, ccxt.pro.binance):
        # The close flag read here is the Binance kline's `x`.
        raise ConfigError(
            f"the live collector streams from Binance-family exchanges; {exchange_id!r} is not one"
        )

    class Streaming(base):
        collector: LiveCollector

        def client(self, url: str) -> Client:
            client = super().client(url)
            if type(client) is Client:
                # ccxt builds its clients itself: swap in the tolerant decoder.
                client.__class__ = _TolerantClient
            return client

        def handle_message(self, client: Client, message: Any) -> None:
            if isinstance(message, _Unreadable):
                self.collector.reject(None, "malformed JSON", f"{message.why}: {message.frame!r}")
                return
            if not isinstance(message, dict | list):
                self.collector.reject(None, "malformed JSON", f"not a JSON object: {message!r}")
                return
            super().handle_message(client, message)

        def handle_ohlcv(self, client: Client, message: dict) -> None:
            if self.collector.on_kline(message, time.time()):
                super().handle_ohlcv(client, message)

    Streaming.__name__ = f"{exchange_id}_streaming"
    return Streaming


class LiveCollector:
    """Streams 1m candles of `symbols` and persists each closed one into `lake`.

    `lake` is best made with `keep_months` (the open month stays in memory between
    writes). `rest` repairs what the stream missed. `exchange_config` is the ccxt
    constructor config, the REST source's own options (urls, `urls.api.ws` among them,
    timeout, proxies). `on_persisted` hooks are called in the event loop after each
    streamed candle is in the lake, `on_opened` hooks (symbol, open time in ms, open) on
    each minute's first kline. `state` is the collector's live state.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        lake: Lake,
        rest: CcxtSource,
        exchange_config: dict[str, Any] | None = None,
        *,
        refetch_attempts: int = 2,
        stall_seconds: float = 90.0,
        backoff_base_seconds: float = 0.5,
        backoff_max_seconds: float = 30.0,
        sandbox: bool = False,
        on_persisted: Sequence[Callable[[PersistedCandle], object]] = (),
        on_opened: Sequence[Callable[[str, int, float], object]] = (),
        write_threads: int = 4,
    ) -> None:
        self.symbols = list(symbols)
        self.lake = lake
        self.rest = rest
        self.stall_seconds = stall_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.on_persisted = list(on_persisted)
        self.on_opened = list(on_opened)
        self.state = CollectorState({s: SymbolState(s) for s in self.symbols})
        exchange_class = _streaming_exchange_class(rest.exchange)
        self.exchange = exchange_class({"enableRateLimit": True, **(exchange_config or {})})
        if sandbox:
            self.exchange.set_sandbox_mode(True)
        self.exchange.collector = self
        self.writer = CandleWriter(
            self.symbols,
            lake,
            rest,
            self.state,
            self.on_persisted,
            refetch_attempts,
            write_threads,
        )
        # The newest accepted and forming minute of each symbol, for order checks.
        self._newest_closed: dict[str, int | None] = {}
        self._forming: dict[str, int] = {}
        self._market_ids: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> LiveCollector:
        """The collector of the deployment: its symbols, lake and ccxt source options."""
        if settings.source != "ccxt":
            raise ConfigError(
                f"the live collector streams from an exchange: CANDLESTACK_SOURCE is "
                f"{settings.source!r}, set it to ccxt"
            )
        rest = CcxtSource(
            settings.exchange_id, settings.ccxt_options, sandbox=settings.ccxt_sandbox
        )
        return cls(
            settings.symbols,
            Lake(settings.lake, keep_months=True),
            rest,
            settings.ccxt_options,
            refetch_attempts=settings.refetch_attempts,
            stall_seconds=settings.live_stall_seconds,
            backoff_max_seconds=settings.live_backoff_max_seconds,
            sandbox=settings.ccxt_sandbox,
            **kwargs,
        )

    # -- the stream (event loop) ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until `stop` is set; then finish the writes in flight (their hooks too) and
        close ccxt. Closed candles not yet written are left to the next start's REST repair."""
        self.writer.stopping = False
        try:
            streaming = asyncio.create_task(self._stream())
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({streaming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            streaming.cancel()
            stopping.cancel()
            self.writer.stopping = True
            await asyncio.gather(streaming, self.writer.finish(), return_exceptions=True)
            if streaming in done:
                streaming.result()  # it ended on its own: it failed, raise why
        finally:
            self.writer.close()
            await self.exchange.close()

    async def _start(self) -> None:
        failures = 0
        while True:
            try:
                await self.exchange.load_markets()
                break
            except ccxt.NetworkError as exc:
                delay = self._backoff(failures)
                failures += 1
                log.warning("cannot load the markets (%s): retry in %.2f s", exc, delay)
                await asyncio.sleep(delay)
        for symbol in self.symbols:
            market = self.exchange.market(symbol)
            self._market_ids[market["id"]] = symbol
        newest = await asyncio.to_thread(self._newest_stored)
        for symbol, ts in newest.items():
            self._newest_closed[symbol] = ts
            self.state.symbols[symbol].newest_closed_ts = ts

    def _newest_stored(self) -> dict[str, int | None]:
        """The newest minute the lake holds of each symbol: a restart resumes from it."""
        newest = {}
        for symbol in self.symbols:
            ts = self.lake.newest_ts("ohlcv", self.rest.exchange, TIMEFRAME, symbol_key(symbol))
            newest[symbol] = int(ts.timestamp() * 1000) if ts is not None else None
        return newest

    async def _stream(self) -> None:
        """Keep ccxt.pro's subscription alive: reconnect with capped, jittered exponential
        backoff after any error, and force a reconnect after `stall_seconds` of silence."""
        await self._start()
        pairs = [[symbol, TIMEFRAME] for symbol in self.symbols]
        failures = 0
        while True:
            try:
                await asyncio.wait_for(
                    self.exchange.watch_ohlcv_for_symbols(pairs), self.stall_seconds
                )
                self.state.connected = True
                failures = 0
                continue
            except TimeoutError:
                self.state.stalls += 1
                log.warning(
                    "no kline for %.0f s on an open socket: reconnecting", self.stall_seconds
                )
                self._drop_connections(
                    ccxt.RequestTimeout(f"no kline within {self.stall_seconds} s")
                )
            except ccxt.BaseError as exc:
                # A network error, or an error the server sent (Binance's {"error": ...}).
                log.warning("stream lost: %s: %s", type(exc).__name__, exc)
            self.state.connected = False
            delay = self._backoff(failures)
            failures += 1
            self.state.reconnects += 1
            for symbol_state in self.state.symbols.values():
                symbol_state.reconnects += 1
            log.info("reconnecting in %.2f s (attempt %d)", delay, failures)
            await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Exponential in the failures in a row, capped, with jitter: reconnecting clients
        do not all come back at the same instant."""
        delay = min(self.backoff_max_seconds, self.backoff_base_seconds * 2**failures)
        return random.uniform(delay / 2, delay)

    def _drop_connections(self, error: Exception) -> None:
        # ccxt's own way out of a dead socket (its ping-pong timeout): fail the client, so
        # the next watch dials a new one; the old one is closed in the background.
        for client in list((self.exchange.clients or {}).values()):
            client.on_error(error)

    def reject(self, symbol: str | None, reason: str, detail: str) -> None:
        """Count and log a message refused from the stream; it is never stored."""
        counter = self.state.symbols[symbol].rejected if symbol else self.state.rejected
        counter[reason] += 1
        shown = detail if len(detail) <= 200 else detail[:200] + "..."
        log.warning("rejected from the stream (%s): %s: %s", symbol or UNATTRIBUTED, reason, shown)

    def on_kline(self, message: dict, received_at: float) -> bool:
        """Judge one kline message; a closed candle accepted is queued to persist. Returns
        whether ccxt may handle it too (a kline of a market streamed, well formed)."""
        kline = message.get("k")
        if not isinstance(kline, dict):
            self.reject(None, "malformed kline", repr(message))
            return False
        market_id = kline.get("s")
        symbol = self._market_ids.get(market_id) if isinstance(market_id, str) else None
        if symbol is None:
            self.reject(None, "unknown symbol", f"kline of {market_id!r}")
            return False
        state = self.state.symbols[symbol]
        state.messages += 1
        state.last_message_at = received_at
        try:
            ts = int(kline["t"])
            candle = tuple(float(kline[k]) for k in "ohlcv")
            closed = kline["x"]
            if kline["i"] != TIMEFRAME or not isinstance(closed, bool):
                raise ValueError(f"interval {kline['i']!r}, closed {closed!r}")
        except (KeyError, TypeError, ValueError) as exc:
            self.reject(symbol, "malformed kline", f"{exc!r} in {kline!r}")
            return False
        newest = self._newest_closed.get(symbol)
        if newest is not None and ts <= newest:
            reason = "out-of-order kline"
            if ts == newest and closed:
                held = self.writer.held(symbol, ts)
                # A closed minute sent again with other values: the exchange corrected it.
                # Left to the REST pass that finalises the day, which records the revision.
                reason = "late correction" if held not in (None, candle) else "duplicate kline"
            self.reject(symbol, reason, f"{datetime.fromtimestamp(ts / 1000, UTC):%F %R}")
            return False
        forming = self._forming.get(symbol)
        if forming is not None and ts < forming:
            self.reject(symbol, "out-of-order kline", f"{ts} after {forming}")
            return False
        # A closed candle is stored, and a minute's first kline gives the dry-run its fill
        # price: both must be sane candles. Later forming updates are only passed on.
        if closed or ts != forming:
            _, rejected = validate(
                pl.DataFrame([(ts, *candle)], schema=RAW_CANDLES, orient="row"),
                ts,
                ts + MINUTE_MS,
            )
            if rejected.height:
                self.reject(symbol, rejected["reason"][0], repr(kline))
                return False
        self._forming[symbol] = ts
        if ts != forming:
            for hook in self.on_opened:
                try:
                    hook(symbol, ts, candle[0])
                except Exception:
                    log.exception("%s: an on_opened hook failed", symbol)
        if closed:
            self._newest_closed[symbol] = ts
            state.closed += 1
            self.writer.accept(symbol, ts, candle, received_at)
        return True


def wired(settings: Settings) -> tuple[LiveCollector, StatusRecorder, BuildOnClose]:
    """The collector of the deployment with its hooks: the status file and the builds."""
    collector = LiveCollector.from_settings(settings)
    recorder = StatusRecorder(settings.live_status)
    # The collector's Lake: the builds read the month of candles it has just written from
    # memory, not from its file (its cache is replaced whole, so another thread may read it).
    builds = BuildOnClose(
        collector.lake,
        settings.exchange_id,
        load_feature_set(settings.features),
        settings.imputed_max_share,
        collector.writer.persisting,
    )
    collector.on_persisted += [recorder.on_persisted, builds]
    collector.on_opened.append(StreamedOpens(settings.live_opens).record)
    return collector, recorder, builds


async def serve(
    collector: LiveCollector, recorder: StatusRecorder, builds: BuildOnClose, stop: asyncio.Event
) -> None:
    """Stream until `stop` is set, writing the status every WRITE_EVERY_S and at the end."""

    async def report() -> None:
        while not stop.is_set():
            recorder.write(collector.state)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WRITE_EVERY_S)

    reporting = asyncio.create_task(report())
    try:
        await collector.run(stop)
    finally:
        stop.set()
        await reporting
        builds.close()
        recorder.write(collector.state)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    collector, recorder, builds = wired(load_settings())

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("streaming %s into %s", ", ".join(collector.symbols), collector.lake.location)
        await serve(collector, recorder, builds, stop)
        log.info("stopped")

    asyncio.run(run())


if __name__ == "__main__":
    main()
