"""1-minute candles, market rules, coverage and the DuckDB catalog, with their checks."""

import time
from collections.abc import Mapping
from datetime import UTC, date, datetime

import dagster as dg
import polars as pl

from assets import partitions
from assets.keys import CANDLES_KEY, bars_key, features_key
from assets.markdown import md_table
from assets.partitions import (
    candle_backfill_policy,
    candle_partitions,
    daily_partitions,
    is_top_up,
    symbol_months,
)
from assets.tags import PARTITION_TAG, RANGE_END_TAG, RANGE_START_TAG
from candlestack.checks import (
    gap_failure,
    gap_failures,
    quality,
    sanity_failures,
    zero_volume_failures,
    zero_volume_share,
)
from candlestack.config import symbol_key
from candlestack.coverage import IMPUTED_GRADES, coverage_frame, month_strips, recent_grid
from candlestack.errors import SourceError
from candlestack.feature_store import load_feature_set
from candlestack.ingest import Ingestor, PartitionOutcome
from candlestack.lake import month_days, month_of, write_parquet_atomic
from candlestack.resample import BAR_TIMEFRAMES
from candlestack.schema import DAY_MS, MINUTE_MS
from candlestack.validate import describe_rejections
from resources import CandleSourceResource, LakeResource
from resources.deployment import settings

GAPS_CHECK = "gaps"
OHLC_CHECK = "ohlc_sanity"
REVISIONS_CHECK = "revisions"
ZERO_VOLUME_CHECK = "zero_volume"
# Figures of a day's report summed over a month; reports stored before a figure existed
# count it as 0.
_MONTH_TOTALS = (
    "rows",
    "real",
    "missing_found",
    "refetched",
    "imputed",
    "missing",
    "zero_volume",
    "kept",
    "rejected",
)
# Every step that calls the exchange takes a slot of this pool, so the instance's pool limit
# (`concurrency: pools:` in dagster.yaml) caps requests to one exchange across all runs.
EXCHANGE_POOL = f"exchange-{settings.exchange_id}"


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
            "kept as stored": o.report.get("kept", 0),
            "revised": o.revisions.height,
            "zero-volume": o.report.get("zero_volume"),
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
    total = {field: sum(o.report.get(field) or 0 for o in outcomes) for field in _MONTH_TOTALS}
    firsts = [str(o.report["first_ts"]) for o in outcomes if o.report["first_ts"] is not None]
    lasts = [str(o.report["last_ts"]) for o in outcomes if o.report["last_ts"] is not None]
    metadata = {
        "days": len(outcomes),
        **{k: v for k, v in total.items() if k != "rejected"},
        "zero_volume_share": total["zero_volume"] / total["real"] if total["real"] else 0.0,
        "revised": sum(o.revisions.height for o in outcomes),
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
    revisions = pl.concat([o.revisions for o in outcomes])
    if revisions.height:
        metadata["revisions"] = dg.MetadataValue.md(md_table(_revision_rows(revisions)))
    return metadata


def _revision_rows(revisions: pl.DataFrame) -> pl.DataFrame:
    return revisions.select(
        pl.col("ts").dt.strftime("%Y-%m-%d %H:%M"),
        *(
            pl.format("{} → {}", f"old_{c}", c).alias(c)
            for c in ("open", "high", "low", "close", "volume")
        ),
    )


@dg.asset(
    key=CANDLES_KEY,
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
            asset=CANDLES_KEY,
            description="No unresolved missing minutes; imputed share within the threshold, "
            "per day. A failing day gets no bars or features; the month's others do.",
        ),
        dg.AssetCheckSpec(
            OHLC_CHECK,
            asset=CANDLES_KEY,
            description="low <= open, close <= high; volume >= 0; unique, increasing, "
            "minute-aligned timestamps inside the month, per day (read back from the lake).",
        ),
        dg.AssetCheckSpec(
            REVISIONS_CHECK,
            asset=CANDLES_KEY,
            description="No stored real candle came back from the source with other values "
            "(a revision is written, and old and new are kept in the month file's revisions "
            "table and the catalog's `revisions` view).",
        ),
        dg.AssetCheckSpec(
            ZERO_VOLUME_CHECK,
            asset=CANDLES_KEY,
            description="Of each day's real minutes, the share that traded nothing is within "
            "CANDLESTACK_ZERO_VOLUME_MAX_SHARE.",
        ),
    ],
)
def candles_1m(
    context: dg.AssetExecutionContext, source: CandleSourceResource, lake: LakeResource
) -> dg.MaterializeResult:
    """Closed 1-minute OHLCV candles per UTC month and symbol (one file each), gaps
    re-requested and imputed (flat at the previous close, volume 0, `imputed = true`), with a
    per-day table. A range backfill is one run."""
    started = time.perf_counter()
    ingestor = Ingestor(source.open(), lake.lake, source.refetch_attempts)
    outcomes: list[PartitionOutcome] = []
    months_read_back = []
    for key, months in symbol_months(context.partition_keys).items():
        symbol = partitions.symbol_by_key[key]
        for month, partition_key in sorted(months.items()):
            wanted = [d for d in month_days(month) if d >= partitions.start_date]
            days = ingestor.days_to_ingest(symbol, wanted)
            if not days:
                raise dg.Failure(
                    f"{partition_key}: no day of the month to ingest (none has a closed minute "
                    f"yet, is on or after CANDLESTACK_START_DATE {partitions.start_date}, or is "
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
                _month_metadata(month_outcomes, lake.imputed_max_share),
                partition_key=partition_key,
            )
    # Named by symbol key, as the partitions and the sanity check name them.
    gaps_failed = gap_failures(
        ((symbol_key(o.symbol), o.day, o.report, o.gaps) for o in outcomes),
        lake.imputed_max_share,
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
                imputed_max_share=lake.imputed_max_share,
            ),
            _blocking_result(OHLC_CHECK, sanity_failed, len(outcomes)),
            _revisions_result(outcomes),
            _zero_volume_result(outcomes, lake.zero_volume_max_share),
        ],
    )


