"""Alert sensors: run failures and failed checks from the Dagster instance, kill-switch trips
from the ledger, each posted once to every configured target (candlestack.alerts).

Each sensor's cursor holds, per target, how far that target got (candlestack.alerts.Mark).
A sensor seen for the first time starts at the newest event: history is not alerted. A
delivery that fails is posted again on the next tick; the sensor never raises for it,
because a raising tick would not keep the cursor of the targets that did accept.

Why not `run_failure_sensor`: it moves its cursor past a run even when the function raises
(dagster/_core/definitions/run_status_sensor_definition.py), so a failed post would be
dropped. `alert_runs_and_checks` reads the same run-status events by storage id itself.
Failed checks are read from the runs that ended: the run-status events are the instance's
cross-run index on SQLite too, where check evaluations by storage id are not.

Both sensors run by default when a webhook or Slack URL is configured (that setting is the
opt-in, and the daemon must run: `dagster dev` or `dagster-daemon run`); without one they
are stopped, and a started one skips, saying what to set.
"""

import json
from collections.abc import Callable
from datetime import UTC, datetime

import dagster as dg

from assets.dry_run import DRIFT_CHECK, enabled_strategies
from assets.keys import dry_run_key
from assets.market_data import candles_1m, candles_freshness
from assets.tags import PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG, STRATEGY_TAG
from candlestack.alerts import (
    CHECK_FAILURE,
    DRIFT,
    LIVE_FEED,
    RUN_FAILURE,
    STALE_DATA,
    Alert,
    Mark,
    Pending,
    clip,
    deliver,
    kill_switch_alerts,
)
from candlestack.ledger import AUDIT_KILL_SWITCH_TRIP
from candlestack.live_status import DELAYED_BUFFER, RECONNECT_STORM
from pipelines.dagster_adapter import SerializableErrorInfo
from resources import AlertResource, LedgerResource, deployment

INTERVAL_SECONDS = 30
# Run-end events read per tick and event type; the rest follow on the next ticks.
FETCH_LIMIT = 100
RUN_ENDS = (
    dg.DagsterEventType.RUN_SUCCESS,
    dg.DagsterEventType.RUN_FAILURE,
    dg.DagsterEventType.RUN_CANCELED,
)
FRESHNESS = next(iter(candles_freshness.check_keys))
SYMBOLS = {c.name: c.symbol for c in enabled_strategies}
STRATEGY_BY_ASSET = {dry_run_key(c.name): c.name for c in enabled_strategies}

DEFAULT_STATUS = (
    dg.DefaultSensorStatus.RUNNING
    if deployment.settings.alerts_configured
    else dg.DefaultSensorStatus.STOPPED
)
NOT_CONFIGURED = (
    "no alert target: set CANDLESTACK_ALERT_WEBHOOK_URL or CANDLESTACK_SLACK_WEBHOOK_URL"
)


def _evaluate(
    context: dg.SensorEvaluationContext,
    alerts: AlertResource,
    newest: Callable[[], int],
    fetch: Callable[[int], tuple[list[Pending], int]],
) -> dg.SensorResult:
    """Deliver what is new since each target's mark. `newest()` is where a target seen for
    the first time starts; `fetch(after)` returns the alerts of events after `after` and
    the newest event it read through."""
    targets = alerts.targets()
    if not targets:
        return dg.SensorResult(skip_reason=NOT_CONFIGURED, cursor=context.cursor)
    stored = json.loads(context.cursor) if context.cursor else {}
    marks = {name: Mark.from_json(value) for name, value in stored.items()}
    fresh = [t.name for t in targets if t.name not in marks]
    if fresh:
        start = Mark(newest())
        marks |= {name: start for name in fresh}
    marks = {t.name: marks[t.name] for t in targets}
    pending, scanned = fetch(min(mark.event for mark in marks.values()) - 1)
    delivery = deliver(
        pending,
        scanned,
        targets,
        marks,
        timeout=alerts.timeout_seconds,
        secrets=alerts.secrets(),
    )
    for error in delivery.errors:
        context.log.warning(error)
    cursor = json.dumps({name: mark.to_json() for name, mark in delivery.marks.items()})
    sent = ", ".join(f"{n} to {name}" for name, n in delivery.sent.items() if n)
    summary = "; ".join(
        [f"sent {sent}" if sent else "nothing new"]
        + (["started at the newest event for " + ", ".join(fresh)] if fresh else [])
        + delivery.errors
    )
    return dg.SensorResult(skip_reason=summary, cursor=cursor)


# --- runs and checks ------------------------------------------------------------------------


def _newest_run_end(instance: dg.DagsterInstance) -> int:
    ids = [
        records[0].storage_id
        for event_type in RUN_ENDS
        if (records := instance.fetch_run_status_changes(event_type, limit=1).records)
    ]
    return max(ids, default=0)


