"""The dry-run sensor, the stuck-runs sensor (pipelines.stuck_runs) and the live-feed
sensor (candlestack.live_status).

The dry-run sensor: a run of the dry-run job for each newly closed bar of each enabled
strategy, keyed strategy|symbol|timeframe|bar open so no bar is requested twice.

The cursor (kept by Dagster, so it survives daemon restarts) holds, per strategy, the open
time of the last bar requested. A strategy seen for the first time starts at its newest
closed bar: a dry-run does not trade history. Bars that closed while nothing ran are
requested one by one in order (catch_up "all"), or only the newest is requested (catch_up
"latest") and the run records the others as skipped. The run key, and below it the ledger's
unique decision key, make a repeated tick or a re-materialized partition a no-op.
"""

import json
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import polars as pl

from assets.dry_run import DryRunBar, enabled_strategies
from assets.keys import dry_run_key
from assets.markdown import md_table
from assets.market_data import candles_1m
from assets.tags import BAR_OPEN_TAG, STRATEGY_TAG
from candlestack.backtest_store import bar_dataset
from candlestack.config import symbol_key
from candlestack.lake import Lake
from candlestack.ledger import decision_key
from candlestack.live_status import (
    FeedWatch,
    buffer_age_s,
    collector_up,
    read_status,
    watch_feed,
)
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.strategies.config import StrategyConfig
from pipelines.jobs import dry_run_job
from pipelines.stuck_runs import clean_up
from resources import CandleSourceResource, LakeResource, deployment

# The Dagster daemon's floor: a sensor is evaluated at most every 5 s.
INTERVAL_SECONDS = 5
# How long a tick waits for a bar after its close, and how often it looks meanwhile. The
# wait keeps a tick under INTERVAL_SECONDS + BAR_WAIT_SECONDS, far below Dagster's sensor
# timeout; sensors are evaluated in threads (dagster.yaml), so the others do not wait.
BAR_WAIT_SECONDS = 2.0
BAR_POLL_SECONDS = 0.1
STUCK_RUNS_INTERVAL_SECONDS = 60
LIVE_FEED_INTERVAL_SECONDS = 30
LIVE_FEED_OBSERVED_EVERY_S = 60  # the feed's state, as an observation of candles_1m


def closed_bars(lake: Lake, exchange: str, strategy: StrategyConfig, today: date) -> list[datetime]:
    """Open times of the strategy's stored (closed) bars of yesterday and today, oldest first.
    Bar files only ever hold closed periods (candlestack.resample)."""
    bars = lake.read_days(
        bar_dataset(strategy),
        exchange,
        strategy.timeframe,
        symbol_key(strategy.symbol),
        today - timedelta(days=1),
        today,
        ["ts"],
    )
    return [] if bars is None else bars.get_column("ts").to_list()


def bar_requests(
    strategy: StrategyConfig, bars: list[datetime], last: datetime | None
) -> list[datetime]:
    """Which bars to request after `last` (the cursor), per the catch-up policy."""
    if not bars:
        return []
    if last is None:
        return [bars[-1]]
    new = [b for b in bars if b > last]
    if strategy.dry_run.catch_up == "latest":
        return new[-1:]
    return new


def run_request(strategy: StrategyConfig, bar_ts: datetime) -> dg.RunRequest:
    key = dry_run_key(strategy.name)
    return dg.RunRequest(
        run_key=decision_key(strategy.name, strategy.symbol, strategy.timeframe, bar_ts),
        asset_selection=[key],
        run_config=dg.RunConfig(
            ops={key.to_python_identifier(): DryRunBar(bar_open=bar_ts.isoformat())}
        ),
        tags={STRATEGY_TAG: strategy.name, BAR_OPEN_TAG: bar_ts.isoformat()},
    )


def due_close(strategies: list[StrategyConfig], cursor: dict[str, str], now: float) -> float | None:
    """The soonest close (epoch s) of a strategy's bar not requested yet that falls before
    the next tick or ended at most BAR_WAIT_SECONDS ago, or None."""
    closes = []
    for strategy in strategies:
        period_s = TIMEFRAME_MINUTES[strategy.timeframe] * 60
        close = (now + INTERVAL_SECONDS) // period_s * period_s  # periods are UTC-aligned
        last = cursor.get(strategy.name)
        bar_open = datetime.fromtimestamp(close - period_s, UTC)
        if close > now - BAR_WAIT_SECONDS and (
            last is None or datetime.fromisoformat(last) < bar_open
        ):
            closes.append(close)
    return min(closes, default=None)


