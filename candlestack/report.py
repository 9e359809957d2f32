"""Backtest reports: an equity/drawdown PNG, a markdown image for Dagster, a standalone HTML page.

Everything here is pure: bytes and strings in and out, no files and no global plotting state.
matplotlib is imported inside equity_png so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl

# Enough x-buckets to be finer than the ~700 px plot width; each keeps two points (min and max).
MAX_BUCKETS = 2_000
# 8 x 4.5 inches at 100 dpi: an 800 x 450 px PNG.
FIG_SIZE_IN = (8.0, 4.5)
FIG_DPI = 100
# The HTML page stays readable (and small) for backtests with many trades.
MAX_TRADE_ROWS = 500


def _minmax_downsample(y: np.ndarray, n_buckets: int = MAX_BUCKETS) -> np.ndarray:
    """Sorted indices into y keeping each bucket's min and max, plus the first and last point.

    Buckets are equal runs of consecutive points, so with sorted timestamps they are x-buckets.
    """
    # Done by hand because matplotlib's path simplification only runs at draw time, still pays
    # for converting every point, and plain striding (y[::k]) drops one-minute troughs and spikes.
    n = len(y)
    if n <= 2 * n_buckets:
        return np.arange(n)
    size = -(-n // n_buckets)
    padded = np.pad(y, (0, -n % size), mode="edge").reshape(-1, size)
    starts = np.arange(padded.shape[0]) * size
    # argmin/argmax return the first occurrence, so edge padding never wins over the real point.
    lows = starts + np.argmin(padded, axis=1)
    highs = starts + np.argmax(padded, axis=1)
    return np.unique(np.concatenate(([0, n - 1], lows, highs)))


def _drawdown_pct(equity: np.ndarray) -> np.ndarray:
    """equity / running max - 1, in percent; 0 while the running max is not positive."""
    peak = np.maximum.accumulate(equity)
    ratio = np.divide(equity, peak, out=np.ones_like(equity), where=peak > 0)
    return (ratio - 1.0) * 100.0


def equity_png(
    ts_ms: np.ndarray,
    equity: np.ndarray,
    benchmark: np.ndarray | None = None,
    title: str = "",
) -> bytes:
    """PNG of equity (top, with optional buy-and-hold benchmark in grey) over drawdown % (bottom).

    ts_ms are sorted UTC epoch milliseconds of each bar close; all arrays have the same length.
    Fewer than two points give a "no data" image instead of an error.
    """
    # Object API on an Agg canvas: no pyplot global state, thread-safe, never opens a window.
    from matplotlib import dates as mdates
    from matplotlib import ticker as mticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ts = np.asarray(ts_ms, dtype=np.int64)
    eq = np.asarray(equity, dtype=np.float64)
    bench = None if benchmark is None else np.asarray(benchmark, dtype=np.float64)
    if len(ts) != len(eq) or (bench is not None and len(bench) != len(eq)):
        raise ValueError(
            f"length mismatch: ts_ms={len(ts)}, equity={len(eq)}, "
            f"benchmark={None if bench is None else len(bench)}"
        )

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if len(eq) < 2:
        if title:
            fig.suptitle(title, parse_math=False)
        fig.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="grey")
        return _to_png(fig)

    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    times = ts.astype("datetime64[ms]")

    # Drawdown comes from the full-resolution equity so a one-bar trough is measured exactly.
    drawdown = _drawdown_pct(eq)
    if bench is not None:
        keep = _minmax_downsample(bench)
        top.plot(times[keep], bench[keep], color="grey", linewidth=0.7, label="buy & hold")
    keep = _minmax_downsample(eq)
    top.plot(times[keep], eq[keep], color="tab:blue", linewidth=1.0, label="strategy")
    keep = _minmax_downsample(drawdown)
    bottom.fill_between(times[keep], drawdown[keep], 0.0, color="tab:red", alpha=0.4, lw=0)
    bottom.plot(times[keep], drawdown[keep], color="tab:red", linewidth=0.6)

    if title:
        top.set_title(title, loc="left", parse_math=False)
    top.set_ylabel("equity")
    top.ticklabel_format(axis="y", style="plain", useOffset=False)
    top.grid(alpha=0.3)
    if bench is not None:
        top.legend(loc="upper left", fontsize="small", frameon=False)
    bottom.set_ylabel("drawdown")
    bottom.set_ylim(top=0.0)
    bottom.yaxis.set_major_formatter(mticker.PercentFormatter(xmax=100, decimals=None))
    bottom.grid(alpha=0.3)
    # Explicit UTC so a user's rcParams timezone cannot shift the dates.
    locator = mdates.AutoDateLocator(tz=UTC)
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    bottom.set_xlim(times[0], times[-1])
    return _to_png(fig)


def _to_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: the bytes depend on the inputs, not on the matplotlib version string.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """`![alt](data:image/png;base64,...)`, which Dagster renders in markdown metadata."""
    # Brackets or backslashes in alt would otherwise end the alt text early.
    safe_alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return f"![{safe_alt}]({_data_uri(png)})"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
img { max-width: 100%; }
""".strip()


def _cell(value: object) -> str:
    return "" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[tuple[object, ...]]) -> str:
    head = "".join(f"<th>{_cell(name)}</th>" for name in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def html_report(
    title: str,
    metrics: list[tuple[str, str]],
    png: bytes,
    trades: pl.DataFrame,
    config: dict,
) -> str:
    """A self-contained HTML5 page: metrics, the equity chart, the config and the trades.

    No timestamps or other ambient state, so identical inputs give byte-identical HTML.
    """
    n_trades = trades.height
    shown = trades.head(MAX_TRADE_ROWS)
    if n_trades > MAX_TRADE_ROWS:
        note = f"showing {MAX_TRADE_ROWS} of {n_trades} trades"
    else:
        note = f"{n_trades} trades"
    config_json = json.dumps(config, indent=2, sort_keys=True, default=str)
    safe_title = html.escape(title)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{safe_title}</title>",
            f"<style>\n{_CSS}\n</style>",
            "</head>",
            "<body>",
            f"<h1>{safe_title}</h1>",
            "<h2>Metrics</h2>",
            _table(["metric", "value"], list(metrics)),
            "<h2>Equity and drawdown</h2>",
            f'<img src="{_data_uri(png)}" alt="equity and drawdown chart">',
            "<h2>Config</h2>",
            f"<pre>{html.escape(config_json)}</pre>",
            "<h2>Trades</h2>",
            f"<p>{html.escape(note)}</p>",
            _table(shown.columns, shown.rows()),
            "</body>",
            "</html>",
            "",
        ]
    )


# Metrics shown as percentages; counts as integers; the rest with two decimals.
_PERCENT = {"total_return", "cagr", "max_drawdown", "win_rate", "exposure", "buy_and_hold_return"}
_COUNT = {"trades", "rejected_orders", "skipped_entries", "bars"}


def format_metric(name: str, value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    if name in _COUNT:
        return f"{int(value):,}"
    if name in _PERCENT:
        return f"{value * 100:.2f} %"
    return f"{value:,.2f}"


def metric_rows(metrics: dict[str, Any], labels: dict[str, str]) -> list[tuple[str, str]]:
    """(label, formatted value) in the order of `labels`, for tables a person reads."""
    return [(label, format_metric(name, metrics.get(name))) for name, label in labels.items()]
