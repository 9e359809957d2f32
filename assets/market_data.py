"""1-minute candles, market rules, coverage and the DuckDB catalog, with their checks."""

import time
from datetime import UTC, date, datetime

import dagster as dg
import polars as pl

from assets.markdown import md_table
from assets.partitions import (
    candle_backfill_policy,
    candle_partitions,
    daily_partitions,
    is_top_up,
    symbol_months,
)
from candlestack.checks import gap_failure, gap_failures, quality, sanity_failures
from candlestack.config import load_settings, symbol_key
from candlestack.coverage import coverage_frame, month_strips, recent_grid
from candlestack.errors import SourceError
from candlestack.feature_store import load_feature_set
from candlestack.ingest import Ingestor, PartitionOutcome
from candlestack.lake import month_days, write_parquet_atomic
from candlestack.resample import BAR_TIMEFRAMES
from candlestack.schema import MINUTE_MS
from candlestack.validate import describe_rejections
from resources import CandleSourceResource, LakeResource

GAPS_CHECK = "gaps"
OHLC_CHECK = "ohlc_sanity"
# Every step that calls the exchange takes a slot of this pool, so the instance's pool limit
# (`concurrency: pools:` in dagster.yaml) caps requests to one exchange across all runs.
EXCHANGE_POOL = f"exchange-{load_settings().exchange_id}"


def _gap_ranges(gaps: pl.DataFrame) -> pl.DataFrame:
    return gaps.select(
        pl.col("gap_start").dt.strftime("%Y-%m-%d %H:%M").alias("from"),
        pl.col("gap_end").dt.strftime("%H:%M").alias("to"),
        "minutes",
        "refetched",
        "imputed",
        "missing",
    )


def _days_table(outcomes: list[PartitionOutcome], failures: dict[date, str | None]) -> str:
    rows = [
        {
            "date": str(o.day),
            "rows": o.report["rows"],
            "missing found": o.report["missing_found"],
            "re-fetched": o.report["refetched"],
            "imputed": o.report["imputed"],
            "still missing": o.report["missing"],
            "rejected": o.report["rejected"],
            "quality": "open" if not o.report["day_closed"] else quality(o.report),
            "gaps check": f"failed: {failures[o.day]}" if failures[o.day] else "passed",
        }
        for o in outcomes
    ]
    return md_table(pl.DataFrame(rows))


def _month_metadata(outcomes: list[PartitionOutcome], imputed_max_share: float) -> dict:
    """A month partition's figures, with its per-day table and the gap ranges of its days."""
    failures = {o.day: gap_failure(o.report, imputed_max_share) for o in outcomes}
    failed = [f"{day}: {why}" for day, why in failures.items() if why]
    qualities = [quality(o.report) for o in outcomes]
    total = {
        field: sum(o.report[field] for o in outcomes)
        for field in ("rows", "missing_found", "refetched", "imputed", "missing", "rejected")
    }
    firsts = [str(o.report["first_ts"]) for o in outcomes if o.report["first_ts"] is not None]
    lasts = [str(o.report["last_ts"]) for o in outcomes if o.report["last_ts"] is not None]
    metadata = {
        "days": len(outcomes),
        **{k: v for k, v in total.items() if k != "rejected"},
        "rejected_rows": total["rejected"],
        "first_ts": min(firsts, default="None"),
        "last_ts": max(lasts, default="None"),
        "content_hash": outcomes[0].write.content_hash if len(outcomes) == 1 else "per day",
        "source": outcomes[0].report["source"],
        # The month's worst day: missing over imputed over complete.
        "quality": next((q for q in ("missing", "imputed") if q in qualities), "complete"),
        "gaps_check": f"failed: {'; '.join(failed)}" if failed else "passed",
        "days_failed": len(failed),
        "path": dg.MetadataValue.path(str(outcomes[0].path)),
        "per_day": dg.MetadataValue.md(_days_table(outcomes, failures)),
    }
    gaps = pl.concat([o.gaps for o in outcomes])
    if gaps.height:
        metadata["gap_ranges"] = dg.MetadataValue.md(md_table(_gap_ranges(gaps)))
    rejected = pl.concat([o.rejected for o in outcomes])
    if rejected.height:
        metadata["rejected_examples"] = describe_rejections(rejected)
    return metadata


