"""The dry-run sensor, and the stuck-runs sensor (pipelines.stuck_runs).

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
from datetime import UTC, date, datetime, timedelta

import dagster as dg

from assets.dry_run import DryRunBar, dry_run_key, enabled_strategies
from candlestack.backtest_store import bar_dataset
from candlestack.config import symbol_key
from candlestack.lake import Lake
from candlestack.ledger import decision_key
from candlestack.strategies.config import StrategyConfig
from pipelines.jobs import dry_run_job
from pipelines.stuck_runs import clean_up
from resources import CandleSourceResource, LakeResource

# The Dagster daemon's floor: a sensor is evaluated at most every 5 s.
INTERVAL_SECONDS = 5
STUCK_RUNS_INTERVAL_SECONDS = 60


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
    key = dry_run_key(strategy)
    return dg.RunRequest(
        run_key=decision_key(strategy.name, strategy.symbol, strategy.timeframe, bar_ts),
        asset_selection=[key],
        run_config=dg.RunConfig(
            ops={key.to_python_identifier(): DryRunBar(bar_open=bar_ts.isoformat())}
        ),
        tags={"candlestack/strategy": strategy.name, "candlestack/bar_open": bar_ts.isoformat()},
    )


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
    exchange = source.open().exchange
    today = datetime.now(UTC).date()
    requests = []
    for strategy in enabled_strategies:
        last = cursor.get(strategy.name)
        bars = closed_bars(lake.lake, exchange, strategy, today)
        wanted = bar_requests(strategy, bars, datetime.fromisoformat(last) if last else None)
        requests += [run_request(strategy, bar_ts) for bar_ts in wanted]
        if wanted:
            cursor[strategy.name] = wanted[-1].isoformat()
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
