"""Loopback fake of Binance's spot REST API, for driving real ccxt in tests.

Serves enough of ``/api/v3`` for ``ccxt.binance`` (synchronous, 4.5.x) to run
``load_markets()`` and ``fetch_ohlcv(..., '1m', ...)`` with no network access:

* ``GET /api/v3/exchangeInfo``: the recorded 2021-03-24 mainnet payload, as-is.
* ``GET /api/v3/klines``: 1-minute candles from normalised CSVs
  (``ts_ms,open,high,low,close,volume``), formatted like Binance's 12-field rows.
* ``GET /api/v3/ping`` and ``GET /api/v3/time``: trivial, for clients that call them.

Faults (HTTP errors, slow answers, truncated or corrupt bodies) and temporarily
missing minutes can be injected so tests can prove the client survives them.
``delay`` slows every answer and ``max_in_flight`` records the most requests ever
being served at once, so tests can see how many clients call concurrently.

Usage::

    with FakeBinance({"ETHUSDT": OHLCV_DIR / "tooyipjee_binance_ETHUSDT_1m.csv"}) as srv:
        ex = ccxt.binance({**srv.ccxt_config(), "timeout": 1000, "enableRateLimit": False})
        ex.fetch_ohlcv("ETH/USDT", "1m", since=1618951200000, limit=1000)
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import parse_qs, urlsplit

# The shared data sits next to the project root (locally and in CI); never copy it.
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
OHLCV_DIR = DATA_DIR / "ohlcv"
EXCHANGE_INFO_PATH = (
    DATA_DIR / "exchange" / "spot_api_v3_exchangeInfo_2021-03-24_mainnet_subset13.json"
)

API_PREFIX = "/api/v3"
KLINES_PATH = f"{API_PREFIX}/klines"
MINUTE_MS = 60_000
DEFAULT_LIMIT = 500
MAX_LIMIT = 1000

Fault = Literal["429", "500", "503", "timeout", "truncated", "bad_row"]
FAULTS: frozenset[str] = frozenset(get_args(Fault))

# 429 body as Binance sends it. The 5xx ones are gateway-style (not JSON) on purpose:
# ccxt maps a 5xx with Binance's JSON error code to OperationFailed (not a
# NetworkError), so pass ``body=`` to ``inject`` to exercise that path instead.
_DEFAULT_FAULT_BODIES: dict[str, bytes] = {
    "429": (
        b'{"code":-1003,"msg":"Too many requests; current limit is 1200 request weight '
        b'per 1 MINUTE. Please use the websocket for live updates to avoid polling the API."}'
    ),
    "500": b"<html><body><h1>500 Internal Server Error</h1></body></html>",
    "503": b"<html><body><h1>503 Service Unavailable</h1></body></html>",
}
_FAULT_STATUS = {"429": 429, "500": 500, "503": 503}
_JSON = "application/json;charset=UTF-8"


def _error_body(code: int, msg: str) -> bytes:
    return json.dumps({"code": code, "msg": msg}, separators=(",", ":")).encode()


class _RejectedError(Exception):
    """A request Binance would refuse: carries the HTTP status and error body."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.body = _error_body(code, msg)


@dataclass(frozen=True)
class _Series:
    """One market's candles: ``ts`` sorted for bisect, ``rows`` = (o, h, l, c, v) strings."""

    ts: list[int]
    rows: list[tuple[str, str, str, str, str]]


@dataclass(eq=False)  # removed by identity: equal entries may be queued twice
class _QueuedFault:
    kind: str
    remaining: int
    path: str | None
    symbol: str | None
    body: bytes | None


@dataclass(eq=False)
class _Hide:
    market_id: str
    start_ms: int
    end_ms: int
    remaining: int | None  # None: hidden until unhide()


_series_cache: dict[tuple[str, int, int], _Series] = {}
_series_cache_lock = threading.Lock()


def _shifted(series: _Series, shift_ms: int) -> _Series:
    """The recorded candles served `shift_ms` later: recorded minutes as today's."""
    return series if not shift_ms else _Series([t + shift_ms for t in series.ts], series.rows)


