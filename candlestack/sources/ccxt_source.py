"""Candles and market rules from any ccxt exchange, with bounded, jittered retries."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import ccxt
import polars as pl

from candlestack.errors import ConfigError, SourceError
from candlestack.schema import MINUTE_MS, RAW_CANDLES
from candlestack.sources.markets import markets_frame
from candlestack.validate import LATEST_MS, intended_epoch_ms

log = logging.getLogger(__name__)

# OperationFailed covers NetworkError (RequestTimeout, RateLimitExceeded, DDoSProtection
# -- what ccxt raises for Binance's HTTP 429 --, ExchangeNotAvailable), BadResponse and
# the exchanges' "unknown error, try again" codes: all may succeed on a later attempt.
RETRYABLE = (ccxt.OperationFailed,)
FATAL = (ccxt.BadSymbol, ccxt.BadRequest, ccxt.AuthenticationError, ccxt.PermissionDenied)
DEFAULT_PAGE_LIMIT = 500
# A minute counts as closed only this long after its end: a local clock a little ahead
# of the exchange's must not take the candle still forming for a closed one.
CLOSE_MARGIN_MS = 5_000


class CcxtSource:
    kind = "ccxt"

    def __init__(
        self,
        exchange_id: str = "binance",
        config: dict[str, Any] | None = None,
        *,
        sandbox: bool = False,
        retry_max_seconds: float = 120.0,
        retry_base_delay: float = 0.5,
        retry_max_delay: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        exchange_class = getattr(ccxt, exchange_id, None)
        if not isinstance(exchange_class, type) or not issubclass(exchange_class, ccxt.Exchange):
            raise ConfigError(f"unknown ccxt exchange id {exchange_id!r}")
        self.exchange = exchange_id
        # Rate limiting on unless the user explicitly turns it off (e.g. a local mirror).
        self.client: ccxt.Exchange = exchange_class({"enableRateLimit": True, **(config or {})})
        if sandbox:
            self.client.set_sandbox_mode(True)
        self.retry_max_seconds = retry_max_seconds
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self._sleep = sleep
        self._clock = clock
        self._markets_loaded = False
        self.page_limit = self._page_limit()

    def _page_limit(self) -> int:
        features = getattr(self.client, "features", None) or {}
        for market_type in ("spot", "swap", "future"):
            limit = ((features.get(market_type) or {}).get("fetchOHLCV") or {}).get("limit")
            if limit:
                return int(limit)
        return DEFAULT_PAGE_LIMIT

    def now_ms(self) -> int:
        return int(self.client.milliseconds()) - CLOSE_MARGIN_MS

    def _call(self, what: str, symbol: str | None, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Call ccxt, retrying transient errors with exponential backoff and full jitter.

        ccxt's own rate limiter spaces calls; this loop handles what still fails, within
        retry_max_seconds in total, and honours an exchange's Retry-After header.
        """
        target = f"{self.exchange}" + (f" {symbol}" if symbol else "")
        deadline = self._clock() + self.retry_max_seconds
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except FATAL as exc:
                raise SourceError(
                    f"{what} failed on {target}: {type(exc).__name__}: {exc}"
                ) from exc
            except RETRYABLE as exc:
                delay = min(self.retry_max_delay, self.retry_base_delay * 2**attempt)
                delay = random.uniform(delay / 2, delay)
                if isinstance(exc, ccxt.DDoSProtection | ccxt.RateLimitExceeded):
                    # Only a rate-limit answer carries a Retry-After meant for us; after a
                    # timeout, ccxt's headers are still those of an earlier response.
                    delay = max(delay, self._retry_after())
                attempt += 1
                if self._clock() + delay > deadline:
                    raise SourceError(
                        f"{what} on {target} still failing after {attempt} attempts within "
                        f"{self.retry_max_seconds:.0f} s: {type(exc).__name__}: {exc}"
                    ) from exc
                log.warning(
                    "%s on %s: %s, retry %d in %.2f s",
                    what,
                    target,
                    type(exc).__name__,
                    attempt,
                    delay,
                )
                self._sleep(delay)
            except ccxt.BaseError as exc:
                raise SourceError(
                    f"{what} failed on {target}: {type(exc).__name__}: {exc}"
                ) from exc

    def _retry_after(self) -> float:
        headers = getattr(self.client, "last_response_headers", None) or {}
        value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
        try:
            return min(float(value), self.retry_max_delay) if value is not None else 0.0
        except ValueError:
            return 0.0

    def _parsed_or_garbled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """ccxt turns a body cut short in transit into an empty result without a word;
        raise BadResponse instead, so it is retried rather than taken for "no data"."""

        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            if not result:
                body = getattr(self.client, "last_http_response", None)
                if isinstance(body, str) and body.strip() and self.client.parse_json(body) is None:
                    raise ccxt.BadResponse(f"unparseable response body: {body[:80]!r}")
            return result

        return call

    def _ensure_markets(self) -> None:
        if not self._markets_loaded:
            self._call("load_markets", None, self._parsed_or_garbled(self.client.load_markets))
            self._markets_loaded = True

    def load_markets(self) -> pl.DataFrame:
        self._ensure_markets()
        return markets_frame(self.client.markets, self.client.precisionMode)

    def _ohlcv_page(self, symbol: str, since: int, limit: int, *params: dict) -> list[list]:
        """One fetch_ohlcv request of 1-minute candles, retried and checked by _call."""
        fetch = self._parsed_or_garbled(self.client.fetch_ohlcv)
        return self._call("fetch_ohlcv", symbol, fetch, symbol, "1m", since, limit, *params)

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        self._ensure_markets()
        # The one request that may return the forming candle: its open is final already.
        page = self._ohlcv_page(symbol, ts_ms, 1)
        if not page or page[0][0] != ts_ms or page[0][1] is None:
            return None
        return float(page[0][1])

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        self._ensure_markets()
        if symbol not in self.client.markets:
            raise SourceError(f"{self.exchange} has no market {symbol!r}")
        # A candle is closed once its minute is over: never store the one still forming.
        end_ms = min(end_ms, self.now_ms() // MINUTE_MS * MINUTE_MS)
        rows: list[list] = []
        since = start_ms
        while since < end_ms:
            page = self._ohlcv_page(symbol, since, self.page_limit, {"until": end_ms - 1})
            if not page:
                break
            rows.extend(page)
            newest = max(int(row[0]) for row in page if row[0] is not None)
            if newest < since:  # an exchange ignoring `since` would loop forever
                break
            since = newest + MINUTE_MS
        frame = pl.DataFrame(
            [row[:6] for row in rows], schema=RAW_CANDLES, orient="row", strict=False
        )
        # Pages may run past `until` on exchanges that ignore it: that is pagination, not bad
        # data. Every other row goes to validation, a row in the wrong unit too (judged by the
        # minute it stands for), and so do rows before `since`.
        past_end = intended_epoch_ms(pl.col("ts")).is_between(end_ms, LATEST_MS, closed="left")
        return frame.filter(~past_end.fill_null(False))
