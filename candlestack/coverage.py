"""The symbol x day coverage grid, as a frame and as markdown a person can scan."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from candlestack.config import symbol_key

STATUS_MARK = {"complete": "█", "imputed": "▒", "missing": "░", "open": "○", "absent": "·"}
STATUS_CELL = {
    "complete": "✅ complete",
    "imputed": "🟨 imputed",
    "missing": "❌ missing",
    "open": "⏳ open",
    "absent": "· absent",
}


def coverage_frame(reports: pl.DataFrame, symbols: Sequence[str]) -> pl.DataFrame:
    """One row per configured symbol and day from the first to the last day in the lake.

    status: complete (every minute real), imputed (some flat candles, none missing),
    missing (minutes with no candle at all), open (today, still filling), absent (no file).
    """
    keys = [symbol_key(s) for s in symbols]
    if reports.is_empty():
        return pl.DataFrame(
            schema={
                "symbol": pl.String,
                "date": pl.Date,
                "status": pl.String,
                "imputed": pl.Int64,
                "missing": pl.Int64,
            }
        )
    days = pl.date_range(reports["date"].min(), reports["date"].max(), eager=True).alias("date")
    grid = pl.DataFrame({"symbol": keys}).join(days.to_frame(), how="cross")
    status = (
        pl.when(pl.col("rows").is_null())
        .then(pl.lit("absent"))
        .when(~pl.col("day_closed"))
        .then(pl.lit("open"))
        .when(pl.col("missing") > 0)
        .then(pl.lit("missing"))
        .when(pl.col("imputed") > 0)
        .then(pl.lit("imputed"))
        .otherwise(pl.lit("complete"))
    )
    return (
        grid.join(reports, on=["symbol", "date"], how="left")
        .with_columns(status=status)
        .select("symbol", "date", "status", "imputed", "missing")
        .sort("date", "symbol")
    )


def recent_grid(coverage: pl.DataFrame, days: int = 31) -> str:
    """Markdown table: latest days as rows, symbols as columns."""
    if coverage.is_empty():
        return "_the lake holds no candles yet_"
    cell = pl.col("status").replace_strict(STATUS_CELL) + pl.when(
        pl.col("status") == "imputed"
    ).then(pl.format(" ({} min)", "imputed")).when(pl.col("status") == "missing").then(
        pl.format(" ({} min)", "missing")
    ).otherwise(pl.lit(""))
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
