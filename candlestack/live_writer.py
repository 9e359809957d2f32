"""The live collector's writes: each closed candle accepted from the stream is persisted
into the lake's open month by the REST ingest's own pass (`Ingestor` on the open day, with
`keep_closed`), on worker threads, one write per symbol at a time, then handed to the
`on_persisted` hooks in the event loop.

The pass reads candles from `StreamedCandles`, which answers from the stream and asks REST
for every minute the stream does not hold: minutes missed across a disconnect, a stall or
a restart are repaired over REST in the same write as the first candle streamed after it,
so no minute is ever stored from the stream with a hole before it, and none twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import polars as pl

from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.schema import MINUTE_MS, RAW_CANDLES
from candlestack.sources.ccxt_source import CcxtSource

log = logging.getLogger("candlestack.live")

TIMEFRAME = "1m"
# Latency samples kept per symbol: a day of minutes, enough for any percentile.
LATENCY_SAMPLES = 1440


@dataclass
class SymbolState:
    """What the collector knows of one symbol, for metrics, alerts and the UI."""

    symbol: str
    newest_closed_ts: int | None = None  # open time (ms) of the newest candle in the lake
    messages: int = 0  # kline messages received, forming and closed
    closed: int = 0  # closed candles accepted from the stream
    persisted: int = 0  # of those, persisted
    repaired: int = 0  # minutes fetched over REST because the stream did not deliver them
    reconnects: int = 0  # reconnects of the connection the symbol streams on
    last_message_at: float | None = None  # wall clock (s) of its newest kline message
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> messages refused
    # WebSocket receipt -> persisted, in ms, newest last.
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


@dataclass
class CollectorState:
    symbols: dict[str, SymbolState]
    connected: bool = False
    reconnects: int = 0
    stalls: int = 0  # reconnects forced by silence on an open socket
    # reason -> messages refused that name no streamed symbol (malformed JSON, unknown market)
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PersistedCandle:
    """A streamed closed candle, as it now stands in the lake (the hook's argument)."""

    symbol: str
    ts_ms: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    received_at: float  # wall clock (s) of the closing kline's arrival
    persisted_at: float

    @property
    def latency_ms(self) -> float:
        return (self.persisted_at - self.received_at) * 1000


Candle = tuple[float, float, float, float, float]  # open, high, low, close, volume


class StreamedCandles:
    """The candle source of the collector's ingest pass: the closed candles the stream
    delivered, and REST (the configured ccxt source) for every minute it did not. Its
    clock is the stream's: the newest closed candle's end."""

    def __init__(
        self, rest: CcxtSource, streamed: dict[int, Candle], closed_end_ms: int, lock
    ) -> None:
        self.rest = rest
        self.kind = rest.kind
        self.exchange = rest.exchange
        self.streamed = streamed
        self.closed_end_ms = closed_end_ms
        self._rest_lock = lock  # one ccxt REST client serves every symbol's pass
        self.repaired = 0

    def now_ms(self) -> int:
        return self.closed_end_ms

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        end_ms = min(end_ms, self.closed_end_ms)
        have = [(ts, *row) for ts, row in self.streamed.items() if start_ms <= ts < end_ms]
        held = {row[0] for row in have}
        missing = [ts for ts in range(start_ms, end_ms, MINUTE_MS) if ts not in held]
        frame = pl.DataFrame(have, schema=RAW_CANDLES, orient="row")
        if not missing:
            return frame
        with self._rest_lock:
            fetched = self.rest.fetch_candles(symbol, missing[0], missing[-1] + MINUTE_MS)
        fetched = fetched.filter(~pl.col("ts").is_in(list(held)))
        self.repaired += fetched.height
        return pl.concat([frame, fetched]).sort("ts")

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        return self.rest.open_at(symbol, ts_ms)

    def load_markets(self) -> pl.DataFrame:
        return self.rest.load_markets()


class CandleWriter:
    """Persists the closed candles the collector accepts (`accept`), each symbol's as they
    come, one write at a time, and calls `on_persisted` (the list itself: hooks added to it
    later are called too) after each is in the lake. Updates `state` as candles persist."""

    def __init__(
        self,
        symbols: Sequence[str],
        lake: Lake,
        rest: CcxtSource,
        state: CollectorState,
        on_persisted: list[Callable[[PersistedCandle], object]],
        refetch_attempts: int = 2,
        write_threads: int = 4,
    ) -> None:
        self.lake = lake
        self.rest = rest
        self.state = state
        self.on_persisted = on_persisted
        self.refetch_attempts = refetch_attempts
        self.stopping = False  # set: no write is started any more
        # More threads than cores: a write waits on fsync much of its time.
        self._pool = ThreadPoolExecutor(write_threads, thread_name_prefix="live-write")
        self._rest_lock = threading.Lock()
        # Closed candles accepted (symbol -> open time -> candle) and when each arrived;
        # those not yet persisted, and each symbol's write in progress.
        self._streamed: dict[str, dict[int, Candle]] = {s: {} for s in symbols}
        self._received: dict[tuple[str, int], float] = {}
        self._unpersisted: dict[str, list[int]] = {s: [] for s in symbols}
        self._writing: dict[str, asyncio.Task] = {}
        self._persisting = 0  # writes of closed candles in flight (not the finalising ones)

    def accept(self, symbol: str, ts: int, candle: Candle, received_at: float) -> None:
        """Queue a closed candle (in the event loop); its symbol's write starts unless one
        is in progress, which takes it next."""
        self._streamed[symbol][ts] = candle
        self._received[(symbol, ts)] = received_at
        self._unpersisted[symbol].append(ts)
        if symbol not in self._writing and not self.stopping:
            self._writing[symbol] = asyncio.ensure_future(self._persist_symbol(symbol))

    def held(self, symbol: str, ts: int) -> Candle | None:
        """The closed candle accepted for that minute, while it is not yet in the lake."""
        return self._streamed[symbol].get(ts)

    async def finish(self) -> None:
        """Wait for the writes in flight (their hooks too)."""
        await asyncio.gather(*self._writing.values(), return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def _persist_symbol(self, symbol: str) -> None:
        """Write the symbol's closed candles as they come, one write at a time: each symbol
        starts its write the moment its candle closes, on the write threads, never waiting
        for another symbol's."""
        loop = asyncio.get_running_loop()
        try:
            while self._unpersisted[symbol] and not self.stopping:
                closed, self._unpersisted[symbol] = self._unpersisted[symbol], []
                # A snapshot: the event loop keeps adding candles while the thread writes.
                streamed = dict(self._streamed[symbol])
                self._persisting += 1
                try:
                    repaired, completed = await loop.run_in_executor(
                        self._pool, self._persist, symbol, max(closed), streamed
                    )
                except Exception as exc:
                    # Retried with the symbol's next closed candle.
                    log.error("%s: persisting failed: %s", symbol, exc, exc_info=exc)
                    self._unpersisted[symbol][:0] = closed
                    return
                finally:
                    self._persisting -= 1
                self._persisted(symbol, max(closed), repaired, closed)
                if completed and not self.stopping:
                    await loop.run_in_executor(
                        self._pool, self._finalise, symbol, completed, max(closed)
                    )
        finally:
            del self._writing[symbol]

    def persisting(self) -> bool:
        """Whether a closed candle is being written (any thread may ask)."""
        return self._persisting > 0

    def _persist(
        self, symbol: str, newest: int, streamed: dict[int, Candle]
    ) -> tuple[int, list[date]]:
        """Ingest the symbol's days through `newest` from the stream (and REST for what the
        stream lacks). Returns how many minutes REST supplied, and the days this write
        completed (their last minute is in), which are stored not yet final."""
        source = StreamedCandles(self.rest, streamed, newest + MINUTE_MS, self._rest_lock)
        last_day = _day_of(newest)
        stored = self.state.symbols[symbol].newest_closed_ts
        # From the day of the first minute not stored (a restart after midnight finishes
        # the day before too), within the open month: older months are the backfill's. A
        # lake without the symbol starts with the open day.
        first_day = last_day
        if stored is not None and stored < newest:
            first_day = max(_day_of(stored + MINUTE_MS), last_day.replace(day=1))
        days = [first_day + timedelta(days=n) for n in range((last_day - first_day).days + 1)]
        Ingestor(source, self.lake, self.refetch_attempts).ingest(
            symbol, days, keep_closed=True, finalise=False
        )
        completed = [d for d in days if _day_of(newest + MINUTE_MS) > d]
        return source.repaired, completed

    def _finalise(self, symbol: str, days: list[date], newest: int) -> None:
        """The completed `days` fetched again in full over REST and stored closed, as the
        REST top-up closes a day: what the exchange revised since streaming is recorded.
        After the close's hooks, so the close does not wait for it; a collector stopped
        before it leaves the days to the schedules (they are stored not closed)."""
        source = StreamedCandles(self.rest, {}, newest + MINUTE_MS, self._rest_lock)
        try:
            Ingestor(source, self.lake, self.refetch_attempts).ingest(
                symbol, days, keep_closed=True
            )
        except Exception as exc:
            log.error("%s: finalising %s failed: %s", symbol, days[-1], exc, exc_info=exc)
            return
        log.info("%s: %s fetched again over REST and stored closed", symbol, days[-1])

    def _persisted(self, symbol: str, newest: int, repaired: int, stream_ts: list[int]) -> None:
        now = time.time()
        state = self.state.symbols[symbol]
        state.newest_closed_ts = max(newest, state.newest_closed_ts or newest)
        state.repaired += repaired
        if repaired:
            log.info("%s: %d minute(s) the stream missed repaired over REST", symbol, repaired)
        streamed = self._streamed[symbol]
        for ts in stream_ts:
            received = self._received.pop((symbol, ts))
            candle = PersistedCandle(symbol, ts, *streamed[ts], received, now)
            state.persisted += 1
            state.latencies_ms.append(candle.latency_ms)
            for hook in self.on_persisted:
                try:
                    hook(candle)
                except Exception:
                    log.exception("%s: an on_persisted hook failed", symbol)
        # The lake holds them now: later passes read them from there.
        for ts in [t for t in streamed if t < newest]:
            del streamed[ts]


def _day_of(ts_ms: int) -> date:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).date()
