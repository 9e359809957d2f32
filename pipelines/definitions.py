"""The code location: everything Dagster loads is assembled here."""

import dagster as dg

from assets.backtests import backtest_assets, sweep_assets
from assets.bars import bar_assets
from assets.dry_run import drift_checks, dry_run_assets, ledger_snapshot
from assets.features import feature_assets
from assets.market_data import candle_coverage, candles_1m, candles_freshness, catalog, markets
from pipelines.alerts import alert_sensors
from pipelines.dagster_adapter import worker_tracking_executor
from pipelines.jobs import (
    backtest_job,
    build_bars_job,
    build_features_job,
    dry_run_checks_job,
    dry_run_job,
    ingest_and_build_job,
    ingest_candles_job,
    kill_switch,
    refresh_catalog_job,
    snapshot_markets_job,
)
from pipelines.schedules import (
    backtests_daily,
    dry_run_checks_every_15_minutes,
    finalise_yesterday,
    keep_open_day_current,
    refresh_catalog_daily,
    snapshot_markets_daily,
)
from pipelines.sensors import dry_run_bars, live_feed, stuck_runs
from resources import AlertResource, LakeResource, ledger_resource, source_resource
from resources.deployment import settings
from resources.env import env_var_or


def run_executor() -> dg.ExecutorDefinition:
    """CANDLESTACK_EXECUTOR: in_process, or celery (each step a task on the workers)."""
    if settings.executor == "celery":
        # Imported only when selected: an in-process deployment never loads Celery.
        from pipelines.workers import executor_config, recorded_celery_executor

        return recorded_celery_executor.configured(executor_config(settings))
    # Each job here is one heavy step plus light checks: on 2 cores a process per step
    # only adds ~3 s of spawn and definitions reload per step (measured in bench/). It records
    # the run's process, so a killed run's pool slots are freed (pipelines.stuck_runs).
    return worker_tracking_executor


defs = dg.Definitions(
    assets=[
        candles_1m,
        *bar_assets,
        *feature_assets,
        markets,
        candle_coverage,
        catalog,
        *backtest_assets,
        *sweep_assets,
        *dry_run_assets,
        ledger_snapshot,
    ],
    asset_checks=[candles_freshness, *drift_checks],
    jobs=[
        ingest_candles_job,
        build_bars_job,
        build_features_job,
        ingest_and_build_job,
        backtest_job,
        snapshot_markets_job,
        refresh_catalog_job,
        dry_run_job,
        dry_run_checks_job,
        kill_switch,
    ],
    sensors=[dry_run_bars, stuck_runs, live_feed, *alert_sensors],
    schedules=[
        keep_open_day_current,
        finalise_yesterday,
        snapshot_markets_daily,
        refresh_catalog_daily,
        backtests_daily,
        dry_run_checks_every_15_minutes,
    ],
    executor=run_executor(),
    resources={
        "source": source_resource(settings),
        "lake": LakeResource(
            root=str(settings.lake),
            catalog_path=str(settings.catalog),
            reports_path=str(settings.reports),
            imputed_max_share=settings.imputed_max_share,
            zero_volume_max_share=settings.zero_volume_max_share,
            freshness_lag_minutes=settings.freshness_lag_minutes,
        ),
        "ledger": ledger_resource(settings),
        # EnvVar: the UI shows the variables' names, never the webhook URLs (credentials).
        "alerts": AlertResource(
            webhook_url=env_var_or("CANDLESTACK_ALERT_WEBHOOK_URL", None),
            slack_webhook_url=env_var_or("CANDLESTACK_SLACK_WEBHOOK_URL", None),
            ui_url=settings.ui_url,
        ),
    },
)
