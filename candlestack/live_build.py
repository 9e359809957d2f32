"""What a streamed candle's close completes: the bars and features of every timeframe that
closes with it, built for the open month by the same builders as the bars and features
assets (top-up mode: days whose inputs are unchanged are kept as stored), so the dry-run
sensor sees each strategy's bar the moment it closes.

A hook of the live collector. The builds run in threads of their own (one symbol's in
close order, never two at once), so the event loop keeps streaming while they run; a
symbol whose builds fall behind has its closes coalesced into one build of every
timeframe that closed meanwhile. They wait while the collector is still writing closed
candles (`persisting`): every symbol closes at the same instant, and on two cores the
builds would otherwise slow every other symbol's write down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime

from candlestack.bars import BarBuilder, MonthMinutes
from candlestack.config import symbol_key
from candlestack.feature_store import FeatureBuilder, FeatureSet
from candlestack.lake import Lake
from candlestack.resample import BAR_TIMEFRAMES, TIMEFRAME_MINUTES
from candlestack.schema import MINUTE_MS

log = logging.getLogger("candlestack.live")

SAMPLES = 1440  # post-close build times kept, a day of minutes
# The longest a build waits for the collector's writes: a stream that never pauses must
# not starve the builds.
MAX_WAIT_S = 2.0
# Two symbols' builds at a time: parquet encoding, fsync and polars' queries release the
# GIL, so a second thread uses the second core.
BUILD_THREADS = 2


def closing_timeframes(timeframes, closes_ms) -> list[str]:
    """Those of `timeframes` whose period ends at one of `closes_ms` (UTC-aligned, as
    resampled), in their given order."""
    return [
        tf
        for tf in timeframes
        if any(close % (TIMEFRAME_MINUTES[tf] * MINUTE_MS) == 0 for close in closes_ms)
    ]


def month_of(close_ms: int) -> date:
    """The month of the period that ends at `close_ms` (a close at midnight on the 1st
    ends the previous month's last period)."""
    opened = datetime.fromtimestamp((close_ms - MINUTE_MS) / 1000, UTC)
    return date(opened.year, opened.month, 1)


class BuildOnClose:
    """Collector hook: builds the bars and features a persisted candle's close completes."""

    def __init__(
        self,
        lake: Lake,
        exchange: str,
        features: FeatureSet,
        imputed_max_share: float,
        persisting: Callable[[], bool] = lambda: False,
    ) -> None:
        # Read once per change of a month's candles, not by every timeframe at every close.
        minutes = MonthMinutes(lake, exchange, imputed_max_share)
        self.bars = BarBuilder(lake, exchange, imputed_max_share, minutes)
        self.features = FeatureBuilder(lake, exchange, features, imputed_max_share, minutes)
        self.feature_timeframes = tuple(features.timeframes)
        # The closing kline's arrival -> its builds done, seconds (the post-close calculation).
        self.build_seconds: deque[float] = deque(maxlen=SAMPLES)
        self._due: dict[str, set[int]] = {}  # symbol -> closes not built yet
        self._received: dict[str, float] = {}  # symbol -> arrival of its oldest close due
        self._building: set[str] = set()  # symbols a thread is building
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(BUILD_THREADS, thread_name_prefix="live-build")
        self._persisting = persisting

    def __call__(self, candle) -> None:
        close_ms = candle.ts_ms + MINUTE_MS
        with self._lock:
            queued = candle.symbol in self._due or candle.symbol in self._building
            self._due.setdefault(candle.symbol, set()).add(close_ms)
            self._received.setdefault(candle.symbol, candle.received_at)
        if not queued:
            self._pool.submit(self._build_due, candle.symbol)

    def _build_due(self, symbol: str) -> None:
        """Build the symbol's closes due, then those that came meanwhile, until none are."""
        while True:
            deadline = time.monotonic() + MAX_WAIT_S
            while self._persisting() and time.monotonic() < deadline:
                time.sleep(0.002)
            with self._lock:
                closes = sorted(self._due.pop(symbol))
                received = self._received.pop(symbol)
                self._building.add(symbol)
            try:
                self.build(symbol, closes)
            except Exception:
                log.exception(
                    "%s: bars and features of the closes up to %d failed", symbol, closes[-1]
                )
            else:
                self.build_seconds.append(time.time() - received)
            with self._lock:
                if symbol not in self._due:
                    self._building.discard(symbol)
                    return

    def build(self, symbol: str, closes: list[int]) -> None:
        """The bars, then the features, of every timeframe that closed at one of `closes`."""
        key = symbol_key(symbol)
        for month in sorted({month_of(c) for c in closes}):
            in_month = [c for c in closes if month_of(c) == month]
            # BAR_TIMEFRAMES lists each timeframe after its source (10m after 5m, 4h after 1h).
            for timeframe in closing_timeframes(BAR_TIMEFRAMES, in_month):
                self.bars.build(timeframe, key, month, reuse_unchanged=True)
            for timeframe in closing_timeframes(self.feature_timeframes, in_month):
                self.features.build(timeframe, key, month)

    def close(self) -> None:
        """Finish the builds already due."""
        self._pool.shutdown(wait=True)
