"""The live collector's status file, and the Prometheus metrics served from it."""

import time
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from candlestack import live_status
from candlestack.config import Settings
from candlestack.live import CollectorState, PersistedCandle, SymbolState
from candlestack.live_status import (
    FRESH_S,
    FeedWatch,
    StatusRecorder,
    health_check,
    read_status,
    watch_feed,
)
from candlestack.metrics import SourcesCollector, live_metrics

T0 = datetime(2026, 3, 2, 12, 0, 30, tzinfo=UTC).timestamp()
MINUTE_MS = 60_000


def _candle(symbol: str, latency_ms: float) -> PersistedCandle:
    received = T0 - 1
    return PersistedCandle(
        symbol, 0, 1.0, 1.0, 1.0, 1.0, 1.0, received, received + latency_ms / 1000
    )


def _scrape(status, now: float) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    at = datetime.fromtimestamp(now, UTC)
    registry.register(SourcesCollector({"live": lambda n: live_metrics(status, n)}, lambda: at))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_status_file_serves_buffers_rates_rejections_and_latency(tmp_path):
    clock = {"now": T0}
    recorder = StatusRecorder(tmp_path / "live" / "status.json", clock=lambda: clock["now"])
    btc, eth = SymbolState("BTC/USDT"), SymbolState("ETH/USDT")
    state = CollectorState({"BTC/USDT": btc, "ETH/USDT": eth}, connected=True)
    state.rejected["malformed JSON"] += 2
    newest_open_ms = int(T0 * 1000) // MINUTE_MS * MINUTE_MS - MINUTE_MS  # closed 30 s ago
    btc.newest_closed_ts = newest_open_ms
    btc.rejected["high below low"] += 1
    recorder.write(state)  # the first sample of the message rate
    for latency in (20.0, 80.0, 250.0, 400.0):
        recorder.on_persisted(_candle("BTC/USDT", latency))
    btc.messages, btc.reconnects, btc.repaired = 120, 1, 3
    clock["now"] += 30
    recorder.write(state)

    status = read_status(tmp_path / "live" / "status.json")
    metrics = _scrape(status, clock["now"])
    sym = (("symbol", "BTC/USDT"),)
    assert metrics[("candlestack_live_collector_up", ())] == 1
    assert metrics[("candlestack_live_buffer_age_seconds", sym)] == 60.0
    assert metrics[("candlestack_live_messages_per_minute", sym)] == 240.0  # 120 in 30 s
    assert metrics[("candlestack_live_messages_total", sym)] == 120
    assert metrics[("candlestack_live_reconnects_total", sym)] == 1
    assert metrics[("candlestack_live_repaired_minutes_total", sym)] == 3
    reason = (("reason", "high below low"), ("symbol", "BTC/USDT"))
    assert metrics[("candlestack_live_rejected_messages_total", reason)] == 1
    unattributed = (("reason", "malformed JSON"), ("symbol", "*"))
    assert metrics[("candlestack_live_rejected_messages_total", unattributed)] == 2
    bucket = "candlestack_live_persist_latency_seconds_bucket"
    assert metrics[(bucket, (("le", "0.1"), ("symbol", "BTC/USDT")))] == 2
    assert metrics[(bucket, (("le", "0.3"), ("symbol", "BTC/USDT")))] == 3
    assert metrics[(bucket, (("le", "+Inf"), ("symbol", "BTC/USDT")))] == 4
    assert metrics[("candlestack_live_persist_latency_seconds_sum", sym)] == 0.75
    # A symbol with no closed candle stored yet has no buffer age, but is served.
    assert ("candlestack_live_buffer_age_seconds", (("symbol", "ETH/USDT"),)) not in metrics
    assert metrics[("candlestack_live_messages_total", (("symbol", "ETH/USDT"),))] == 0

    # The collector stops writing: it shows as down, and its buffers keep ageing.
    later = _scrape(status, clock["now"] + 120)
    assert later[("candlestack_live_collector_up", ())] == 0
    assert later[("candlestack_live_buffer_age_seconds", sym)] == 180.0


def test_no_collector_is_down(tmp_path):
    assert read_status(tmp_path / "status.json") is None
    assert _scrape(None, T0) == {
        ("candlestack_live_collector_up", ()): 0,
        ("candlestack_metrics_source_up", (("source", "live"),)): 1,
    }


def test_health_check_passes_while_the_status_is_fresh(tmp_path, monkeypatch):
    path = tmp_path / "live" / "status.json"
    monkeypatch.setattr(live_status, "load_settings", lambda: Settings(live_status=path))
    with pytest.raises(SystemExit, match="no live collector status"):
        health_check()
    clock = {"now": time.time()}
    recorder = StatusRecorder(path, clock=lambda: clock["now"])
    recorder.write(CollectorState({}))
    health_check()  # returns: exit status 0
    clock["now"] -= FRESH_S + 1
    recorder.write(CollectorState({}))
    with pytest.raises(SystemExit, match=r"last wrote .* 31 s ago"):
        health_check()


def _status(reconnects: int, newest_closed_ts: int | None, updated_at: float = T0) -> dict:
    symbol = {"newest_closed_ts": newest_closed_ts}
    return {"updated_at": updated_at, "reconnects": reconnects, "symbols": {"BTC/USDT": symbol}}


def test_watch_reports_each_episode_once_and_a_restart_is_no_storm():
    def look(seen, status, now):
        return watch_feed(status, now, seen, max_buffer_age_s=150, storm_reconnects=3)

    current = int(T0 * 1000) // MINUTE_MS * MINUTE_MS - MINUTE_MS
    seen, events = look(FeedWatch(), _status(0, current), T0)
    assert events == []
    seen, events = look(FeedWatch.from_json(seen.to_json()), _status(2, current), T0 + 60)
    assert events == []
    # Three reconnects within ten minutes: one storm, however long it lasts.
    seen, events = look(seen, _status(3, current + MINUTE_MS), T0 + 120)
    assert [(e.kind, e.value) for e in events] == [("reconnect_storm", 3)]
    seen, events = look(seen, _status(4, current + MINUTE_MS), T0 + 180)
    assert events == []
    # The collector restarts (its counter begins again): the window starts afresh.
    seen, events = look(seen, _status(1, current + 2 * MINUTE_MS), T0 + 240)
    assert events == [] and not seen.storm
    # The collector stops writing: the buffer ages past the threshold, once.
    stopped = _status(1, current + 2 * MINUTE_MS, updated_at=T0 + 240)
    seen, events = look(seen, stopped, T0 + 420)
    assert [e.kind for e in events] == ["delayed_buffer"]
    assert "has not written its status for 180 s" in events[0].message
    seen, events = look(seen, stopped, T0 + 480)
    assert events == []
    seen, events = look(seen, _status(1, current + 8 * MINUTE_MS, T0 + 600), T0 + 600)
    assert [e.kind for e in events] == ["buffer_recovered"]
