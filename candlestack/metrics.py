"""Prometheus metrics of the lake and the dry-run ledger, computed when scraped.

`SourcesCollector` calls each source's function on every scrape, so the figures are always
those of the lake and ledger now, never a cached counter. A source that fails (a ledger
database down, say) is logged and reported as `candlestack_metrics_source_up{source} 0`;
the other sources are still served. Served by `python -m pipelines.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import polars as pl
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from candlestack.config import symbol_key
from candlestack.dryrun import LATENCY_WINDOW, latency_stats, newest_candle_close_ms
from candlestack.lake import Lake
from candlestack.ledger import GLOBAL_SCOPE, Ledger
from candlestack.live_status import FRESH_S, UNATTRIBUTED, buffer_age_s, collector_up
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.strategies.config import StrategyConfig

logger = logging.getLogger(__name__)

PREFIX = "candlestack_"
IMPUTED_WINDOW = timedelta(hours=24)
QUANTILES = {"p50": "0.5", "p95": "0.95"}

Source = Callable[[datetime], Iterable[Metric]]


class SourcesCollector(Collector):
    """Every source's metrics at scrape time, and whether each source could be read."""

    def __init__(self, sources: Mapping[str, Source], clock: Callable[[], datetime]) -> None:
        self.sources = sources
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        up = GaugeMetricFamily(
            PREFIX + "metrics_source_up",
            "1 if the source's figures could be read at this scrape, else 0 (see the log)",
            labels=["source"],
        )
        for name, source in self.sources.items():
            try:
                families = list(source(now))
            except Exception:
                logger.exception("metrics source %s failed", name)
                up.add_metric([name], 0)
                continue
            up.add_metric([name], 1)
            yield from families
        yield up


def lake_metrics(lake: Lake, exchange: str, symbols: Sequence[str], now: datetime) -> list[Metric]:
    """Candle lag and imputed share per symbol, from the stored 1-minute candles."""
    lag = GaugeMetricFamily(
        PREFIX + "candle_lag_seconds",
        "Seconds from the close of the newest stored 1m candle to now",
        labels=["symbol"],
    )
    imputed = GaugeMetricFamily(
        PREFIX + "imputed_share_24h",
        "Share of the stored 1m candles of the last 24 h that are imputed",
        labels=["symbol"],
    )
    since = now - IMPUTED_WINDOW
    for symbol in symbols:
        close_ms = newest_candle_close_ms(lake, exchange, symbol)
        if close_ms is not None:
            lag.add_metric([symbol], now.timestamp() - close_ms / 1000)
        window = lake.read_days(
            "ohlcv", exchange, "1m", symbol_key(symbol), since.date(), now.date(), ["ts", "imputed"]
        )
        if window is not None:
            window = window.filter(pl.col("ts") >= since)
            if window.height:
                imputed.add_metric([symbol], window.get_column("imputed").sum() / window.height)
    return [lag, imputed]


def ledger_metrics(
    ledger: Ledger, strategies: Sequence[StrategyConfig], now: datetime
) -> list[Metric]:
    """Dry-run latency, today's orders and rejection rate per strategy, and the kill switch
    per scope, from the ledger."""
    close_to_fill = GaugeMetricFamily(
        PREFIX + "dryrun_close_to_fill_seconds",
        f"Bar close to fill persisted, over the newest {LATENCY_WINDOW} bars decided live",
        labels=["strategy", "quantile"],
    )
    compute = GaugeMetricFamily(
        PREFIX + "dryrun_decision_compute_seconds",
        f"Decision compute time, over the newest {LATENCY_WINDOW} decisions",
        labels=["strategy", "quantile"],
    )
    orders = GaugeMetricFamily(
        PREFIX + "dryrun_orders_today",
        "Orders created today (UTC), by status (filled or rejected)",
        labels=["strategy", "status"],
    )
    rejection = GaugeMetricFamily(
        PREFIX + "dryrun_order_rejection_ratio_today",
        "Rejected share of today's (UTC) orders; absent while there is no order today",
        labels=["strategy"],
    )
    midnight = datetime.combine(now.date(), datetime.min.time(), UTC)
    for config in strategies:
        bar = timedelta(minutes=TIMEFRAME_MINUTES[config.timeframe])
        decisions = ledger.decisions(config.name, since=now - (LATENCY_WINDOW + 1) * bar)
        stats = latency_stats(decisions, config.timeframe)
        for name, q in QUANTILES.items():
            if (value := stats.get(f"close_to_fill_{name}_s")) is not None:
                close_to_fill.add_metric([config.name, q], value)
            if (value := stats.get(f"decision_compute_{name}_ms")) is not None:
                compute.add_metric([config.name, q], value / 1000)
        today = ledger.orders(config.name).filter(pl.col("created_at") >= midnight)
        rejected = today.filter(pl.col("status") == "rejected").height
        orders.add_metric([config.name, "filled"], today.height - rejected)
        orders.add_metric([config.name, "rejected"], rejected)
        if today.height:
            rejection.add_metric([config.name], rejected / today.height)
    return [close_to_fill, compute, orders, rejection, kill_switch_metric(ledger, strategies)]


