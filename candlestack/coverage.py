"""The symbol x day coverage grid, as a frame and as markdown a person can scan."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from candlestack.config import symbol_key

# Imputed days are graded by the share of their minutes imputed: a day of 1,022 invented
# minutes must not look like a day of 3.
IMPUTED_GRADES = (("imputed <1%", 0.01), ("imputed <10%", 0.10), ("imputed >=10%", None))
STATUS_MARK = {
    "complete": "█",
    "imputed <1%": "▓",
    "imputed <10%": "▒",
    "imputed >=10%": "░",
    "missing": "×",
    "open": "○",
    "absent": "·",
}
STATUS_CELL = {
    "complete": "✅ complete",
    "imputed <1%": "🟨 imputed",
    "imputed <10%": "🟧 imputed",
    "imputed >=10%": "🟥 imputed",
    "missing": "❌ missing",
    "open": "⏳ open",
    "absent": "· absent",
}


def coverage_frame(reports: pl.DataFrame, symbols: Sequence[str]) -> pl.DataFrame:
    """One row per configured symbol and day from the first to the last day in the lake.

    status: complete (every minute real), imputed <1% / <10% / >=10% (some flat candles,
    none missing; graded by imputed share), missing (minutes with no candle at all), open
    (today, still filling), absent (no file). zero_volume_share: of the real minutes, those
    that traded nothing (null where the day's report predates the figure).
    """
    keys = [symbol_key(s) for s in symbols]
    schema = {
        "symbol": pl.String,
        "date": pl.Date,
        "status": pl.String,
        "imputed": pl.Int64,
        "missing": pl.Int64,
        "imputed_share": pl.Float64,
        "zero_volume_share": pl.Float64,
    }
    if reports.is_empty():
        return pl.DataFrame(schema=schema)
    days = pl.date_range(reports["date"].min(), reports["date"].max(), eager=True).alias("date")
    grid = pl.DataFrame({"symbol": keys}).join(days.to_frame(), how="cross")
    imputed_share = pl.col("imputed") / pl.col("expected")
    graded = pl.when(imputed_share < IMPUTED_GRADES[0][1]).then(pl.lit(IMPUTED_GRADES[0][0]))
    graded = graded.when(imputed_share < IMPUTED_GRADES[1][1]).then(pl.lit(IMPUTED_GRADES[1][0]))
    status = (
        pl.when(pl.col("rows").is_null())
        .then(pl.lit("absent"))
        .when(~pl.col("day_closed"))
        .then(pl.lit("open"))
        .when(pl.col("missing") > 0)
        .then(pl.lit("missing"))
        .when(pl.col("imputed") == 0)
        .then(pl.lit("complete"))
    )
    status = status.otherwise(graded.otherwise(pl.lit(IMPUTED_GRADES[2][0])))
    real = pl.col("rows") - pl.col("imputed")
    return (
        grid.join(reports, on=["symbol", "date"], how="left")
        .with_columns(
            status=status,
            imputed_share=imputed_share,
            zero_volume_share=pl.when(real > 0).then(pl.col("zero_volume") / real),
        )
        .select(list(schema))
        .sort("date", "symbol")
    )


def recent_grid(coverage: pl.DataFrame, days: int = 31) -> str:
    """Markdown table: latest days as rows, symbols as columns."""
    if coverage.is_empty():
        return "_the lake holds no candles yet_"
    imputed = pl.col("status").str.starts_with("imputed")
    cell = (
        pl.col("status").replace_strict(STATUS_CELL)
        + pl.when(imputed)
        .then(pl.format(" {} % ({} min)", (pl.col("imputed_share") * 100).round(1), "imputed"))
        .when(pl.col("status") == "missing")
        .then(pl.format(" ({} min)", "missing"))
        .otherwise(pl.lit(""))
        + pl.when(pl.col("zero_volume_share") > 0)
        .then(pl.format(", {} % zero-volume", (pl.col("zero_volume_share") * 100).round(1)))
        .otherwise(pl.lit(""))
    )
    wide = (
        coverage.with_columns(cell=cell)
        .pivot(on="symbol", index="date", values="cell")
        .sort("date", descending=True)
        .head(days)
    )
    header = "| " + " | ".join(wide.columns) + " |\n|" + "---|" * wide.width + "\n"
    body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in wide.iter_rows())
    return header + body


def month_strips(coverage: pl.DataFrame) -> str:
    """Every day of every symbol, one character a day, one line per symbol and month."""
    if coverage.is_empty():
        return "_the lake holds no candles yet_"
    legend = "  ".join(f"{mark} {name}" for name, mark in STATUS_MARK.items())
    lines = [legend, ""]
    strips = (
        coverage.with_columns(
            month=pl.col("date").dt.strftime("%Y-%m"),
            mark=pl.col("status").replace_strict(STATUS_MARK),
        )
        .group_by("symbol", "month", maintain_order=True)
        .agg(pl.col("mark").str.join(""), first_day=pl.col("date").dt.day().min())
        .sort("symbol", "month")
    )
    for row in strips.iter_rows(named=True):
        # Pad so day 1 lines up in every month.
        lines.append(
            f"{row['symbol']:<14} {row['month']} {' ' * (row['first_day'] - 1)}{row['mark']}"
        )
    return "```\n" + "\n".join(lines) + "\n```"
