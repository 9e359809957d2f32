"""Schedules: keep the open month current, finalise yesterday, refresh catalog and rules,
and rerun the backtests on the finalised day."""

from datetime import timedelta

import dagster as dg

from assets.partitions import candle_range
from assets.tags import RANGE_END_TAG, RANGE_START_TAG, TOP_UP_TAG
from pipelines.jobs import (
    backtest_job,
    dry_run_checks_job,
    ingest_and_build_job,
    refresh_catalog_job,
    snapshot_markets_job,
)


def _all_symbols(day: str, run_key: str, **tags: str) -> dg.RunRequest:
    # One run for every symbol of the day's month (a single-run range), not one per symbol.
    keys = candle_range(day, day)
    return dg.RunRequest(
        run_key=run_key,
        tags={
            RANGE_START_TAG: keys.start,
            RANGE_END_TAG: keys.end,
            **tags,
        },
    )


@dg.schedule(job=ingest_and_build_job, cron_schedule="* * * * *", execution_timezone="UTC")
def keep_open_day_current(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Every minute: append the newly closed candles of every symbol to the open month, and
    refresh its bars and features; what is stored closed is kept (see TOP_UP_TAG)."""
    now = context.scheduled_execution_time
    return _all_symbols(
        now.date().isoformat(),
        f"open-day-{now:%Y-%m-%dT%H:%M}",
        **{TOP_UP_TAG: "open_month"},
    )


@dg.schedule(job=ingest_and_build_job, cron_schedule="10 0 * * *", execution_timezone="UTC")
def finalise_yesterday(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Just after midnight UTC: re-fetch yesterday in full, last gap pass, checks, bars."""
    yesterday = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
    return _all_symbols(yesterday, f"finalise-{yesterday}")


@dg.schedule(job=snapshot_markets_job, cron_schedule="5 0 * * *", execution_timezone="UTC")
def snapshot_markets_daily(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    today = context.scheduled_execution_time.date().isoformat()
    return dg.RunRequest(run_key=f"markets-{today}", partition_key=today)


refresh_catalog_daily = dg.ScheduleDefinition(
    job=refresh_catalog_job, cron_schedule="20 0 * * *", execution_timezone="UTC"
)

# After yesterday is final (00:10) and its bars built: each backtest then covers a full day
# more, under a new run id, and the UI plots its metrics day by day.
backtests_daily = dg.ScheduleDefinition(
    name="backtests_daily", job=backtest_job, cron_schedule="40 0 * * *", execution_timezone="UTC"
)

# Drift and the audit chain between bars: the dry-run's own runs stay short.
dry_run_checks_every_15_minutes = dg.ScheduleDefinition(
    name="dry_run_checks_every_15_minutes",
    job=dry_run_checks_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
)
