"""Jobs: ingestion (partitioned by month x symbol), market rules, the lake's catalog, backtests,
the dry-run and its kill switch."""

from typing import Literal

import dagster as dg
from pydantic import Field

from assets.backtests import backtest_assets, sweep_assets
from assets.bars import bar_assets
from assets.dry_run import (
    drift_checks,
    dry_run_assets,
    kill_switch_table,
    ledger_snapshot,
)
from assets.features import feature_assets
from assets.keys import LEDGER_KEY
from assets.market_data import candle_coverage, candles_1m, catalog, markets
from assets.partitions import candle_partitions, daily_partitions
from candlestack.kill_switch import known_scope
from candlestack.ledger import GLOBAL_SCOPE
from candlestack.strategies.config import load_strategies
from resources import LedgerResource
from resources.deployment import settings

ingest_candles_job = dg.define_asset_job(
    "ingest_candles",
    selection=dg.AssetSelection.assets(candles_1m),
    partitions_def=candle_partitions,
    description="1-minute candles with gap pass and checks, for any month x symbol range.",
)
build_bars_job = dg.define_asset_job(
    "build_bars",
    selection=dg.AssetSelection.assets(*bar_assets),
    partitions_def=candle_partitions,
    description="Bars of every timeframe from the 1-minute candles in the lake.",
)
build_features_job = dg.define_asset_job(
    "build_features",
    selection=dg.AssetSelection.assets(*feature_assets),
    partitions_def=candle_partitions,
    description="Features of every configured timeframe from the bars in the lake.",
)
ingest_and_build_job = dg.define_asset_job(
    "ingest_and_build",
    selection=dg.AssetSelection.assets(candles_1m, *bar_assets, *feature_assets),
    partitions_def=candle_partitions,
    description="1-minute candles, then every bar and feature built on them, in one run.",
)
snapshot_markets_job = dg.define_asset_job(
    "snapshot_markets",
    selection=dg.AssetSelection.assets(markets),
    partitions_def=daily_partitions,
)
refresh_catalog_job = dg.define_asset_job(
    "refresh_catalog",
    selection=dg.AssetSelection.assets(catalog, candle_coverage),
    description="Rebuild the DuckDB catalog and the coverage grid from what the lake holds.",
)
backtest_job = dg.define_asset_job(
    "backtest",
    selection=dg.AssetSelection.assets(*backtest_assets, *sweep_assets),
    description="Every configured backtest and parameter sweep over the bars in the lake.",
)
dry_run_job = dg.define_asset_job(
    "dry_run",
    selection=dg.AssetSelection.assets(*dry_run_assets),
    description="Decide one closed bar of one strategy into the ledger (the dry-run sensor "
    "selects the strategy's asset and the bar). Paper trading only: no real orders.",
)
dry_run_checks_job = dg.define_asset_job(
    "dry_run_checks",
    selection=dg.AssetSelection.assets(ledger_snapshot) | dg.AssetSelection.checks(*drift_checks),
    description="Ledger snapshot with its audit-chain check, and the drift of every dry-run "
    "against its backtest.",
)


class KillSwitchChange(dg.Config):
    action: Literal["trip", "reset"]
    scope: str = Field(
        GLOBAL_SCOPE, description='a strategy name, or "*" for every strategy at once'
    )
    reason: str = Field(description="why: kept in the ledger and its audit log")


@dg.op
def change_kill_switch(
    context: dg.OpExecutionContext, config: KillSwitchChange, ledger: LedgerResource
) -> None:
    """Trip or reset the kill switch by hand; audited with the run that did it."""
    if not config.reason.strip():
        raise ValueError("a kill-switch change needs a reason")
    strategies = load_strategies(settings.strategies).strategies
    known_scope(config.scope, [s.name for s in strategies])
    book = ledger.open()
    by = f"dagster run {context.run_id}"
    change = book.trip if config.action == "trip" else book.reset
    changed = change(config.scope, config.reason, by)
    context.log.info(
        "kill switch %s: %s%s",
        config.scope,
        config.action,
        "" if changed else " (no change: it was in that state already)",
    )
    context.log_event(
        dg.AssetObservation(
            asset_key=LEDGER_KEY,
            metadata={
                "kill_switch": dg.MetadataValue.md(kill_switch_table(book)),
                "change": f"{config.action} {config.scope}: {config.reason} ({by})",
            },
        )
    )


@dg.job(description="Trip or reset the dry-run kill switch by hand, with a reason (audited).")
def kill_switch():
    change_kill_switch()
