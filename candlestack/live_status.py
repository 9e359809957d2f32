"""The live collector's state as a file, for the processes that show it: the Prometheus
endpoint (candlestack.metrics.live_metrics), the alert sensor and the UI's observations.

The collector is its own long-running process; the others read what it last wrote, so a
collector that died shows as a status growing old and buffers growing stale, never as
figures frozen at their last value. The file is small (a few hundred bytes a symbol) and
replaced atomically, every few seconds and after each minute's closed candles.

Counters are cumulative over the collector's process (Prometheus takes their rate); the
WebSocket-to-persisted latency is a cumulative histogram per symbol, fed by the collector's
hook for each persisted candle.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from candlestack.config import load_settings, symbol_key

WRITE_EVERY_S = 5.0  # how often the collector replaces the file
FRESH_S = 30.0  # a status older than this (six missed writes): the collector is down
UNATTRIBUTED = "*"  # the symbol of bad messages that name no streamed symbol
# Upper bounds (ms) of the latency histogram's buckets; the target is p95 < 300 ms.
LATENCY_BUCKETS_MS = (10.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2500.0, 10000.0)
RATE_WINDOW_S = 60.0  # messages per minute are counted over the last minute


class PersistedCandleLike(Protocol):
    symbol: str
    latency_ms: float


@dataclass
class Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    sum_ms: float = 0.0
    count: int = 0  # every observation, also those above the last bucket (+Inf)

    def observe(self, value_ms: float) -> None:
        index = bisect.bisect_left(LATENCY_BUCKETS_MS, value_ms)
        if index < len(self.buckets):
            self.buckets[index] += 1
        self.sum_ms += value_ms
        self.count += 1

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, as Prometheus histograms report them."""
        total, out = 0, []
        for count in self.buckets:
            total += count
            out.append(total)
        return out


class StatusRecorder:
    """Kept by the collector: `on_persisted` is its hook for each persisted candle, `write`
    replaces the status file with the state now."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.started_at = clock()
        self.latency: dict[str, Histogram] = {}
        self._messages: dict[str, deque[tuple[float, int]]] = {}

    def on_persisted(self, candle: PersistedCandleLike) -> None:
        self.latency.setdefault(candle.symbol, Histogram()).observe(candle.latency_ms)

    def _per_minute(self, symbol: str, now: float, messages: int) -> float | None:
        samples = self._messages.setdefault(symbol, deque())
        samples.append((now, messages))
        while samples and samples[0][0] < now - RATE_WINDOW_S:
            samples.popleft()
        first_at, first = samples[0]
        if now - first_at < 1.0:
            return None  # too short a span to be a rate
        return (messages - first) * 60.0 / (now - first_at)

    def snapshot(self, state: Any) -> dict[str, Any]:
        """The status of a candlestack.live.CollectorState, as plain JSON values."""
        now = self.clock()
        symbols = {}
        for symbol, s in state.symbols.items():
            histogram = self.latency.get(symbol, Histogram())
            symbols[symbol] = {
                "newest_closed_ts": s.newest_closed_ts,
                "messages": s.messages,
                "messages_per_minute": self._per_minute(symbol, now, s.messages),
                "closed": s.closed,
                "persisted": s.persisted,
                "repaired": s.repaired,
                "reconnects": s.reconnects,
                "last_message_at": s.last_message_at,
                "rejected": dict(s.rejected),
                "latency_buckets_ms": histogram.cumulative(),
                "latency_sum_ms": histogram.sum_ms,
                "latency_count": histogram.count,
            }
        return {
            "updated_at": now,
            "started_at": self.started_at,
            "pid": os.getpid(),
            "connected": state.connected,
            "reconnects": state.reconnects,
            "stalls": state.stalls,
            "rejected": dict(state.rejected),
            "latency_bounds_ms": list(LATENCY_BUCKETS_MS),
            "symbols": symbols,
        }

    def write(self, state: Any) -> None:
        _replace_json(self.path, self.snapshot(state))


def _replace_json(path: Path, value: Any) -> None:
    """Replace the file atomically: a reader never sees half of it. Not fsynced: it is a
    view of the collector's memory, rewritten within seconds, never the data itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", delete=False) as tmp:
        tmp.write(json.dumps(value, separators=(",", ":")))
    os.replace(tmp.name, path)


class StreamedOpens:
    """The open of each symbol's forming minute, as the stream first shows it: the price a
    dry-run fills at when its next bar opens, known the instant the minute opens, without a
    REST round trip (candlestack.dryrun). One small file per symbol in `folder`, holding the
    newest minute only; the collector writes it, the dry-run runs read it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, symbol: str) -> Path:
        return self.folder / f"{symbol_key(symbol)}.json"

    def record(self, symbol: str, ts_ms: int, open_: float) -> None:
        """The collector's hook for each minute that opens."""
        _replace_json(self._path(symbol), {"ts": ts_ms, "open": open_})

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        """The streamed open of the minute opening at `ts_ms`, or None when the stream has not
        shown that minute (or has moved on: the lake holds it then)."""
        try:
            quote = json.loads(self._path(symbol).read_text())
        except FileNotFoundError:
            return None
        return quote["open"] if quote["ts"] == ts_ms else None


