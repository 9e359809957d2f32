"""Metadata a person reads in the UI."""

import polars as pl

MAX_TABLE_ROWS = 40


def _cell(value: object) -> str:
    # A bare "|" (decision keys are strategy|symbol|timeframe|bar) would start a new column.
    return str(value).replace("|", "\\|")


def md_table(frame: pl.DataFrame, limit: int = MAX_TABLE_ROWS) -> str:
    """A markdown table of the first `limit` rows, saying how many more there are."""
    if frame.is_empty():
        return "_none_"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    rows = "".join(
        "| " + " | ".join(_cell(v) for v in row) + " |\n" for row in frame.head(limit).iter_rows()
    )
    more = f"\n_... and {frame.height - limit} more_" if frame.height > limit else ""
    return header + rows + more