def kill_switch_metric(ledger: Ledger, strategies: Sequence[StrategyConfig]) -> Metric:
    tripped = GaugeMetricFamily(
        PREFIX + "kill_switch_tripped",
        'Kill switch per scope (a strategy, or "*" for all): 1 tripped, 0 armed',
        labels=["scope"],
    )
    states = dict(ledger.kill_switch_states().select("scope", "tripped").iter_rows())
    for scope in dict.fromkeys([GLOBAL_SCOPE, *(c.name for c in strategies), *states]):
        tripped.add_metric([scope], float(bool(states.get(scope))))
    return tripped


def live_metrics(status: dict | None, now: datetime) -> list[Metric]:
    """The live collector's buffers, messages, reconnects, rejections and persist latency
    per symbol, from its status file (candlestack.live_status)."""
    up = GaugeMetricFamily(
        PREFIX + "live_collector_up",
        f"1 while the live collector's status is fresh (written within {FRESH_S:.0f} s), else 0",
    )
    if status is None:
        up.add_metric([], 0)
        return [up]
    at = now.timestamp()
    up.add_metric([], float(collector_up(status, at)))
    status_age = GaugeMetricFamily(
        PREFIX + "live_status_age_seconds", "Seconds since the live collector wrote its status"
    )
    status_age.add_metric([], at - status["updated_at"])
    labels = ["symbol"]
    buffer_age = GaugeMetricFamily(
        PREFIX + "live_buffer_age_seconds",
        "Seconds from the close of the newest streamed-and-stored closed candle to now",
        labels=labels,
    )
    per_minute = GaugeMetricFamily(
        PREFIX + "live_messages_per_minute",
        "Kline messages received over the last minute",
        labels=labels,
    )
    messages = CounterMetricFamily(
        PREFIX + "live_messages", "Kline messages received, forming and closed", labels=labels
    )
    reconnects = CounterMetricFamily(
        PREFIX + "live_reconnects",
        "Reconnects of the connection the symbol streams on",
        labels=labels,
    )
    repaired = CounterMetricFamily(
        PREFIX + "live_repaired_minutes",
        "Minutes fetched over REST because the stream did not deliver them",
        labels=labels,
    )
    rejected = CounterMetricFamily(
        PREFIX + "live_rejected_messages",
        f"Messages refused, by reason (symbol {UNATTRIBUTED!r}: naming no streamed symbol)",
        labels=["symbol", "reason"],
    )
    latency = HistogramMetricFamily(
        PREFIX + "live_persist_latency_seconds",
        "From the closing kline's arrival to the candle persisted in the lake",
        labels=labels,
    )
    bounds = status["latency_bounds_ms"]
    for symbol, s in status["symbols"].items():
        if (age := buffer_age_s(s, at)) is not None:
            buffer_age.add_metric([symbol], age)
        if s["messages_per_minute"] is not None:
            per_minute.add_metric([symbol], s["messages_per_minute"])
        messages.add_metric([symbol], s["messages"])
        reconnects.add_metric([symbol], s["reconnects"])
        repaired.add_metric([symbol], s["repaired"])
        for reason, count in s["rejected"].items():
            rejected.add_metric([symbol, reason], count)
        counts = zip(bounds, s["latency_buckets_ms"], strict=True)
        buckets = [(f"{bound / 1000:g}", n) for bound, n in counts]
        latency.add_metric(
            [symbol], [*buckets, ("+Inf", s["latency_count"])], s["latency_sum_ms"] / 1000
        )
    for reason, count in status["rejected"].items():
        rejected.add_metric([UNATTRIBUTED, reason], count)
    return [
        up,
        status_age,
        buffer_age,
        per_minute,
        messages,
        reconnects,
        repaired,
        rejected,
        latency,
    ]