@dg.asset(
    partitions_def=candle_partitions,
    backfill_policy=candle_backfill_policy,
    group_name="market_data",
    kinds={"parquet", "polars"},
    pool=EXCHANGE_POOL,
    check_specs=[
        # Not blocking the run: a month with one failing day still feeds the bars of its other
        # days. The block is per day, downstream: a failing day gets no bars or features.
        dg.AssetCheckSpec(
            GAPS_CHECK,
            asset="candles_1m",
            description="No unresolved missing minutes; imputed share within the threshold, "
            "per day. A failing day gets no bars or features; the month's others do.",
        ),
        dg.AssetCheckSpec(
            OHLC_CHECK,
            asset="candles_1m",
            description="low <= open, close <= high; volume >= 0; unique, increasing, "
            "minute-aligned timestamps inside the month, per day (read back from the lake).",
        ),
    ],
)
def candles_1m(
    context: dg.AssetExecutionContext, source: CandleSourceResource, lake: LakeResource
) -> dg.MaterializeResult:
    """Closed 1-minute OHLCV candles per UTC month and symbol (one file each), gaps
    re-requested and imputed (flat at the previous close, volume 0, `imputed = true`), with a
    per-day table. A range backfill is one run."""
    settings = load_settings()
    started = time.perf_counter()
    ingestor = Ingestor(source.open(), lake.lake, source.refetch_attempts)
    outcomes: list[PartitionOutcome] = []
    months_read_back = []
    for key, months in symbol_months(context.partition_keys).items():
        symbol = settings.symbol_by_key[key]
        for month, partition_key in sorted(months.items()):
            wanted = [d for d in month_days(month) if d >= settings.start_date]
            days = ingestor.days_to_ingest(symbol, wanted)
            if not days:
                raise dg.Failure(
                    f"{partition_key}: no day of the month to ingest (none has a closed minute "
                    f"yet, is on or after CANDLESTACK_START_DATE {settings.start_date}, or is "
                    "in the source's recording)"
                )
            try:
                month_outcomes = ingestor.ingest(symbol, days, keep_closed=is_top_up(context))
            except SourceError as exc:
                raise dg.Failure(
                    f"{symbol} {month:%Y-%m}: {exc}. Months written before the failure are "
                    "kept; re-running the range is safe."
                ) from exc
            outcomes.extend(month_outcomes)
            months_read_back.append((key, month, month_outcomes[0].path))
            context.add_asset_metadata(
                _month_metadata(month_outcomes, settings.imputed_max_share),
                partition_key=partition_key,
            )
    # Named by symbol key, as the partitions and the sanity check name them.
    gaps_failed = gap_failures(
        ((symbol_key(o.symbol), o.day, o.report, o.gaps) for o in outcomes),
        settings.imputed_max_share,
    )
    # Sanity is checked on what the lake holds, read back, not on what was meant to be written.
    sanity_failed = sanity_failures(months_read_back)
    elapsed = time.perf_counter() - started
    rows = sum(o.report["rows"] for o in outcomes)
    context.log.info(
        "%d days in %d partitions, %d rows in %.1f s (%.0f candles/s), %d gap failures, "
        "%d sanity failures",
        len(outcomes),
        len(months_read_back),
        rows,
        elapsed,
        rows / elapsed if elapsed else 0.0,
        gaps_failed.height,
        sanity_failed.height,
    )
    imputed = sum(o.report["imputed"] for o in outcomes)
    expected = sum(o.report["expected"] for o in outcomes)
    return dg.MaterializeResult(
        check_results=[
            _blocking_result(
                GAPS_CHECK,
                gaps_failed,
                len(outcomes),
                missing_minutes=sum(o.report["missing"] for o in outcomes),
                imputed_minutes=imputed,
                imputed_share=imputed / expected if expected else 0.0,
                imputed_max_share=settings.imputed_max_share,
            ),
            _blocking_result(OHLC_CHECK, sanity_failed, len(outcomes)),
        ],
    )


def _blocking_result(
    name: str, failures: pl.DataFrame, checked: int, **figures: float
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=failures.is_empty(),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "days_checked": checked,
            "days_failed": failures.height,
            **figures,
            "failures": dg.MetadataValue.md(md_table(failures)),
        },
    )