def requests_waiting_for_close(
    strategies: list[StrategyConfig],
    cursor: dict[str, str],
    poll: Callable[[], list[dg.RunRequest]],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dg.RunRequest]:
    """`poll()`'s requests; when it has none and a bar closes before the next tick (or has
    just closed), polled again from its close until it is stored, for up to
    BAR_WAIT_SECONDS. The live collector stores a bar within a second of its close: its run
    is requested then, not up to a whole tick interval later."""
    requests = poll()
    while not requests and (close := due_close(strategies, cursor, clock())) is not None:
        sleep(max(close - clock(), BAR_POLL_SECONDS))
        requests = poll()
    return requests


@dg.sensor(
    job=dry_run_job,
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests a dry-run of each enabled strategy for every newly closed bar of its "
    "symbol and timeframe (run key strategy|symbol|timeframe|bar open).",
)
def dry_run_bars(
    context: dg.SensorEvaluationContext, lake: LakeResource, source: CandleSourceResource
) -> dg.SensorResult:
    cursor: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    exchange = source.exchange_name()

    def poll() -> list[dg.RunRequest]:
        today = datetime.now(UTC).date()
        requests = []
        for strategy in enabled_strategies:
            last = cursor.get(strategy.name)
            bars = closed_bars(lake.lake, exchange, strategy, today)
            wanted = bar_requests(strategy, bars, datetime.fromisoformat(last) if last else None)
            requests += [run_request(strategy, bar_ts) for bar_ts in wanted]
            if wanted:
                cursor[strategy.name] = wanted[-1].isoformat()
        return requests

    requests = requests_waiting_for_close(enabled_strategies, cursor, poll)
    if not requests:
        return dg.SensorResult(skip_reason="no newly closed bar", cursor=json.dumps(cursor))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))


@dg.sensor(
    minimum_interval_seconds=STUCK_RUNS_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails each run whose process on this host is gone (a killed backfill or "
    "run worker) and frees its pool slots, and the slots of ended runs; names unfinished "
    "runs it cannot verify (python -m pipelines.stuck_runs).",
)
def stuck_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    cleanup = clean_up(context.instance)
    for line in cleanup.lines():
        context.log.warning(line)
    return dg.SkipReason(cleanup.summary())


def _feed_state(status: dict, now: float) -> dg.AssetObservation:
    rows = []
    for symbol, s in status["symbols"].items():
        count = s["latency_count"]
        rows.append(
            {
                "symbol": symbol,
                "buffer age s": buffer_age_s(s, now),
                "messages/min": s["messages_per_minute"],
                "reconnects": s["reconnects"],
                "repaired": s["repaired"],
                "rejected": sum(s["rejected"].values()),
                "mean persist ms": s["latency_sum_ms"] / count if count else None,
            }
        )
    table = pl.DataFrame(rows).with_columns(pl.selectors.float().round(1))
    oldest = table.get_column("buffer age s").max()
    return dg.AssetObservation(
        candles_1m.key,
        description="The live collector's feed",
        metadata={
            "live_collector_up": collector_up(status, now),
            "live_status_age_s": round(now - status["updated_at"], 1),
            "live_oldest_buffer_s": oldest,
            "live_reconnects": status["reconnects"],
            "live_stalls": status["stalls"],
            "live_symbols": dg.MetadataValue.md(md_table(table)),
        },
    )


@dg.sensor(
    minimum_interval_seconds=LIVE_FEED_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records the live collector's feed on candles_1m (an observation a minute), "
    "and each delayed buffer and reconnect storm as it begins (alerted by alert_live_feed).",
)
def live_feed(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    settings = deployment.settings
    status = read_status(settings.live_status)
    if status is None:
        return dg.SensorResult(
            skip_reason=f"no live collector status at {settings.live_status} "
            "(python -m candlestack.live writes it)",
            cursor=context.cursor,
        )
    now = time.time()
    watch, events = watch_feed(
        status,
        now,
        FeedWatch.from_json(context.cursor),
        max_buffer_age_s=settings.live_max_buffer_age_seconds,
        storm_reconnects=settings.live_reconnect_storm,
    )
    observations = [
        dg.AssetObservation(
            candles_1m.key,
            description=event.message,
            metadata={"live_event": event.kind, "symbol": event.symbol, "value": event.value},
        )
        for event in events
    ]
    if now - watch.observed_at >= LIVE_FEED_OBSERVED_EVERY_S:
        observations.append(_feed_state(status, now))
        watch.observed_at = now
    return dg.SensorResult(
        asset_events=observations,
        skip_reason="; ".join(e.message for e in events) or "live feed as before",
        cursor=watch.to_json(),
    )
