"""Loopback fake of Binance's spot kline stream, for driving real ccxt.pro in tests.

Speaks the protocol ccxt.pro's ``binance`` class uses on ``urls.api.ws.spot``: a client
connects to ``/ws/<n>``, sends ``{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":N}``
and is answered ``{"result":null,"id":N}``; it then receives raw (not combined-stream)
kline events ``{"e":"kline","E":..,"s":"BTCUSDT","k":{"t":..,"T":..,"x":false,...}}``.
WebSocket ping/pong is the ``websockets`` library's own: the server pings every
``ping_seconds`` and drops a client whose pong is late, as Binance does.

Candles are replayed from the normalised CSVs (``shared/data/ohlcv``) on a compressed
clock: each recorded minute lasts ``minute_seconds`` of wall time, during which the
minute is sent ``forming_updates`` times still forming (``x: false``, partial volume) and
then once closed (``x: true``, the recorded values) as the clock passes its end.
``now_ms`` is that clock, so the REST ``FakeBinance(now_ms=ws.now_ms)`` serves exactly the
minutes the stream has closed.

Test controls: ``drop_connections`` (abort every socket), ``stop``/``start`` (same port),
``stall`` (sockets stay open, nothing is sent and pings go unanswered), ``send_raw``
(any text to every subscriber) and ``kline`` (build a kline event to send).

Usage::

    with FakeBinanceWS({"BTCUSDT": BTC_CSV}, start_ms=...) as ws, \\
            FakeBinance({"BTCUSDT": BTC_CSV}, now_ms=ws.now_ms) as rest:
        exchange = ccxt.pro.binance(deep_extend(rest.ccxt_config(), ws.ccxt_config()))
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from tests.integration.fake_binance import MINUTE_MS, _load_series, _Series, _shifted


class FakeBinanceWS:
    """Threaded loopback WebSocket server replaying klines (see module doc).

    Args:
        markets: Binance market id (``"BTCUSDT"``) -> normalised 1m CSV.
        start_ms: open time of the first minute replayed (on a minute).
        minute_seconds: wall-clock seconds one recorded minute lasts.
        forming_updates: ``x: false`` updates sent during each minute before its close.
        ping_seconds: the server pings every connection this often and closes one whose
            pong is this late (Binance: 20 s and 60 s).
        shift_ms: served candles are the recorded ones this much later (on a minute).
        wall_clock: the replay's clock is the wall clock (real minutes, as Binance: for a
            dagster-daemon's runs); ``start_ms`` and ``minute_seconds`` are then unused.
    """

    def __init__(
        self,
        markets: Mapping[str, Path],
        *,
        start_ms: int,
        minute_seconds: float = 0.5,
        forming_updates: int = 3,
        ping_seconds: float = 1.0,
        shift_ms: int = 0,
        wall_clock: bool = False,
    ) -> None:
        if start_ms % MINUTE_MS:
            raise ValueError("start_ms must be on a minute")
        self._series: dict[str, _Series] = {
            m: _shifted(_load_series(Path(p)), shift_ms) for m, p in markets.items()
        }
        self._rows = {m: dict(zip(s.ts, s.rows, strict=True)) for m, s in self._series.items()}
        self.start_ms = start_ms
        self.minute_seconds = minute_seconds
        self.forming_updates = forming_updates
        self.ping_seconds = ping_seconds
        self.wall_clock = wall_clock
        if wall_clock:
            self.minute_seconds = 60.0
        self._t0 = time.monotonic()
        self._port = 0
        self._lock = threading.Lock()
        self._connections: dict[ServerConnection, set[str]] = {}  # -> subscribed stream names
        self._stalled: set[ServerConnection] = set()
        self._messages_received: list[dict[str, Any]] = []
        self.connections_opened = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- clock ---------------------------------------------------------------------

    def now_ms(self) -> int:
        """The replay's clock: start_ms when created, then 60 s per ``minute_seconds``."""
        if self.wall_clock:
            return int(time.time() * 1000)
        elapsed = time.monotonic() - self._t0
        return self.start_ms + int(elapsed / self.minute_seconds * MINUTE_MS)

    def closed_through_ms(self) -> int:
        """Open time of the newest minute already closed (sent with ``x: true``)."""
        return self.now_ms() // MINUTE_MS * MINUTE_MS - MINUTE_MS

    def wait_until_closed(self, ts_ms: int, timeout: float = 30.0) -> None:
        """Block until the minute opening at ts_ms has closed on the replay clock."""
        deadline = time.monotonic() + timeout
        while self.closed_through_ms() < ts_ms:
            if time.monotonic() > deadline:
                raise TimeoutError(f"minute {ts_ms} did not close within {timeout} s")
            time.sleep(0.02)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeBinanceWS:
        """Serve on 127.0.0.1 (an ephemeral port the first time, the same one after)."""
        if self._thread is not None:
            raise RuntimeError("FakeBinanceWS already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fake-binance-ws", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("FakeBinanceWS did not start")
        return self

    def stop(self) -> None:
        """Close every connection and stop listening; the replay clock runs on."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(self._shutdown.set)
        thread.join(timeout=10)
        self._thread = self._loop = None

    def __enter__(self) -> FakeBinanceWS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """ccxt.pro's ``urls.api.ws.spot``: it appends ``/<stream index>``."""
        return f"ws://127.0.0.1:{self._port}/ws"

    def ccxt_config(self) -> dict[str, Any]:
        return {"urls": {"api": {"ws": {"spot": self.url}}}}

    # -- test controls -------------------------------------------------------------

    def drop_connections(self) -> None:
        """Abort every open socket at once, as a network cut would (no close frame)."""
        self._call(lambda: [c.transport.abort() for c in list(self._connections)])

    def stall(self) -> None:
        """Keep the open sockets but send nothing more on them, pings included, and read
        nothing from them, so the client's pings go unanswered too. Connections made
        afterwards stream normally."""

        def freeze() -> None:
            for connection in self._connections:
                self._stalled.add(connection)
                connection.transport.pause_reading()
                if connection.keepalive_task is not None:
                    connection.keepalive_task.cancel()

        self._call(freeze)

    def send_raw(self, text: str) -> None:
        """Send `text` as one frame to every subscribed, unstalled connection."""
        self._call(lambda: self._broadcast(None, text))

    def kline(self, market_id: str, ts_ms: int, closed: bool, **values: str) -> str:
        """A kline event for `market_id` at `ts_ms`, from the recording (or ``o h l c v``
        given as strings), as JSON text."""
        o, h, lo, c, v = self._rows.get(market_id, {}).get(ts_ms, ("1", "1", "1", "1", "0"))
        recorded = {"o": o, "h": h, "l": lo, "c": c, "v": v}
        return json.dumps(_kline_event(market_id, ts_ms, closed, {**recorded, **values}))

    @property
    def messages_received(self) -> list[dict[str, Any]]:
        """Every JSON message clients sent (SUBSCRIBE requests...), oldest first."""
        with self._lock:
            return list(self._messages_received)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # -- internals (the server thread's event loop) ---------------------------------------

    def _call(self, fn) -> None:
        if self._loop is None:
            raise RuntimeError("FakeBinanceWS not started")
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        async with serve(
            self._handle,
            "127.0.0.1",
            self._port,
            ping_interval=self.ping_seconds,
            ping_timeout=self.ping_seconds,
        ) as server:
            self._server = server
            self._port = server.sockets[0].getsockname()[1]
            replay = asyncio.create_task(self._replay())
            self._ready.set()
            await self._shutdown.wait()
            replay.cancel()
            for connection in list(self._connections):
                connection.transport.abort()
        self._connections.clear()
        self._stalled.clear()

    async def _handle(self, connection: ServerConnection) -> None:
        with self._lock:
            self._connections[connection] = set()
            self.connections_opened += 1
        try:
            async for text in connection:
                try:
                    message = json.loads(text)
                except ValueError:
                    continue
                with self._lock:
                    self._messages_received.append(message)
                await self._answer(connection, message)
        except Exception:  # an aborted socket ends its handler; nothing to report
            pass
        finally:
            with self._lock:
                self._connections.pop(connection, None)
                self._stalled.discard(connection)

    async def _answer(self, connection: ServerConnection, message: dict[str, Any]) -> None:
        method, streams = message.get("method"), message.get("params") or []
        with self._lock:
            subscribed = self._connections.get(connection, set())
            if method == "SUBSCRIBE":
                subscribed.update(streams)
            elif method == "UNSUBSCRIBE":
                subscribed.difference_update(streams)
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            reply = {"result": None, "id": message.get("id")}
        else:
            reply = {"error": {"code": 2, "msg": "Invalid request"}, "id": message.get("id")}
        await connection.send(json.dumps(reply))

    def _broadcast(self, stream: str | None, text: str) -> None:
        """Send to every unstalled connection subscribed to `stream` (None: to any)."""
        for connection, streams in list(self._connections.items()):
            if connection in self._stalled or not streams or (stream and stream not in streams):
                continue
            # send() only queues the frame: a closed socket is the handler's to notice.
            asyncio.ensure_future(connection.send(text)).add_done_callback(_ignore_result)

    async def _replay(self) -> None:
        """Each minute: forming updates spread over it, the first as it opens (as Binance,
        which sends a kline of the new minute right after the close of the last), then the
        close as it ends."""
        updates = self.forming_updates
        minute = max(self.now_ms(), self.start_ms) // MINUTE_MS * MINUTE_MS
        while True:
            for step in range(updates + 1):
                closed = step == updates
                at = minute + MINUTE_MS if closed else minute + MINUTE_MS * step // updates
                await asyncio.sleep(
                    max(0.0, (at - self.now_ms()) / MINUTE_MS * self.minute_seconds)
                )
                for market_id, rows in self._rows.items():
                    row = rows.get(minute)
                    if row is None:
                        continue  # a minute the recording lacks is not sent (as on Binance)
                    values = dict(zip("ohlcv", row, strict=True))
                    if not closed:
                        values = _forming(values, (step + 1) / (updates + 1))
                    event = _kline_event(market_id, minute, closed, values, event_ms=at)
                    self._broadcast(f"{market_id.lower()}@kline_1m", json.dumps(event))
            minute += MINUTE_MS


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _forming(values: dict[str, str], share: float) -> dict[str, str]:
    """A minute seen part way: its open and close so far, and a share of its volume."""
    o, c = float(values["o"]), float(values["c"])
    middle = (o + c) / 2
    return {
        "o": values["o"],
        "h": repr(max(o, middle)),
        "l": repr(min(o, middle)),
        "c": repr(middle),
        "v": repr(float(values["v"]) * share),
    }


def _kline_event(
    market_id: str, ts_ms: int, closed: bool, values: dict[str, str], event_ms: int | None = None
) -> dict[str, Any]:
    return {
        "e": "kline",
        "E": event_ms if event_ms is not None else ts_ms + MINUTE_MS,
        "s": market_id,
        "k": {
            "t": ts_ms,
            "T": ts_ms + MINUTE_MS - 1,
            "s": market_id,
            "i": "1m",
            "f": 0,
            "L": 0,
            **values,
            "n": 0,
            "x": closed,
            "q": "0",
            "V": "0",
            "Q": "0",
            "B": "0",
        },
    }