def _load_series(path: Path) -> _Series:
    """Read a normalised CSV once per process (tests start many servers)."""
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size)
    with _series_cache_lock:
        cached = _series_cache.get(key)
    if cached is not None:
        return cached
    ts: list[int] = []
    rows: list[tuple[str, str, str, str, str]] = []
    with resolved.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header != ["ts_ms", "open", "high", "low", "close", "volume"]:
            raise ValueError(f"{path}: unexpected CSV header {header!r}")
        # csv keeps the prices as the source's strings, so the digits survive verbatim.
        for t, o, h, lo, c, v in reader:
            ts.append(int(t))
            rows.append((o, h, lo, c, v))
    if any(a >= b for a, b in itertools.pairwise(ts)):
        raise ValueError(f"{path}: ts_ms must be strictly increasing")
    series = _Series(ts, rows)
    with _series_cache_lock:
        _series_cache[key] = series
    return series


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeBinance

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gave up (e.g. after a "timeout" fault) is expected; anything
        # else is a bug in the fake and is kept for tests to assert on, not printed.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        self.fake._record_error(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "fake-binance"
    sys_version = ""

    def log_message(self, fmt: str, *args: object) -> None:
        pass  # quiet: one stderr line per request drowns test output

    def do_GET(self) -> None:
        fake = self.server.fake
        fake._enter()
        self._answered = False
        try:
            self._serve(fake)
        finally:
            self._answer()

    def _answer(self) -> None:
        """The request stops being in flight once it is answered, before its bytes are sent:
        its client may send the next request as soon as they arrive, and counting this one
        until its thread got round to it made one sequential client look like two."""
        if not self._answered:
            self._answered = True
            self.server.fake._leave()

    def _serve(self, fake: FakeBinance) -> None:
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        fake._record_request(split.path, query)
        fault = fake._take_fault(split.path, query.get("symbol"))
        try:
            # Event.wait, not sleep: close() wakes us so shutdown never hangs.
            if fake.delay and fake._closing.wait(fake.delay):
                return
            if fault is not None and fault.kind in _FAULT_STATUS:
                body = _DEFAULT_FAULT_BODIES[fault.kind] if fault.body is None else fault.body
                extra = {"Retry-After": "1"} if fault.kind == "429" else {}
                self._send(_FAULT_STATUS[fault.kind], body, extra)
                return
            if (
                fault is not None
                and fault.kind == "timeout"
                and fake._closing.wait(fake.timeout_sleep)
            ):
                return
            status, body = fake._respond(split.path, query, fault)
        except Exception:
            fake._record_error(traceback.format_exc())
            status, body = 500, _error_body(-1000, "fake_binance internal error, see .errors")
        self._send(status, body)

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self._answer()
        try:
            self.send_response(status)
            self.send_header("Content-Type", _JSON)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left; nothing to tell it


