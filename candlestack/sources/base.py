"""The interface every candle source implements."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Protocol

import polars as pl


class CandleSource(Protocol):
    kind: str  # "ccxt", "synthetic" or "replay": recorded as the source of each partition
    exchange: str  # the exchange id used in lake paths

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        """Closed 1-minute candles with open time in [start_ms, end_ms), as the source has
        them (unvalidated, RAW_CANDLES schema); missing minutes are absent rows."""
        ...

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        """The open of the 1-minute candle opening at ts_ms, still forming or closed; None
        when the source has no such candle (yet). The dry-run fills at it: the next bar's
        open exists as soon as the previous bar closes."""
        ...

    def load_markets(self) -> pl.DataFrame:
        """Today's market rules of every market (MARKETS schema)."""
        ...

    def now_ms(self) -> int:
        """The source's clock: candles opening at or after now - 1 minute are still forming."""
        ...


class LazySource:
    """A CandleSource built on its first use. A dry-run filling at the live collector's
    streamed open never uses its source: it then builds no exchange client (nor, for ccxt,
    spends ~0.6 s importing ccxt before its step)."""

    def __init__(self, open_source: Callable[[], CandleSource], exchange: str) -> None:
        self._open_source = open_source
        self.exchange = exchange

    @cached_property
    def source(self) -> CandleSource:
        return self._open_source()

    @property
    def kind(self) -> str:
        return self.source.kind

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        return self.source.fetch_candles(symbol, start_ms, end_ms)

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        return self.source.open_at(symbol, ts_ms)

    def load_markets(self) -> pl.DataFrame:
        return self.source.load_markets()

    def now_ms(self) -> int:
        return self.source.now_ms()
