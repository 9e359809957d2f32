"""Jobs: ingestion (partitioned by day x symbol), market rules, and the lake's catalog."""

import dagster as dg

from assets.backtests import backtest_assets, sweep_assets
from assets.bars import bar_assets
from assets.features import feature_assets
from assets.market_data import candle_coverage, candles_1m, catalog, markets
from assets.partitions import candle_partitions, daily_partitions

ingest_candles_job = dg.define_asset_job(
    "ingest_candles",
    selection=dg.AssetSelection.assets(candles_1m),
    partitions_def=candle_partitions,
    description="1-minute candles with gap pass and checks, for any day x symbol range.",
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