class FakeBinance:
    """Threaded loopback HTTP server imitating Binance spot ``/api/v3`` (see module doc).

    Args:
        markets: Binance market id (``"ETHUSDT"``) -> normalised 1m CSV. Only these
            ids have klines; any other symbol gets Binance's ``-1121 Invalid symbol``.
        now_ms: the server's clock, an int or a callable returning one (default:
            wall clock). Only closed candles are served: ``openTime + 60000 <= now``.
            May be reassigned while running, e.g. to let new candles "close".
        exchange_info: the ``exchangeInfo`` JSON to serve verbatim.
        timeout_sleep: seconds a ``"timeout"`` fault delays its (otherwise normal)
            answer; keep it above the client's timeout. May be reassigned.
        delay: seconds every request is held before it is answered (default 0), so
            concurrent clients overlap observably. May be reassigned.
        shift_ms: served candles are the recorded ones this much later (on a minute).
    """

    def __init__(
        self,
        markets: Mapping[str, Path],
        *,
        now_ms: int | Callable[[], int] | None = None,
        exchange_info: Path = EXCHANGE_INFO_PATH,
        timeout_sleep: float = 3.0,
        delay: float = 0.0,
        shift_ms: int = 0,
    ) -> None:
        # Load eagerly: a bad path should fail the test setup, not a request thread.
        self._series = {
            mid: _shifted(_load_series(Path(p)), shift_ms) for mid, p in markets.items()
        }
        self._exchange_info = Path(exchange_info).read_bytes()
        self.now_ms = now_ms
        self.timeout_sleep = timeout_sleep
        self.delay = delay
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        self._requests: list[tuple[str, dict[str, str]]] = []
        self._faults: list[_QueuedFault] = []
        self._hides: list[_Hide] = []
        self._errors: list[str] = []
        self._closing = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeBinance:
        """Bind 127.0.0.1 on an ephemeral port and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("FakeBinance already started")
        self._closing.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-binance-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; wakes handlers parked in a ``"timeout"`` fault first."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._closing.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeBinance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeBinance not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to use as ccxt's ``urls.api.public``, e.g. ``http://127.0.0.1:PORT/api/v3``."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    def ccxt_config(self) -> dict[str, Any]:
        """Minimal ``ccxt.binance`` config pointing at this server (spot only, no margin/sapi)."""
        return {
            "urls": {"api": {"public": self.url}},
            "options": {"fetchMarkets": {"types": ["spot"]}, "fetchMargins": False},
        }

    # -- test controls -------------------------------------------------------------

    def inject(
        self,
        fault: Fault,
        count: int = 1,
        path: str | None = KLINES_PATH,
        *,
        symbol: str | None = None,
        body: bytes | str | None = None,
    ) -> None:
        """Queue ``fault`` for the next ``count`` requests to ``path`` (None: any path).

        ``symbol`` narrows it to requests with that ``symbol`` query parameter.
        ``body`` overrides the error body of "429"/"500"/"503". Queued faults are
        consumed in FIFO order, one per matching request. ``"bad_row"`` only
        matches klines requests and is consumed even if the answer has no rows.
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        if body is not None and fault not in _FAULT_STATUS:
            raise ValueError(f"body= only applies to {sorted(_FAULT_STATUS)}")
        if fault == "bad_row" and path not in (None, KLINES_PATH):
            raise ValueError("bad_row only applies to klines")
        raw = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._faults.append(_QueuedFault(fault, count, path, symbol, raw))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> list[tuple[str, int, str | None, str | None]]:
        """Unconsumed faults as (fault, remaining, path, symbol)."""
        with self._lock:
            return [(f.kind, f.remaining, f.path, f.symbol) for f in self._faults]

    def hide(self, market_id: str, start_ms: int, end_ms: int, times: int | None = None) -> None:
        """Make candles with ``start_ms <= openTime <= end_ms`` absent from klines answers.

        With ``times=N`` they reappear after N klines requests from which the hide
        actually removed at least one row (a request not reaching the range does
        not count); otherwise they stay hidden until ``unhide()``.
        """
        if end_ms < start_ms:
            raise ValueError("end_ms < start_ms")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._hides.append(_Hide(market_id, start_ms, end_ms, times))

    def unhide(self, market_id: str | None = None) -> None:
        """Drop all hides (or only ``market_id``'s)."""
        with self._lock:
            self._hides = [h for h in self._hides if market_id not in (None, h.market_id)]

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        """Snapshot of every request received so far, as (path, query), oldest first."""
        with self._lock:
            return [(p, dict(q)) for p, q in self._requests]

    def requests_to(self, path: str = KLINES_PATH) -> list[dict[str, str]]:
        """Query dicts of the requests to ``path`` (default klines), oldest first."""
        return [q for p, q in self.requests if p == path]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def max_in_flight(self) -> int:
        """The most requests served at the same moment since the start (or the last reset)."""
        with self._lock:
            return self._max_in_flight

    def reset_max_in_flight(self) -> None:
        with self._lock:
            self._max_in_flight = self._in_flight

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions inside the fake; should stay empty."""
        with self._lock:
            return list(self._errors)

    # -- internals (called from handler threads) -------------------------------------

    def _now(self) -> int:
        now = self.now_ms
        if now is None:
            return time.time_ns() // 1_000_000
        return int(now() if callable(now) else now)

    def _record_request(self, path: str, query: dict[str, str]) -> None:
        with self._lock:
            self._requests.append((path, query))

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record_error(self, tb: str) -> None:
        with self._lock:
            self._errors.append(tb)

    def _take_fault(self, path: str, symbol: str | None) -> _QueuedFault | None:
        with self._lock:
            for f in self._faults:
                if f.path not in (None, path) or f.symbol not in (None, symbol):
                    continue
                if f.kind == "bad_row" and path != KLINES_PATH:
                    continue
                f.remaining -= 1
                if f.remaining == 0:
                    self._faults.remove(f)
                return f
        return None

    def _respond(
        self, path: str, query: dict[str, str], fault: _QueuedFault | None
    ) -> tuple[int, bytes]:
        kind = fault.kind if fault is not None else None
        if path == f"{API_PREFIX}/exchangeInfo":
            status, body = 200, self._exchange_info
        elif path == f"{API_PREFIX}/ping":
            status, body = 200, b"{}"
        elif path == f"{API_PREFIX}/time":
            status, body = 200, json.dumps({"serverTime": self._now()}).encode()
        elif path == KLINES_PATH:
            try:
                rows = self._klines(query)
            except _RejectedError as rej:
                status, body = rej.status, rej.body
            else:
                if kind == "bad_row" and rows:
                    rows[0] = _corrupt(rows[0])
                status, body = 200, json.dumps(rows, separators=(",", ":")).encode()
        else:
            status, body = 404, b"<html><body><h2>404 Not found</h2></body></html>"
        if kind == "truncated":
            body = body[: len(body) // 2]
        return status, body

    def _klines(self, query: dict[str, str]) -> list[list[Any]]:
        for name in ("symbol", "interval"):
            if not query.get(name):
                raise _RejectedError(
                    400,
                    -1102,
                    f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.",
                )
        series = self._series.get(query["symbol"])
        if series is None:
            raise _RejectedError(400, -1121, "Invalid symbol.")
        if query["interval"] != "1m":
            # Real Binance has other intervals; the fake only has 1m data.
            raise _RejectedError(400, -1120, "Invalid interval.")
        limit = _int_param(query, "limit")
        limit = DEFAULT_LIMIT if limit is None else min(limit, MAX_LIMIT)
        if limit < 1:
            raise _RejectedError(400, -1100, "Illegal characters found in parameter 'limit'.")
        start = _int_param(query, "startTime")
        end = _int_param(query, "endTime")

        # Only closed candles: the newest servable one opened a full minute before now.
        newest = self._now() - MINUTE_MS
        if end is not None:
            newest = min(newest, end)

        with self._lock:
            hides = [h for h in self._hides if h.market_id == query["symbol"]]
            used: set[int] = set()
            picked: list[int] = []

            def visible(i: int) -> bool:
                t = series.ts[i]
                for n, h in enumerate(hides):
                    if h.start_ms <= t <= h.end_ms:
                        used.add(n)
                        return False
                return True

            if start is not None:
                # Binance pages forward from startTime when it is given...
                i = bisect.bisect_left(series.ts, start)
                while i < len(series.ts) and series.ts[i] <= newest and len(picked) < limit:
                    if visible(i):
                        picked.append(i)
                    i += 1
            else:
                # ...and otherwise returns the latest `limit` candles up to endTime/now.
                i = bisect.bisect_right(series.ts, newest) - 1
                while i >= 0 and len(picked) < limit:
                    if visible(i):
                        picked.append(i)
                    i -= 1
                picked.reverse()

            for n in used:
                h = hides[n]
                if h.remaining is not None:
                    h.remaining -= 1
                    if h.remaining == 0:
                        self._hides.remove(h)

        return [_kline(series.ts[i], series.rows[i]) for i in picked]


def _int_param(query: dict[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise _RejectedError(
            400, -1100, f"Illegal characters found in parameter '{name}'."
        ) from None


def _kline(ts: int, row: tuple[str, str, str, str, str]) -> list[Any]:
    o, h, lo, c, v = row
    # The CSVs lack quote volume, trade count and taker volumes: Binance's slots are
    # kept (clients index into the 12 fields) but zeroed rather than invented.
    return [ts, o, h, lo, c, v, ts + MINUTE_MS - 1, "0", 0, "0", "0", "0"]


def _corrupt(kline: list[Any]) -> list[Any]:
    """Return ``kline`` with high < low (swap; flat candles get high = low / 2)."""
    out = list(kline)
    high, low = out[2], out[3]
    if Decimal(high) != Decimal(low):
        out[2], out[3] = min(high, low, key=Decimal), max(high, low, key=Decimal)
    elif Decimal(low) > 0:
        out[2] = str(Decimal(low) / 2)
    else:
        out[3] = str(Decimal(high) + 1)
    return out