@dg.asset_check(
    asset=candles_1m,
    name="freshness",
    description="The newest candle of the open UTC day is no older than the allowed lag.",
)
def candles_freshness(lake: LakeResource, source: CandleSourceResource) -> dg.AssetCheckResult:
    settings = load_settings()
    now_ms = int(time.time() * 1000)
    today = datetime.fromtimestamp(now_ms / 1000, UTC).date()
    exchange = source.open().exchange
    rows = []
    for symbol in settings.symbols:
        stored = lake.lake.read_day_report(exchange, symbol_key(symbol), today)
        newest = stored[0]["last_ts"] if stored else None
        lag = (
            (now_ms - int(datetime.fromisoformat(newest).timestamp() * 1000)) / MINUTE_MS - 1
            if newest
            else None
        )
        rows.append({"symbol": symbol, "newest_open": newest or "none today", "lag_minutes": lag})
    lags = [r["lag_minutes"] for r in rows]
    stale = [
        r
        for r in rows
        if r["lag_minutes"] is None or r["lag_minutes"] > settings.freshness_lag_minutes
    ]
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "max_lag_minutes": max((x for x in lags if x is not None), default=-1.0),
            "allowed_lag_minutes": settings.freshness_lag_minutes,
            "stale_symbols": len(stale),
            "newest_candles": dg.MetadataValue.md(md_table(pl.DataFrame(rows))),
        },
    )


@dg.asset(
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="market_data",
    kinds={"parquet"},
    pool=EXCHANGE_POOL,
)
def markets(
    context: dg.AssetExecutionContext, source: CandleSourceResource, lake: LakeResource
) -> dg.MaterializeResult:
    """Market rules (lot step, price tick, min/max amount, min cost, fees) per exchange and UTC
    day. A day's snapshot is taken once: a past day already stored is never overwritten with
    later rules; a past day without one gets today's rules, marked by `snapshot_ts`."""
    client = source.open()
    snapshot_ts = datetime.now(UTC)
    rules = client.load_markets().with_columns(pl.lit(snapshot_ts).alias("snapshot_ts"))
    written, kept = [], []
    for key in context.partition_keys:
        day = date.fromisoformat(key)
        path = lake.lake.markets_path(client.exchange, day)
        if path.exists() and day < snapshot_ts.date():
            kept.append(key)
            continue
        write_parquet_atomic(path, rules.to_arrow(), {})
        written.append(key)
    return dg.MaterializeResult(
        metadata={
            "exchange": client.exchange,
            "markets": rules.height,
            "days_written": len(written),
            "days_kept": len(kept),
            "snapshot_ts": snapshot_ts.isoformat(),
            "sample": dg.MetadataValue.md(
                md_table(rules.drop("snapshot_ts", "market_id", "active"), limit=15)
            ),
        }
    )


@dg.asset(deps=[candles_1m], group_name="market_data", kinds={"polars"})
def candle_coverage(source: CandleSourceResource, lake: LakeResource) -> dg.MaterializeResult:
    """The symbol x day grid of the lake: complete, imputed, missing minutes, or absent.

    Dagster records checks of a single-run range without a partition; this grid (and each
    partition's own metadata) is where a person sees quality per symbol and day."""
    coverage = coverage_frame(lake.lake.reports(source.open().exchange), load_settings().symbols)
    counts = dict(coverage.group_by("status").len().iter_rows())
    return dg.MaterializeResult(
        metadata={
            "recent_days": dg.MetadataValue.md(recent_grid(coverage)),
            "all_days": dg.MetadataValue.md(month_strips(coverage)),
            **{
                f"partitions_{s}": counts.get(s, 0)
                for s in ("complete", "imputed", "missing", "open", "absent")
            },
        }
    )


@dg.asset(
    deps=[
        candles_1m,
        markets,
        *(dg.AssetKey(f"bars_{tf}") for tf in BAR_TIMEFRAMES),
        *(
            dg.AssetKey(f"features_{tf}")
            for tf in load_feature_set(load_settings().features).timeframes
        ),
    ],
    group_name="market_data",
    kinds={"duckdb"},
)
def catalog(lake: LakeResource) -> dg.MaterializeResult:
    """DuckDB views (ohlcv, bars, features, gaps, partitions, markets) over the lake, rebuilt
    atomically."""
    counts = lake.rebuild_catalog()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(lake.catalog_path),
            **{f"{view}_rows": count for view, count in counts.items()},
            "try": dg.MetadataValue.md(
                '```\n.venv/bin/python -c "from candlestack.catalog import connect; print(connect('
                f"'{lake.catalog_path}', '{lake.root}').sql("
                "'SELECT symbol, date, minutes, imputed FROM gaps ORDER BY minutes DESC'))\"\n```"
            ),
        }
    )