def _run_ends(instance: dg.DagsterInstance, after: int) -> tuple[list[dg.EventLogRecord], int]:
    """Run-end events after storage id `after`, oldest first, and the id read through: when
    a type has more than FETCH_LIMIT, no further than its last one, so none is skipped."""
    records, through = [], None
    for event_type in RUN_ENDS:
        batch = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(event_type=event_type, after_storage_id=after),
            limit=FETCH_LIMIT,
            ascending=True,
        ).records
        records += batch
        if len(batch) == FETCH_LIMIT:
            last = batch[-1].storage_id
            through = last if through is None else min(through, last)
    if through is None:
        through = max((r.storage_id for r in records), default=after)
    kept = sorted((r for r in records if r.storage_id <= through), key=lambda r: r.storage_id)
    return kept, through


def _partition(run: dg.DagsterRun) -> str | None:
    if RANGE_START_TAG in run.tags:
        return f"{run.tags[RANGE_START_TAG]}...{run.tags[RANGE_END_TAG]}"
    return run.tags.get(PARTITION_TAG)


def _root_cause(error: SerializableErrorInfo) -> str:
    """The exception that started it (Dagster wraps it in its own step error)."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _figures(metadata: dict) -> dict[str, object]:
    """Metadata a person reads in an alert: numbers, flags and texts (tables clipped)."""
    figures = {}
    for name, entry in metadata.items():
        value = entry.value
        if isinstance(value, str):
            figures[name] = clip(value, 1_000)
        elif isinstance(value, bool | int | float):
            figures[name] = value
    return figures


def _run_alerts(
    instance: dg.DagsterInstance, record: dg.EventLogRecord, ui_url: str | None
) -> list[Pending]:
    """The alerts of one ended run: its failure (index 0), then each failed check that
    blocks, has ERROR severity or is the freshness check (index 1 + its place in the run)."""
    run_id = record.event_log_entry.run_id
    run = instance.get_run_by_id(run_id)
    if run is None:  # deleted since
        return []
    strategy = run.tags.get(STRATEGY_TAG)
    where = {
        "job": run.job_name,
        "run_id": run_id,
        "partition": _partition(run),
        "strategy": strategy,
        "symbol": SYMBOLS.get(strategy) if strategy else None,
        "url": f"{ui_url}/runs/{run_id}" if ui_url else None,
    }
    events = instance.get_records_for_run(
        run_id,
        of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.ASSET_CHECK_EVALUATION},
    ).records
    pending = []
    if record.event_log_entry.dagster_event_type == dg.DagsterEventType.RUN_FAILURE:
        errors = [
            f"{entry.step_key}: {_root_cause(failure.error)}"
            for entry in (e.event_log_entry for e in events)
            if entry.dagster_event_type == dg.DagsterEventType.STEP_FAILURE
            and (failure := entry.dagster_event.step_failure_data).error
        ]
        reason = "; ".join(errors) or record.event_log_entry.dagster_event.message
        # The planned events name the run's assets however it was launched.
        planned = instance.get_records_for_run(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
        ).records
        keys = {r.event_log_entry.dagster_event.asset_key for r in planned}
        assets = ", ".join(sorted(k.to_user_string() for k in keys))
        alert = Alert(
            id=f"run:{record.storage_id}:0",
            kind=RUN_FAILURE,
            message=clip(f"run of {run.job_name} failed: {reason}", 1_500),
            at=datetime.fromtimestamp(record.timestamp, UTC),
            asset=clip(assets, 300) or None,
            **where,
        )
        pending.append(Pending((record.storage_id, 0), alert))
    checks = [
        e
        for e in events
        if e.event_log_entry.dagster_event_type != dg.DagsterEventType.STEP_FAILURE
    ]
    for index, event in enumerate(checks, start=1):
        evaluation = event.event_log_entry.dagster_event.event_specific_data
        key = dg.AssetCheckKey(evaluation.asset_key, evaluation.check_name)
        severe = evaluation.blocking or evaluation.severity == dg.AssetCheckSeverity.ERROR
        if evaluation.passed or not (severe or key == FRESHNESS):
            continue
        if key == FRESHNESS:
            kind = STALE_DATA
        elif key.name == DRIFT_CHECK and key.asset_key in STRATEGY_BY_ASSET:
            kind = DRIFT
        else:
            kind = CHECK_FAILURE
        strategy = STRATEGY_BY_ASSET.get(key.asset_key) or where["strategy"]
        figures = _figures(evaluation.metadata)
        numbers = ", ".join(f"{k} {v:g}" for k, v in figures.items() if isinstance(v, int | float))
        text = (
            f"{'blocking ' if evaluation.blocking else ''}check {key.name} on "
            f"{key.asset_key.to_user_string()} failed ({evaluation.severity.value.lower()})"
            + (f": {evaluation.description}" if evaluation.description else "")
            + (f" [{numbers}]" if numbers else "")
        )
        alert = Alert(
            id=f"run:{record.storage_id}:{index}",
            kind=kind,
            message=clip(text, 1_500),
            at=datetime.fromtimestamp(event.timestamp, UTC),
            asset=key.asset_key.to_user_string(),
            check=key.name,
            **(
                where
                | {
                    "partition": evaluation.partition or where["partition"],
                    "strategy": strategy,
                    "symbol": SYMBOLS.get(strategy) if strategy else None,
                }
            ),
            details={"severity": evaluation.severity.value, "blocking": bool(evaluation.blocking)}
            | figures,
        )
        pending.append(Pending((record.storage_id, index), alert))
    return pending


@dg.sensor(
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DEFAULT_STATUS,
    description="Posts an alert, once, for each failed run and each failed blocking, "
    "ERROR-severity or freshness check of an ended run (CANDLESTACK_ALERT_WEBHOOK_URL, "
    "CANDLESTACK_SLACK_WEBHOOK_URL).",
)
def alert_runs_and_checks(
    context: dg.SensorEvaluationContext, alerts: AlertResource
) -> dg.SensorResult:
    instance = context.instance

    def fetch(after: int) -> tuple[list[Pending], int]:
        ended, through = _run_ends(instance, after)
        return [p for r in ended for p in _run_alerts(instance, r, alerts.ui_base)], through

    return _evaluate(context, alerts, lambda: _newest_run_end(instance), fetch)


# --- the ledger -----------------------------------------------------------------------------


@dg.sensor(
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DEFAULT_STATUS,
    description="Posts an alert, once, for each kill-switch trip in the ledger's audit log, "
    "whatever tripped it (drawdown, error burst, stale or low-quality data, by hand).",
)
def alert_kill_switch(
    context: dg.SensorEvaluationContext, alerts: AlertResource, ledger: LedgerResource
) -> dg.SensorResult:
    book = ledger.open()

    def fetch(after: int) -> tuple[list[Pending], int]:
        # The head first: a trip appended while reading is left for the next tick.
        head, _ = book.audit_head()
        trips = book.audit_events(after=after, kinds=[AUDIT_KILL_SWITCH_TRIP])
        trips = trips.filter(trips["seq"] <= head)
        return kill_switch_alerts(trips, SYMBOLS, alerts.ui_base), head

    return _evaluate(context, alerts, lambda: book.audit_head()[0], fetch)


# --- the live feed --------------------------------------------------------------------------

LIVE_ALERT_KINDS = {DELAYED_BUFFER: STALE_DATA, RECONNECT_STORM: LIVE_FEED}


def _newest_observation(instance: dg.DagsterInstance) -> int:
    records = instance.fetch_observations(candles_1m.key, limit=1).records
    return records[0].storage_id if records else 0


def _live_feed_alerts(
    instance: dg.DagsterInstance, after: int, ui_base: str | None
) -> tuple[list[Pending], int]:
    """An alert for each delayed buffer and reconnect storm the live_feed sensor recorded
    (observations of candles_1m) after storage id `after`."""
    records = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=candles_1m.key, after_storage_id=after),
        limit=FETCH_LIMIT,
        ascending=True,
    ).records
    pending = []
    for record in records:
        observation = record.asset_observation
        event = observation.metadata.get("live_event")
        if event is None or event.value not in LIVE_ALERT_KINDS:
            continue
        symbol = observation.metadata["symbol"].value
        alert = Alert(
            id=f"live:{record.storage_id}",
            kind=LIVE_ALERT_KINDS[event.value],
            message=observation.description,
            at=datetime.fromtimestamp(record.timestamp, UTC),
            asset=candles_1m.key.to_user_string(),
            symbol=symbol,
            url=f"{ui_base}/assets/{candles_1m.key.to_user_string()}" if ui_base else None,
            details={"event": event.value, "value": observation.metadata["value"].value},
        )
        pending.append(Pending((record.storage_id, 0), alert))
    return pending, records[-1].storage_id if records else after


@dg.sensor(
    minimum_interval_seconds=INTERVAL_SECONDS,
    default_status=DEFAULT_STATUS,
    description="Posts an alert, once, for each delayed live buffer and each reconnect storm "
    "of the live collector (recorded by the live_feed sensor).",
)
def alert_live_feed(context: dg.SensorEvaluationContext, alerts: AlertResource) -> dg.SensorResult:
    instance = context.instance
    return _evaluate(
        context,
        alerts,
        lambda: _newest_observation(instance),
        lambda after: _live_feed_alerts(instance, after, alerts.ui_base),
    )


alert_sensors = [alert_runs_and_checks, alert_kill_switch, alert_live_feed]
