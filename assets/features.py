"""Indicator features per timeframe, from the bars strategies read, with their warm-up check."""

import dagster as dg
import polars as pl

from assets.keys import bars_key, features_key
from assets.markdown import md_table
from assets.market_data import candles_1m
from assets.partitions import candle_backfill_policy, candle_partitions, symbol_months
from candlestack.feature_store import FeatureBuilder, FeatureOutcome, load_feature_set
from candlestack.features import feature_columns, warmup_bars
from resources import CandleSourceResource, LakeResource
from resources.deployment import settings

WARMUP_CHECK = "no_null_after_warmup"

# Loaded with the code location: a wrong feature set fails here, not in a run at night.
feature_set = load_feature_set(settings.features)


def _days_table(outcomes: list[FeatureOutcome]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "date": str(o.day),
                "symbol": o.symbol_key,
                "rows": o.rows,
                "warm": o.warm,
                "nulls": o.nulls_after_warmup,
                "skipped": o.skipped or "",
            }
            for o in outcomes
        ],
        schema=["date", "symbol", "rows", "warm", "nulls", "skipped"],
    )


def _features_asset(timeframe: str) -> dg.AssetsDefinition:
    specs = feature_set.for_timeframe(timeframe)
    key = features_key(timeframe)
    upstream = candles_1m.key if timeframe == "1m" else bars_key(timeframe)

    @dg.asset(
        key=key,
        deps=[upstream],
        partitions_def=candle_partitions,
        backfill_policy=candle_backfill_policy,
        group_name="features",
        kinds={"parquet", "polars"},
        description=f"TA-Lib features on {timeframe} bars: {', '.join(feature_columns(specs))}. "
        f"Warm-up {warmup_bars(specs)} bars: rows without that history are null.",
        check_specs=[
            dg.AssetCheckSpec(
                WARMUP_CHECK,
                asset=key,
                blocking=True,
                description="On days whose whole warm-up is in the lake, no feature is null.",
            )
        ],
    )
    def features(
        context: dg.AssetExecutionContext, source: CandleSourceResource, lake: LakeResource
    ) -> dg.MaterializeResult:
        builder = FeatureBuilder(
            lake.lake, source.exchange_name(), feature_set, lake.imputed_max_share
        )
        outcomes = []
        for symbol_key, months in symbol_months(context.partition_keys).items():
            for month, partition_key in sorted(months.items()):
                month_outcomes = builder.build(timeframe, symbol_key, month)
                outcomes += month_outcomes
                context.add_asset_metadata(
                    {
                        "rows": sum(o.rows for o in month_outcomes),
                        "days_warm": sum(o.warm for o in month_outcomes),
                        "nulls_after_warmup": sum(o.nulls_after_warmup for o in month_outcomes),
                        "days_skipped": sum(o.skipped is not None for o in month_outcomes),
                        "per_day": dg.MetadataValue.md(md_table(_days_table(month_outcomes))),
                    },
                    partition_key=partition_key,
                )
        table = _days_table(outcomes)
        failing = table.filter(pl.col("nulls") > 0)
        return dg.MaterializeResult(
            metadata={
                "warmup_bars": warmup_bars(specs),
                "days_warm": int(table["warm"].sum()),
                "days_warming_up": table.filter(~pl.col("warm") & (pl.col("skipped") == "")).height,
                "days_skipped": table.filter(pl.col("skipped") != "").height,
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=WARMUP_CHECK,
                    passed=failing.is_empty(),
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "warm_days": int(table["warm"].sum()),
                        "nulls_after_warmup": int(table["nulls"].sum()),
                        "failures": dg.MetadataValue.md(md_table(failing)),
                    },
                )
            ],
        )

    return features


feature_assets = [_features_asset(timeframe) for timeframe in feature_set.timeframes]