def read_status(path: Path) -> dict[str, Any] | None:
    """The collector's last status, or None when no collector has written one."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def collector_up(status: dict[str, Any], now: float) -> bool:
    """Whether the collector wrote `status` recently enough to be running."""
    return now - status["updated_at"] <= FRESH_S


def health_check() -> None:
    """The collector's container healthcheck (`python -m candlestack.live_status`): exit 0
    while it writes its status (the same rule as the metrics and the UI), else 1 saying why.
    Its process is alive and its event loop turning, also while it reconnects; how the feed
    itself fares is the live_feed sensor's and its alerts' to say."""
    path = load_settings().live_status
    status = read_status(path)
    if status is None:
        sys.exit(f"no live collector status at {path}")
    now = time.time()
    if not collector_up(status, now):
        sys.exit(f"the live collector last wrote {path} {now - status['updated_at']:.0f} s ago")


def buffer_age_s(symbol_status: dict[str, Any], now: float) -> float | None:
    """Seconds since the newest closed candle in the lake closed (its open + 1 minute)."""
    newest = symbol_status.get("newest_closed_ts")
    return None if newest is None else now - (newest / 1000 + 60)


# --- watching the feed (the live_feed sensor) --------------------------------------------

DELAYED_BUFFER = "delayed_buffer"
BUFFER_RECOVERED = "buffer_recovered"
RECONNECT_STORM = "reconnect_storm"
STORM_WINDOW_S = 600.0


@dataclass(frozen=True)
class FeedEvent:
    kind: str  # DELAYED_BUFFER, BUFFER_RECOVERED or RECONNECT_STORM
    message: str
    symbol: str | None = None
    value: float | None = None  # the buffer age (s) or the reconnects in the window


@dataclass
class FeedWatch:
    """What the watcher remembers between looks (the sensor's cursor)."""

    delayed: list[str] = field(default_factory=list)  # symbols whose buffer is delayed now
    reconnects: list[tuple[float, int]] = field(default_factory=list)  # (at, total) samples
    storm: bool = False
    observed_at: float = 0.0  # when the feed's state was last recorded as an observation

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str | None) -> FeedWatch:
        if not text:
            return cls()
        raw = json.loads(text)
        raw["reconnects"] = [tuple(r) for r in raw["reconnects"]]
        return cls(**raw)


def watch_feed(
    status: dict[str, Any],
    now: float,
    seen: FeedWatch,
    *,
    max_buffer_age_s: float,
    storm_reconnects: int,
) -> tuple[FeedWatch, list[FeedEvent]]:
    """The episodes that began or ended since `seen`: a symbol whose newest stored closed
    candle is older than `max_buffer_age_s` (also when the collector stopped writing), and
    `storm_reconnects` or more reconnects within STORM_WINDOW_S."""
    events, delayed = [], []
    silence = ""
    if not collector_up(status, now):
        silent_s = now - status["updated_at"]
        silence = f"; the collector has not written its status for {silent_s:.0f} s"
    for symbol, s in status["symbols"].items():
        age = buffer_age_s(s, now)
        if age is None or age <= max_buffer_age_s:
            if symbol in seen.delayed:
                events.append(
                    FeedEvent(BUFFER_RECOVERED, f"{symbol}: live buffer current again", symbol)
                )
            continue
        delayed.append(symbol)
        if symbol not in seen.delayed:
            message = (
                f"{symbol}: newest streamed candle closed {age:.0f} s ago "
                f"(threshold {max_buffer_age_s:.0f} s){silence}"
            )
            events.append(FeedEvent(DELAYED_BUFFER, message, symbol, age))
    samples = [(at, n) for at, n in seen.reconnects if at >= now - STORM_WINDOW_S]
    samples.append((now, status["reconnects"]))
    if samples[0][1] > samples[-1][1]:  # the collector restarted: its counter began again
        samples = samples[-1:]
    in_window = samples[-1][1] - samples[0][1]
    storm = in_window >= storm_reconnects
    if storm and not seen.storm:
        message = (
            f"live feed reconnected {in_window} times in the last "
            f"{STORM_WINDOW_S / 60:.0f} minutes (threshold {storm_reconnects})"
        )
        events.append(FeedEvent(RECONNECT_STORM, message, None, in_window))
    return FeedWatch(delayed, samples, storm, seen.observed_at), events


if __name__ == "__main__":
    health_check()
