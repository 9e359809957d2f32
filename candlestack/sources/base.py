"""The interface every candle source implements."""

from __future__ import annotations

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
