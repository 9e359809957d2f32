"""Drift: the dry-run's ledger against the backtest replayed over the same bars.

The replay runs the backtest engine over the lake's bars from the dry-run's first decided
bar (flat, with the configured capital, like the dry-run) to the fill bar of its last one,
and the trailing window is compared: signals per decided bar, fills (side and fill bar;
price difference in basis points) and realised PnL. Every difference is attributed, in
this order, to what the ledger recorded about that bar: the kill switch blocked the order,
the exchange rules rejected it, the bar was skipped by the catch-up policy, the bar (or the
open it filled at) differs from what the lake holds now (late or revised data), the lake
marks it imputed, or it follows from an earlier difference; else it is unexplained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from candlestack import execution as ex
from candlestack.backtest import config_signals, simulate, untradable_expr
from candlestack.backtest_store import load_rules, load_window
from candlestack.lake import Lake
from candlestack.ledger import SKIPPED_PREFIX, Ledger
from candlestack.strategies.config import StrategyConfig

REVISED = "late or revised data"
IMPUTED = "imputed bars"
REJECTION = "rejection"
KILL_SWITCH = "kill-switch"
SKIPPED = "catch-up policy"
FOLLOWS = "follows an earlier difference"
UNEXPLAINED = "unexplained"

ATTRIBUTIONS = pl.Schema(
    {"bar_ts": pl.Datetime("us", "UTC"), "what": pl.String, "detail": pl.String, "cause": pl.String}
)
# Relative difference under which two prices are the same number (float noise only).
_SAME_PRICE = 1e-12
# What the dry-run recorded of a bar -> the lake's value now.
_SEEN_VS_LAKE = (
    ("bar_open", "open"),
    ("bar_high", "high"),
    ("bar_low", "low"),
    ("bar_close", "close"),
    ("fill_open", "next_open"),
)


@dataclass(frozen=True)
class DriftReport:
    metrics: dict[str, float | int]
    attributions: pl.DataFrame  # ATTRIBUTIONS, oldest first
    failures: list[str] = field(default_factory=list)  # tolerances exceeded
    replay_from: datetime | None = None  # the first bar the backtest was replayed on

    @classmethod
    def empty(cls, replay_from: datetime | None = None) -> DriftReport:
        """Nothing decided yet: nothing to compare."""
        return cls({"bars_compared": 0}, pl.DataFrame(schema=ATTRIBUTIONS), [], replay_from)

    @property
    def passed(self) -> bool:
        return not self.failures

    def causes(self) -> dict[str, int]:
        counts = self.attributions.group_by("cause").len().sort("cause").rows()
        return dict(counts)


def ledger_trades(fills: pl.DataFrame) -> pl.DataFrame:
    """Round trips from the ledger's fills (buy then sell), as (entry_ts, exit_ts, prices, pnl);
    an open position has a null exit."""
    fills = fills.sort("bar_ts")
    buys = fills.filter(pl.col("side") == "buy").with_row_index("trade")
    sells = fills.filter(pl.col("side") == "sell").with_row_index("trade")
    return (
        buys.join(sells, on="trade", how="left", suffix="_exit")
        .select(
            pl.col("bar_ts").alias("entry_ts"),
            pl.col("price").alias("entry_price"),
            pl.col("bar_ts_exit").alias("exit_ts"),
            pl.col("price_exit").alias("exit_price"),
            (
                pl.col("amount_exit") * pl.col("price_exit")
                - pl.col("fee_exit")
                - pl.col("amount") * pl.col("price")
                - pl.col("fee")
            ).alias("pnl"),
        )
        .sort("entry_ts")
    )


def _differs(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return False
    return abs(a - b) > _SAME_PRICE * max(abs(a), abs(b), 1.0)


def drift(
    config: StrategyConfig,
    decisions: pl.DataFrame,
    orders: pl.DataFrame,
    fills: pl.DataFrame,
    bars: pl.DataFrame,
    rules: ex.RuleBook,
    now: datetime,
    replay_from: datetime | None = None,
    capital: float | None = None,
) -> DriftReport:
    """Compare a strategy's ledger (its decisions, orders and fills from a bar where it was
    flat: all of them, or those from `replay_from` on) with the backtest replayed on `bars`
    (the lake's, warm-up included) from that bar, flat, with `capital` (the ledger's cash
    there; the configured capital when None), over the trailing window before `now`."""
    tolerance = config.dry_run.drift
    decisions = decisions.with_columns(
        pl.col("note").fill_null("").str.starts_with(SKIPPED_PREFIX).alias("skipped")
    )
    decided = decisions.filter(~pl.col("skipped"))
    if decided.is_empty():
        return DriftReport.empty()
    first_ts, last_ts = decided.get_column("bar_ts").min(), decided.get_column("bar_ts").max()
    if replay_from is not None:
        first_ts = replay_from
    bar_ms = int(bars.get_column("ts").dt.epoch("ms").diff().min() or 0)
    bars = bars.filter(pl.col("ts") <= last_ts + timedelta(milliseconds=bar_ms))
    # The newest decision may have filled at the forming bar's open: until that bar is in
    # the lake the replay cannot fill there either, so the fill is compared on a later check.
    fills = fills.filter(pl.col("bar_ts") <= bars.get_column("ts").max())
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    entry, exit_ = config_signals(config, bars)
    first = int(np.searchsorted(ts, int(first_ts.timestamp() * 1000)))
    replayed = config if capital is None else config.model_copy(update={"capital": capital})
    result = simulate(replayed, bars, ts, entry, exit_, rules, first)

    since = now - timedelta(days=tolerance.window_days)
    untradable = untradable_expr(bars.columns)
    lake = bars.select(
        pl.col("ts").cast(pl.Datetime("us", "UTC")),
        "open",
        "high",
        "low",
        "close",
        pl.Series("replay_entry", entry),
        pl.Series("replay_exit", exit_),
        untradable.alias("lake_untradable"),
        pl.col("open").shift(-1).alias("next_open"),
        (pl.col("ts").shift(-1).is_not_null() & untradable.shift(-1)).alias("next_untradable"),
    )
    rejected_keys = orders.filter(pl.col("status") == "rejected").get_column("decision_key")
    compared = (
        decisions.filter(pl.col("bar_ts") >= since)
        .with_columns(pl.col("key").is_in(rejected_keys.implode()).alias("rejected"))
        .join(lake, left_on="bar_ts", right_on="ts", how="left")
        .with_columns(_revised_expr().alias("revised"))
        .sort("bar_ts")
    )
    attributions: list[dict] = []
    attributed: set[datetime] = set()  # the bars with an attribution

    def attribute(row: dict, what: str, detail: str) -> None:
        cause = _cause(row)
        if cause == UNEXPLAINED and attributed and min(attributed) < row["bar_ts"]:
            cause = FOLLOWS  # the position already differed: everything after it may
        attributions.append(
            {"bar_ts": row["bar_ts"], "what": what, "detail": detail, "cause": cause}
        )
        attributed.add(row["bar_ts"])

    in_window = compared.filter(~pl.col("skipped"))
    same = (
        ~pl.col("skipped")
        & (pl.col("entry_signal") == pl.col("replay_entry"))
        & (pl.col("exit_signal") == pl.col("replay_exit"))
    ).fill_null(False)
    compared = compared.with_columns(same.alias("same"))
    agree = int(compared.get_column("same").sum())
    # Only the bars that differ are visited (in order: an attribution depends on earlier ones).
    for row in compared.filter(~pl.col("same")).iter_rows(named=True):
        if row["skipped"]:
            attribute(row, "bar not decided", row["note"])
            continue
        if row["replay_entry"] is None:
            attribute(row, "signal", "the bar is no longer in the lake")
            continue
        attribute(
            row,
            "signal",
            f"dry-run entry/exit {row['entry_signal']}/{row['exit_signal']}, "
            f"replay {row['replay_entry']}/{row['replay_exit']}",
        )
    revised = compared.filter(pl.col("revised"))
    for row in revised.iter_rows(named=True):
        if row["bar_ts"] not in attributed:
            attribute(row, "bar revised", _revision_detail(row))

    fill_diffs, fill_findings = _fill_differences(fills, result.trades, since, bar_ms)
    signal_bars = pl.Series([ts for ts, _, _ in fill_findings], dtype=pl.Datetime("us", "UTC"))
    found_rows = compared.filter(pl.col("bar_ts").is_in(signal_bars.implode()))
    by_bar = {row["bar_ts"]: row for row in found_rows.iter_rows(named=True)}
    for signal_ts, what, detail in fill_findings:
        attribute(by_bar.get(signal_ts, {"bar_ts": signal_ts}), what, detail)
    unmatched = sum(what.endswith(" fill") for _, what, _ in fill_findings)
    ledger_round_trips = ledger_trades(fills).filter(
        pl.col("exit_ts").is_not_null() & (pl.col("entry_ts") >= since)
    )
    replay_round_trips = result.trades.filter(
        (pl.col("exit_reason") != ex.EXIT_REASONS[ex.EXIT_END]) & (pl.col("entry_ts") >= since)
    )
    pnl_ledger = float(ledger_round_trips.get_column("pnl").sum())
    pnl_replay = float(replay_round_trips.get_column("pnl").sum())
    pnl_diff = pnl_ledger - pnl_replay

    attributions_frame = pl.DataFrame(attributions, schema=ATTRIBUTIONS).sort("bar_ts")
    n = in_window.height
    metrics: dict[str, float | int] = {
        "bars_compared": n,
        "signal_agreement": agree / n if n else 1.0,
        "signal_mismatches": n - agree,
        "fills_ledger": _fills_in(fills, since),
        "fills_replay": 2 * replay_round_trips.height + _open_entries(result.trades, since),
        "unmatched_fills": unmatched,
        "fill_price_diff_bps_max": max(fill_diffs, default=0.0),
        "fill_price_diff_bps_mean": float(np.mean(fill_diffs)) if fill_diffs else 0.0,
        "pnl_ledger": pnl_ledger,
        "pnl_replay": pnl_replay,
        "pnl_diff": pnl_diff,
        "pnl_diff_share_of_capital": abs(pnl_diff) / config.capital,
        "revised_bars": revised.height,
        "imputed_bars": compared.filter(pl.col("lake_untradable").fill_null(False)).height,
        "rejected_orders": _count(compared, pl.col("rejected")),
        "blocked_orders": _count(compared, pl.col("action") == "blocked"),
        "skipped_bars": compared.height - n,
    }
    failures = []
    if metrics["signal_agreement"] < tolerance.min_signal_agreement:
        failures.append(
            f"signal agreement {metrics['signal_agreement']:.2%} under "
            f"{tolerance.min_signal_agreement:.2%}"
        )
    if metrics["fill_price_diff_bps_max"] > tolerance.max_fill_price_diff_bps:
        failures.append(
            f"fill price difference {metrics['fill_price_diff_bps_max']:.2f} bps over "
            f"{tolerance.max_fill_price_diff_bps:g} bps"
        )
    if unmatched > tolerance.max_unmatched_fills:
        failures.append(
            f"{unmatched} fill(s) on one side only (tolerance {tolerance.max_unmatched_fills})"
        )
    if metrics["pnl_diff_share_of_capital"] > tolerance.max_pnl_diff:
        failures.append(
            f"PnL differs by {pnl_diff:+.2f} ({metrics['pnl_diff_share_of_capital']:.3%} of "
            f"capital, tolerance {tolerance.max_pnl_diff:.3%})"
        )
    return DriftReport(metrics, attributions_frame, failures, first_ts)


def _revised_expr() -> pl.Expr:
    """A decided bar whose recorded prices (or fill open) differ from the lake's now
    (`_differs` over every pair: a missing or NaN value is no evidence of a revision)."""
    changed = pl.lit(False)
    for seen, now in _SEEN_VS_LAKE:
        changed = changed | (
            pl.col(seen).is_not_null()
            & pl.col(now).is_not_null()
            & pl.col(seen).is_not_nan()
            & pl.col(now).is_not_nan()
            & (
                (pl.col(seen) - pl.col(now)).abs()
                > _SAME_PRICE * pl.max_horizontal(pl.col(seen).abs(), pl.col(now).abs(), 1.0)
            )
        )
    return changed


def _revision_detail(row: dict) -> str:
    parts = [
        f"{now.replace('next_open', 'fill open')} {row[seen]} -> {row[now]}"
        for seen, now in _SEEN_VS_LAKE
        if _differs(row[seen], row[now])
    ]
    return "seen by the dry-run vs in the lake now: " + ", ".join(parts)


def _cause(row: dict) -> str:
    """The first recorded reason a decided bar can differ from the replay (module docstring)."""
    if row.get("action") == "blocked":
        return KILL_SWITCH
    if row.get("rejected"):
        return REJECTION
    if row.get("skipped"):
        return SKIPPED
    if row.get("open") is None or row.get("revised"):
        return REVISED
    if row.get("lake_untradable") or row.get("next_untradable") or row.get("bar_untradable"):
        return IMPUTED
    return UNEXPLAINED


def _fill_differences(
    fills: pl.DataFrame, replay_trades: pl.DataFrame, since: datetime, bar_ms: int
) -> tuple[list[float], list[tuple[datetime, str, str]]]:
    """Fills matched by (side, fill bar): price differences in bps of the matches, and
    (signal bar, what, detail) for each fill on one side only or at another price."""
    closed = replay_trades.filter(pl.col("exit_reason") != ex.EXIT_REASONS[ex.EXIT_END])
    replay = pl.concat(
        [
            replay_trades.select(
                pl.lit("buy").alias("side"),
                pl.col("entry_ts").alias("fill_ts"),
                pl.col("entry_price").alias("price"),
            ),
            closed.select(
                pl.lit("sell").alias("side"),
                pl.col("exit_ts").alias("fill_ts"),
                pl.col("exit_price").alias("price"),
            ),
        ]
    ).filter(pl.col("fill_ts") >= since)
    ledger = fills.filter(pl.col("bar_ts") >= since).select(
        "side", pl.col("bar_ts").alias("fill_ts"), "price"
    )
    replay = replay.with_columns(pl.col("fill_ts").cast(ledger.schema["fill_ts"]))
    matched = ledger.join(
        replay, on=["side", "fill_ts"], how="full", suffix="_replay", coalesce=True
    ).sort("fill_ts")
    diffs: list[float] = []
    found = []
    for row in matched.iter_rows(named=True):
        signal_ts = row["fill_ts"] - timedelta(milliseconds=bar_ms)
        when = f"{row['side']} filling at {row['fill_ts']:%Y-%m-%d %H:%M}"
        if row["price"] is None or row["price_replay"] is None:
            side = "in the dry-run only" if row["price_replay"] is None else "in the replay only"
            found.append((signal_ts, f"{row['side']} fill", f"{when} {side}"))
            continue
        bps = abs(row["price"] - row["price_replay"]) / row["price_replay"] * 1e4
        diffs.append(bps)
        if bps > 0:
            prices = f"dry-run {row['price']} vs replay {row['price_replay']}"
            detail = f"{when}: {prices} ({bps:.2f} bps)"
            found.append((signal_ts, f"{row['side']} fill price", detail))
    return diffs, found


def _fills_in(fills: pl.DataFrame, since: datetime) -> int:
    return fills.filter(pl.col("bar_ts") >= since).height


def _open_entries(trades: pl.DataFrame, since: datetime) -> int:
    return trades.filter(
        (pl.col("exit_reason") == ex.EXIT_REASONS[ex.EXIT_END]) & (pl.col("entry_ts") >= since)
    ).height


def _count(frame: pl.DataFrame, predicate: pl.Expr) -> int:
    return frame.filter(predicate).height


def replay_start(
    ledger: Ledger, config: StrategyConfig, since: datetime
) -> tuple[datetime, float] | None:
    """The newest bar at or before `since` on which the dry-run was flat, and its cash
    there, from the strategy's newest fills up to `since` (an indexed read of two): the
    bar its last sell filled on, or the bar of the buy still open at `since`, or `since`
    itself when nothing filled before; the cash is the one the sell's decision event
    recorded. None when the ledger does not say (its events out of bar order)."""
    fills = ledger.last_fills(config.name, since, last=2)
    if not fills:
        return since, config.capital
    newest = fills[0]
    if newest["side"] == "sell":
        start, sold = newest["bar_ts"], newest
    elif len(fills) == 1:
        return newest["decision_bar_ts"], config.capital
    elif fills[1]["side"] == "sell":
        start, sold = newest["decision_bar_ts"], fills[1]
    else:
        return None  # two buys in a row: not a ledger this engine wrote
    cash = ledger.cash_after(config.name, sold["decision_key"], sold["decision_bar_ts"])
    return None if cash is None else (start, cash)


def drift_from_lake(
    lake: Lake, exchange: str, ledger: Ledger, config: StrategyConfig, now: datetime
) -> DriftReport:
    """`drift` of a strategy's dry-run over the trailing window, with the lake's bars and
    rules now. Bounded by the window, not by the session: the backtest is replayed from
    the newest bar before the window on which the dry-run was flat (replay_start), with
    the ledger's cash there, and only the decisions, orders, fills and bars from that bar
    on are read. A difference before that bar does not carry into the window; a session
    whose ledger does not say where it was flat is replayed whole."""
    first_decided = ledger.first_decided(config.name)
    if first_decided is None:
        return DriftReport.empty()
    since = now - timedelta(days=config.dry_run.drift.window_days)
    start = replay_start(ledger, config, since)
    bounded = start is not None and start[0] > first_decided
    replay_from, capital = start if bounded else (first_decided, None)
    decisions = ledger.decisions(config.name, since=replay_from)
    if decisions.is_empty():
        return DriftReport.empty(replay_from)
    first = replay_from.date()
    last = decisions.get_column("bar_ts").max().date() + timedelta(days=1)
    window = load_window(lake, exchange, config.model_copy(update={"start": first, "end": last}))
    rules = load_rules(lake, exchange, config.symbol, since=first)
    return drift(
        config,
        decisions,
        ledger.orders(config.name, since=replay_from),
        ledger.fills(config.name, after=replay_from),
        window.bars,
        rules,
        now,
        replay_from if bounded else None,  # else: from the first bar decided, not skipped
        capital,
    )
