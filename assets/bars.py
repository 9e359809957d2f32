"""Bars of every timeframe, each from its usual source, with their checks."""

import dagster as dg
import polars as pl

from assets.keys import bars_key
from assets.markdown import md_table
from assets.market_data import candles_1m
from assets.partitions import candle_backfill_policy, candle_partitions, is_top_up, symbol_months
from candlestack.bars import BarBuilder, outcomes_frame
from candlestack.resample import BAR_TIMEFRAMES, SOURCE_TIMEFRAME
from resources import CandleSourceResource, LakeResource

RECONCILE_CHECK = "reconciles_with_1m"
COMPLETENESS_CHECK = "completeness"


def _bars_asset(timeframe: str) -> dg.AssetsDefinition:
    source = SOURCE_TIMEFRAME[timeframe]
    upstream = candles_1m.key if source == "1m" else bars_key(source)
    key = bars_key(timeframe)

    @dg.asset(
        key=key,
        deps=[upstream],
        partitions_def=candle_partitions,
        backfill_policy=candle_backfill_policy,
        group_name="bars",
        kinds={"parquet", "polars"},
        description=f"{timeframe} OHLCV bars from {source}: UTC-aligned, labelled by open "
        "time, closed periods only; exact volume; n_source, n_imputed, n_zero_volume, complete "
        "(every minute real); one file per "
        "symbol-month. A day whose 1-minute candles fail the gaps or OHLC rules gets no bars; "
        "the other days of its month do.",
        check_specs=[
            dg.AssetCheckSpec(
                RECONCILE_CHECK,
                asset=key,
                blocking=True,
                description="Stored bars equal bars built straight from the 1-minute "
                "candles, bit for bit (first open, max high, min low, last close, volume).",
            ),
            dg.AssetCheckSpec(
                COMPLETENESS_CHECK,
                asset=key,
                description="Share of the closed periods that have a complete bar: every "
                "minute there and real (imputed minutes are not data).",
            ),
        ],
    )
    def bars(
        context: dg.AssetExecutionContext, source: CandleSourceResource, lake: LakeResource
    ) -> dg.MaterializeResult:
        builder = BarBuilder(lake.lake, source.exchange_name(), lake.imputed_max_share)
        outcomes, mismatches = [], []
        for symbol_key, months in symbol_months(context.partition_keys).items():
            for month, partition_key in sorted(months.items()):
                month_outcomes = builder.build(
                    timeframe, symbol_key, month, reuse_unchanged=is_top_up(context)
                )
                outcomes += month_outcomes
                mismatches += [
                    {"date": str(o.day), "symbol": symbol_key, "why": o.mismatch}
                    for o in month_outcomes
                    if o.mismatch
                ]
                table = outcomes_frame(month_outcomes)
                context.add_asset_metadata(
                    {
                        "bars": int(table["bars"].sum()),
                        "expected": int(table["expected"].sum()),
                        "complete": int(table["complete"].sum()),
                        "imputed_minutes": sum(o.imputed_minutes for o in month_outcomes),
                        "zero_volume_minutes": sum(o.zero_volume_minutes for o in month_outcomes),
                        "days_skipped": table.filter(pl.col("skipped") != "").height,
                        "path": dg.MetadataValue.path(str(month_outcomes[0].path))
                        if month_outcomes
                        else "",
                        "per_day": dg.MetadataValue.md(md_table(table.drop("symbol"))),
                    },
                    partition_key=partition_key,
                )
        table = outcomes_frame(outcomes)
        expected = int(table["expected"].sum())
        share = int(table["complete"].sum()) / expected if expected else 1.0
        skipped = table.filter(pl.col("skipped") != "")
        return dg.MaterializeResult(
            metadata={"bars_written": int(table["bars"].sum()), "days_skipped": skipped.height},
            check_results=[
                dg.AssetCheckResult(
                    check_name=RECONCILE_CHECK,
                    passed=not mismatches,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "days_checked": len(outcomes),
                        "days_failed": len(mismatches),
                        "failures": dg.MetadataValue.md(md_table(pl.DataFrame(mismatches))),
                    },
                ),
                dg.AssetCheckResult(
                    check_name=COMPLETENESS_CHECK,
                    passed=share == 1.0,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "complete_share": share,
                        "days_without_bars": dg.MetadataValue.md(
                            md_table(skipped.select("date", "symbol", "skipped"))
                        ),
                    },
                ),
            ],
        )

    return bars


bar_assets = [_bars_asset(timeframe) for timeframe in BAR_TIMEFRAMES]