def _revisions_result(outcomes: list[PartitionOutcome]) -> dg.AssetCheckResult:
    revised = [
        _revision_rows(o.revisions).select(pl.lit(symbol_key(o.symbol)).alias("symbol"), pl.all())
        for o in outcomes
        if o.revisions.height
    ]
    rows = pl.concat(revised) if revised else pl.DataFrame()
    return dg.AssetCheckResult(
        check_name=REVISIONS_CHECK,
        passed=not revised,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "days_checked": len(outcomes),
            "days_revised": len(revised),
            "candles_revised": rows.height,
            "revisions": dg.MetadataValue.md(md_table(rows)),
        },
    )


def _zero_volume_result(outcomes: list[PartitionOutcome], max_share: float) -> dg.AssetCheckResult:
    failures = zero_volume_failures(
        ((symbol_key(o.symbol), o.day, o.report) for o in outcomes), max_share
    )
    shares = [s for o in outcomes if (s := zero_volume_share(o.report)) is not None]
    return dg.AssetCheckResult(
        check_name=ZERO_VOLUME_CHECK,
        passed=failures.is_empty(),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "days_checked": len(outcomes),
            "days_failed": failures.height,
            "zero_volume_max_share": max_share,
            "zero_volume_share_max": max(shares, default=0.0),
            "failures": dg.MetadataValue.md(md_table(failures)),
        },
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


def _run_months(tags: Mapping[str, str]) -> tuple[date, date] | None:
    """The first and last month of the candle partitions a run targets; None for a run of
    no partition (a check run on its own)."""
    keys = [tags.get(t) for t in (RANGE_START_TAG, RANGE_END_TAG)]
    if not all(keys):
        keys = [tags.get(PARTITION_TAG)] * 2
    if not all(keys):
        return None
    months = sorted(month_of(k.split("|")[0]) for k in keys)
    return months[0], months[-1]


@dg.asset_check(
    asset=candles_1m,
    name="freshness",
    description="The newest closed minute of the open UTC day is stored, within the allowed "
    "lag. Not applicable (passed, says so) to a run whose partitions do not hold today.",
)
def candles_freshness(
    context: dg.AssetCheckExecutionContext, lake: LakeResource, source: CandleSourceResource
) -> dg.AssetCheckResult:
    client = source.open()
    closed_end = client.now_ms() // MINUTE_MS * MINUTE_MS
    today = datetime.fromtimestamp(closed_end / 1000, UTC).date()
    months = _run_months(context.run.tags)
    if months is not None and not months[0] <= month_of(today) <= months[1]:
        return dg.AssetCheckResult(
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description="Not applicable: the run's partitions do not hold today.",
            metadata={"applicable": False, "months": f"{months[0]:%Y-%m}..{months[1]:%Y-%m}"},
        )
    day_start = closed_end // DAY_MS * DAY_MS
    rows = []
    for symbol in partitions.symbols:
        stored = lake.lake.read_day_report(client.exchange, symbol_key(symbol), today)
        newest = stored[0]["last_ts"] if stored else None
        stored_end = (
            int(datetime.fromisoformat(newest).timestamp() * 1000) + MINUTE_MS
            if newest
            else day_start
        )
        # Closed minutes of today after the newest stored one: 0 when it is up to date.
        lag = max(0, (closed_end - stored_end) // MINUTE_MS)
        rows.append({"symbol": symbol, "newest_open": newest or "none today", "lag_minutes": lag})
    stale = [r for r in rows if r["lag_minutes"] > lake.freshness_lag_minutes]
    return dg.AssetCheckResult(
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "applicable": True,
            "max_lag_minutes": max(r["lag_minutes"] for r in rows),
            "allowed_lag_minutes": lake.freshness_lag_minutes,
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
    coverage = coverage_frame(lake.lake.reports(source.exchange_name()), partitions.symbols)
    counts = dict(coverage.group_by("status").len().iter_rows())
    imputed = {g: counts.get(g, 0) for g, _ in IMPUTED_GRADES}
    return dg.MaterializeResult(
        metadata={
            "recent_days": dg.MetadataValue.md(recent_grid(coverage)),
            "all_days": dg.MetadataValue.md(month_strips(coverage)),
            **{f"partitions_{s}": counts.get(s, 0) for s in ("complete", "missing", "open")},
            "partitions_imputed": sum(imputed.values()),
            "partitions_imputed_under_1pct": imputed["imputed <1%"],
            "partitions_imputed_under_10pct": imputed["imputed <10%"],
            "partitions_imputed_10pct_or_more": imputed["imputed >=10%"],
            "partitions_absent": counts.get("absent", 0),
            "zero_volume_share_max": coverage["zero_volume_share"].max() or 0.0,
        }
    )


@dg.asset(
    deps=[
        candles_1m,
        markets,
        *(bars_key(tf) for tf in BAR_TIMEFRAMES),
        *(features_key(tf) for tf in load_feature_set(settings.features).timeframes),
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
