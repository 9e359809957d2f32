"""Quality rules behind the asset checks: pure functions over what the lake holds."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

import polars as pl

from candlestack.errors import LakeError
from candlestack.lake import LakePath, scan_parquet
from candlestack.schema import DAY_MS, MINUTE_MS, MINUTES_PER_DAY

# Month files read back per query: all of a range in one query held every candle of it in
# memory at once (+120 MiB for a year of one symbol); four month files per query still made
# ingest's peak 17 % higher at 365 days than at 30, one file 5 % (bench/scale.py).
SANITY_BATCH_FILES = 1


def _ohlc_rules(day_start_ms: pl.Expr) -> dict[str, pl.Expr]:
    """Each OHLC sanity rule as a count of breaking rows (per group, in a group_by)."""
    ts = pl.col("ts").dt.epoch("ms")
    body_low = pl.min_horizontal("open", "close")
    body_high = pl.max_horizontal("open", "close")
    rules = {
        "non_finite": pl.any_horizontal(
            ~pl.col(c).is_finite() | pl.col(c).is_null()
            for c in ("open", "high", "low", "close", "volume")
        ),
        "low_above_body": pl.col("low") > body_low,
        "high_below_body": pl.col("high") < body_high,
        "negative_volume": pl.col("volume") < 0,
        "duplicate_ts": ts.is_duplicated(),
        "not_increasing": ts.diff() <= 0,
        "not_on_minute": ts % MINUTE_MS != 0,
        "outside_day": ~ts.is_between(day_start_ms, day_start_ms + DAY_MS, closed="left"),
    }
    return {name: rule.fill_null(False).sum().alias(name) for name, rule in rules.items()}


def ohlc_violations_by_day(candles: pl.DataFrame) -> dict[date, dict[str, int]]:
    """The rules each UTC day of a month's stored candles breaks, and how often: one query,
    not one per day."""
    day = pl.col("ts").dt.date()
    rules = _ohlc_rules(day.cast(pl.Datetime("ms")).dt.epoch("ms").first())
    counts = candles.group_by(day.alias("date")).agg(rules.values())
    return {
        row.pop("date"): {rule: count for rule, count in row.items() if count}
        for row in counts.iter_rows(named=True)
    }


def ohlc_violations(candles: pl.DataFrame, day_start_ms: int) -> dict[str, int]:
    """Count of rows breaking each OHLC sanity rule in one day's stored candles."""
    counts = candles.select(_ohlc_rules(pl.lit(day_start_ms)).values())
    return {name: int(value) for name, value in counts.row(0, named=True).items()}


def gap_failure(report: dict, imputed_max_share: float) -> str | None:
    """Why a partition fails the gaps check, or None when it passes."""
    reasons = []
    if report["missing"]:
        reasons.append(f"{report['missing']} minutes still missing")
    # A share of the whole day, open or closed: two imputed minutes among the open day's
    # first hundred would otherwise block its bars (and the dry-run) until noon, though the
    # day passes once closed.
    share = report["imputed"] / MINUTES_PER_DAY
    if share > imputed_max_share:
        reasons.append(f"imputed share {share:.2%} > {imputed_max_share:.2%}")
    return "; ".join(reasons) or None


def zero_volume_share(report: dict) -> float | None:
    """Of a day's real minutes, the share that traded nothing; None where the report
    predates the figure or the day has no real minute."""
    real, zero = report.get("real"), report.get("zero_volume")
    return zero / real if real and zero is not None else None


def zero_volume_failures(
    partitions: Iterable[tuple[str, date, dict]], max_share: float
) -> pl.DataFrame:
    """One row per (symbol, day, report) whose real minutes traded nothing more often than
    `max_share`: flat, volume-0 candles an exchange prints while nobody trades."""
    rows = [
        {"date": str(day), "symbol": symbol, "zero_volume_share": share, "real": report["real"]}
        for symbol, day, report in partitions
        if (share := zero_volume_share(report)) is not None and share > max_share
    ]
    return pl.DataFrame(
        rows,
        schema={
            "date": pl.String,
            "symbol": pl.String,
            "zero_volume_share": pl.Float64,
            "real": pl.Int64,
        },
    )


def quality(report: dict) -> str:
    """complete, imputed or missing: how a partition shows on the coverage grid."""
    if report["missing"]:
        return "missing"
    if report["imputed"]:
        return "imputed"
    return "complete"


def _gap_summary(gaps: pl.DataFrame, limit: int = 5) -> str:
    return ", ".join(
        f"{r['gap_start']:%Y-%m-%d %H:%M}-{r['gap_end']:%H:%M} ({r['minutes']})"
        for r in gaps.head(limit).iter_rows(named=True)
    )


def gap_failures(
    partitions: Iterable[tuple[str, date, dict, pl.DataFrame]], imputed_max_share: float
) -> pl.DataFrame:
    """One row per (symbol, day, report, gaps) failing the gaps check: why, and its first gaps."""
    rows = [
        {"date": str(day), "symbol": symbol, "why": why, "gaps (from-to minutes)": _gap_summary(g)}
        for symbol, day, report, g in partitions
        if (why := gap_failure(report, imputed_max_share))
    ]
    return pl.DataFrame(rows, schema=["date", "symbol", "why", "gaps (from-to minutes)"])


def sanity_failures(files: Iterable[tuple[str, date, LakePath]]) -> pl.DataFrame:
    """One row per (symbol, day) of the stored month files (symbol, month, path) breaking
    an OHLC sanity rule, or holding rows outside the file's month.

    One month file is read back per query: memory does not grow with the range.
    """
    schema = ["date", "symbol", "violations"]
    day = pl.col("ts").dt.date()
    rules = _ohlc_rules(day.cast(pl.Datetime("ms")).dt.epoch("ms").first())
    rules["outside_month"] = (
        (pl.col("ts").dt.truncate("1mo").dt.date() != pl.col("month").first())
        .sum()
        .alias("outside_month")
    )
    files = list(files)
    rows = []
    for first in range(0, len(files), SANITY_BATCH_FILES):
        batch = files[first : first + SANITY_BATCH_FILES]
        index = pl.DataFrame(
            [
                {"symbol": symbol, "month": month, "path": str(path)}
                for symbol, month, path in batch
            ],
            schema={"symbol": pl.String, "month": pl.Date, "path": pl.String},
        )
        try:
            counts = (
                scan_parquet([path for _, _, path in batch], include_file_paths="path")
                .join(index.lazy(), on="path", maintain_order="left")
                # Per file: a stray row of another month is charged to its own file, never
                # merged with the day of the file that rightly holds it.
                .group_by("path", "symbol", day.alias("date"), maintain_order=True)
                .agg(rules.values())
                .collect()
            )
        except pl.exceptions.PolarsError as exc:
            # polars' own message does not say which file it could not read.
            files_read = ", ".join(str(path) for _, _, path in batch)
            raise LakeError(f"cannot read {files_read} back: {exc}") from exc
        for row in counts.iter_rows(named=True):
            broken = {rule: row[rule] for rule in rules if row[rule]}
            if broken:
                rows.append(
                    {"date": str(row["date"]), "symbol": row["symbol"], "violations": str(broken)}
                )
    return pl.DataFrame(rows, schema=schema)
