"""Backtests: strategy signals through the execution engine, bar by bar, then metrics.

Vectorised where the maths allows (features, signals, tradability, metrics); the one
path-dependent part, holding at most one position, is a compiled loop over bars that calls
the execution kernels the dry-run calls (candlestack.execution).

Data policy for imputed and incomplete bars: no entry is taken on a signal from a bar with
any imputed or missing minute, nor when the bar it would fill on has one (its open may be a
made-up price) or is not the next period (a day without bars in between). Exits are never
held back: getting out beats waiting for clean data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import polars as pl
from numba import njit

from candlestack import execution as ex
from candlestack.features import FeatureSpec, compute
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.schema import DAY_MS, MINUTE_MS, TS
from candlestack.strategies.base import Strategy, signals
from candlestack.strategies.config import StrategyConfig

DAYS_PER_YEAR = 365.0  # crypto trades every day: daily returns annualise by sqrt(365)

TRADES = pl.Schema(
    {
        "trade": pl.Int64,
        "entry_signal_ts": TS,  # open time of the bar whose close gave the signal
        "entry_ts": TS,  # open time of the bar whose open filled the order
        "entry_price": pl.Float64,
        "exit_signal_ts": TS,
        "exit_ts": TS,
        "exit_price": pl.Float64,
        "amount": pl.Float64,
        "entry_fee": pl.Float64,
        "exit_fee": pl.Float64,
        "pnl": pl.Float64,  # quote, after both fees
        "return": pl.Float64,  # pnl over what the entry cost, fee included
        "bars_held": pl.Int64,
        "exit_reason": pl.String,
    }
)
EQUITY = pl.Schema({"ts": TS, "equity": pl.Float64, "in_position": pl.Boolean})
REJECTIONS = pl.Schema({"signal_ts": TS, "side": pl.String, "reason": pl.String})


@dataclass(frozen=True)
class BacktestResult:
    trades: pl.DataFrame  # TRADES
    equity: pl.DataFrame  # EQUITY: account value at the close of the bar opening at ts
    rejections: pl.DataFrame  # REJECTIONS
    metrics: dict[str, float | int | str | None] = field(default_factory=dict)


def strategy_features(strategy: Strategy, timeframe: str) -> list[FeatureSpec]:
    return [spec.model_copy(update={"timeframe": timeframe}) for spec in strategy.features()]


def with_features(bars: pl.DataFrame, specs: list[FeatureSpec]) -> pl.DataFrame:
    """Bars with the strategy's feature columns beside them, computed by the features engine."""
    if not specs:
        return bars
    return bars.hstack(compute(bars, specs).drop("ts"))


def _epoch_ms(value: date | datetime | None, bars_ts: np.ndarray) -> int:
    if value is None:
        return int(bars_ts[0]) if len(bars_ts) else 0
    if not isinstance(value, datetime):
        return (value - date(1970, 1, 1)).days * DAY_MS
    return int(value.timestamp() * 1000)


def _untradable(bars: pl.DataFrame) -> np.ndarray:
    """Bars with an imputed or missing minute (the data policy above)."""
    if "n_imputed" in bars.columns:
        return (
            bars.select((pl.col("n_imputed") > 0) | ~pl.col("complete"))
            .to_series()
            .fill_null(True)
            .to_numpy()
        )
    if "imputed" in bars.columns:
        return bars.get_column("imputed").fill_null(True).to_numpy()
    return np.zeros(bars.height, dtype=bool)


def backtest(
    config: StrategyConfig,
    bars: pl.DataFrame,
    rules: ex.RuleBook,
    start: date | datetime | None = None,
    frame: pl.DataFrame | None = None,
) -> BacktestResult:
    """Run `config` over `bars` (one symbol and timeframe, sorted, history before `start`
    included for the indicators' warm-up), trading from `start` to the last bar.

    `frame` is bars with features already computed (a sweep computes each feature once).
    """
    strategy = config.strategy_object
    if frame is None:
        frame = with_features(bars, strategy_features(strategy, config.timeframe))
    entry, exit_ = signals(strategy, frame)
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    first = int(np.searchsorted(ts, _epoch_ms(start, ts), side="left"))
    return simulate(config, bars, ts, entry, exit_, rules, first)


def simulate(
    config: StrategyConfig,
    bars: pl.DataFrame,
    ts: np.ndarray,
    entry: np.ndarray,
    exit_: np.ndarray,
    rules: ex.RuleBook,
    first: int = 0,
) -> BacktestResult:
    """Signals to trades, equity and metrics (rows before `first` are warm-up only)."""
    open_ = bars.get_column("open").to_numpy()
    close = bars.get_column("close").to_numpy()
    n = len(close)
    band = close >= config.min_price
    if config.max_price is not None:
        band &= close <= config.max_price
    bad = _untradable(bars)
    bar_ms = TIMEFRAME_MINUTES[config.timeframe] * MINUTE_MS
    # The fill bar must be the very next period: after a hole in the bars it is not.
    bad_next = np.ones_like(bad)
    bad_next[:-1] = bad[1:] | (np.diff(ts) != bar_ms)
    wanted = entry & band
    entry_ok = wanted & ~bad & ~bad_next
    skipped = int(np.count_nonzero(wanted[first:] & ~entry_ok[first:]))
    at = rules.index(ts)
    out = _loop(
        open_,
        close,
        entry_ok,
        exit_,
        at,
        rules.amount_step,
        rules.amount_decimals,
        rules.price_tick,
        rules.price_decimals,
        rules.min_amount,
        rules.max_amount,
        rules.min_cost,
        first,
        config.order_value,
        config.capital,
        config.fee,
        config.slippage,
        config.min_profit,
        config.stop_loss,
    )
    trades, equity, rejections = _frames(ts, first, *out)
    metrics = compute_metrics(
        config.capital,
        ts[first:],
        equity.get_column("equity").to_numpy(),
        equity.get_column("in_position").to_numpy(),
        trades,
        bar_ms,
        buy_and_hold=float(close[-1] / open_[first] - 1) if n > first else math.nan,
    )
    metrics["rejected_orders"] = rejections.height
    metrics["skipped_entries"] = skipped
    return BacktestResult(trades=trades, equity=equity, rejections=rejections, metrics=metrics)


@njit(cache=True)
def _loop(
    open_,
    close,
    entry_ok,
    exit_signal,
    at,
    amount_step,
    amount_decimals,
    price_tick,
    price_decimals,
    min_amount,
    max_amount,
    min_cost,
    first,
    order_value,
    capital,
    fee_rate,
    slippage,
    min_profit,
    stop_loss,
):
    """One position at most; decisions on the close of t fill at the open of t+1."""
    n = len(close)
    m = max(n - first, 0)
    equity = np.empty(m)
    in_position = np.zeros(m, dtype=np.bool_)
    capacity = m // 2 + 1
    t_entry = np.empty(capacity, dtype=np.int64)  # fill bar; the signal bar is one before
    t_exit = np.empty(capacity, dtype=np.int64)
    t_entry_price = np.empty(capacity)
    t_exit_price = np.empty(capacity)
    t_amount = np.empty(capacity)
    t_entry_fee = np.empty(capacity)
    t_exit_fee = np.empty(capacity)
    t_reason = np.empty(capacity, dtype=np.int64)
    r_bar = np.empty(m, dtype=np.int64)
    r_side = np.empty(m, dtype=np.int64)  # 0 buy, 1 sell
    r_code = np.empty(m, dtype=np.int64)
    cash = capital
    amount = 0.0
    entry_price = 0.0
    k = 0
    r = 0
    for t in range(first, n):
        held = amount > 0.0
        in_position[t - first] = held
        equity[t - first] = cash + amount * close[t]
        if t == n - 1:
            break
        j = at[t + 1]
        if held:
            reason = ex.exit_code(
                close[t], entry_price, exit_signal[t], min_profit, stop_loss, fee_rate
            )
            if reason == ex.NO_EXIT:
                continue
            price = ex.sell_price(open_[t + 1], slippage, price_tick[j], price_decimals[j])
            code = ex.reject_code(amount, price, min_amount[j], max_amount[j], min_cost[j])
            if code != ex.ACCEPTED:
                r_bar[r], r_side[r], r_code[r] = t, 1, code
                r += 1
                continue
            fee = ex.fee_of(amount, price, fee_rate)
            cash += amount * price - fee
            t_exit[k], t_exit_price[k], t_exit_fee[k], t_reason[k] = t + 1, price, fee, reason
            k += 1
            amount = 0.0
        elif entry_ok[t]:
            price = ex.buy_price(open_[t + 1], slippage, price_tick[j], price_decimals[j])
            size = ex.order_amount(order_value, price, amount_step[j], amount_decimals[j])
            code = ex.reject_code(size, price, min_amount[j], max_amount[j], min_cost[j])
            fee = ex.fee_of(size, price, fee_rate)
            if code == ex.ACCEPTED and size * price + fee > cash:
                code = ex.REJECT_BALANCE
            if code != ex.ACCEPTED:
                r_bar[r], r_side[r], r_code[r] = t, 0, code
                r += 1
                continue
            cash -= size * price + fee
            amount = size
            entry_price = price
            t_entry[k], t_entry_price[k], t_amount[k], t_entry_fee[k] = t + 1, price, size, fee
    if amount > 0.0 and m > 0:
        # Still open at the end of the window: sold at the last close, slippage and fee
        # included, so returns are realised and the trades add up to the equity curve.
        j = at[n - 1]
        price = ex.sell_price(close[n - 1], slippage, price_tick[j], price_decimals[j])
        fee = ex.fee_of(amount, price, fee_rate)
        cash += amount * price - fee
        t_exit[k], t_exit_price[k], t_exit_fee[k], t_reason[k] = n - 1, price, fee, ex.EXIT_END
        k += 1
        equity[m - 1] = cash
    return (
        equity,
        in_position,
        t_entry[:k],
        t_exit[:k],
        t_entry_price[:k],
        t_exit_price[:k],
        t_amount[:k],
        t_entry_fee[:k],
        t_exit_fee[:k],
        t_reason[:k],
        r_bar[:r],
        r_side[:r],
        r_code[:r],
    )


def _frames(
    ts,
    first,
    equity,
    in_position,
    entry_bar,
    exit_bar,
    entry_price,
    exit_price,
    amount,
    entry_fee,
    exit_fee,
    reason,
    r_bar,
    r_side,
    r_code,
):
    cost = amount * entry_price + entry_fee
    pnl = amount * exit_price - exit_fee - cost
    # An end-of-window exit has no signal bar: it is the last bar itself.
    exit_signal_bar = np.where(reason == ex.EXIT_END, exit_bar, exit_bar - 1)
    trades = pl.DataFrame(
        {
            "trade": np.arange(1, len(entry_bar) + 1),
            "entry_signal_ts": ts[entry_bar - 1],
            "entry_ts": ts[entry_bar],
            "entry_price": entry_price,
            "exit_signal_ts": ts[exit_signal_bar],
            "exit_ts": ts[exit_bar],
            "exit_price": exit_price,
            "amount": amount,
            "entry_fee": entry_fee,
            "exit_fee": exit_fee,
            "pnl": pnl,
            "return": pnl / cost if len(cost) else cost,
            "bars_held": exit_bar - entry_bar,
            "exit_reason": [ex.EXIT_REASONS[int(c)] for c in reason],
        },
        schema_overrides={"entry_signal_ts": pl.Int64, "entry_ts": pl.Int64},
    ).with_columns(pl.col("^.*_ts$").cast(pl.Int64).cast(TS))
    equity_frame = pl.DataFrame(
        {"ts": ts[first:], "equity": equity, "in_position": in_position}
    ).with_columns(pl.col("ts").cast(TS))
    rejections = pl.DataFrame(
        {
            "signal_ts": ts[r_bar],
            "side": np.where(r_side == 0, "buy", "sell"),
            "reason": [ex.REJECTION_REASONS[int(c)] for c in r_code],
        },
        schema={"signal_ts": pl.Int64, "side": pl.String, "reason": pl.String},
    ).with_columns(pl.col("signal_ts").cast(TS))
    return trades.select(TRADES.names()).cast(TRADES), equity_frame.cast(EQUITY), rejections


def compute_metrics(
    capital: float,
    ts: np.ndarray,
    equity: np.ndarray,
    in_position: np.ndarray,
    trades: pl.DataFrame,
    bar_ms: int,
    buy_and_hold: float,
) -> dict[str, float | int | str | None]:
    """Every metric from the equity curve (valued at each bar's close) and the trades.

    Returns and drawdowns are fractions (0.1 = 10 %). Sharpe and Sortino are annualised
    from daily (UTC) returns with zero risk-free rate; drawdowns are measured from the
    running peak, the starting capital included; NaN where a metric is undefined.
    """
    metrics: dict[str, float | int | str | None] = {"bars": len(equity)}
    if not len(equity):
        return metrics | dict.fromkeys(METRICS, math.nan) | {"bars": 0, "trades": 0}
    final = float(equity[-1])
    span_days = (int(ts[-1]) + bar_ms - int(ts[0])) / DAY_MS
    total_return = final / capital - 1
    peak = np.maximum.accumulate(np.maximum(equity, capital))
    drawdown = equity / peak - 1
    # Time under water: from the last bar at a peak (or the window's start) to each bar.
    at_peak = equity >= peak
    last_peak_ts = np.maximum.accumulate(np.where(at_peak, ts + bar_ms, ts[0]))
    underwater_ms = np.where(at_peak, 0, ts + bar_ms - last_peak_ts)
    day_end = np.flatnonzero(np.diff(ts // DAY_MS, append=np.iinfo(np.int64).max))
    daily = equity[day_end]
    daily_returns = np.diff(daily, prepend=capital) / np.concatenate(([capital], daily[:-1]))
    cagr = (final / capital) ** (365.25 / span_days) - 1 if final > 0 else -1.0
    max_drawdown = float(-drawdown.min())
    pnl = trades.get_column("pnl").to_numpy()
    wins, losses = pnl[pnl > 0], pnl[pnl <= 0]
    fees = trades.get_column("entry_fee").sum() + trades.get_column("exit_fee").sum()
    return metrics | {
        "total_return": total_return,
        "cagr": float(cagr),
        "max_drawdown": max_drawdown,
        "max_drawdown_days": float(underwater_ms.max() / DAY_MS),
        "sharpe": _ratio(daily_returns.mean(), daily_returns.std(ddof=1)),
        "sortino": _ratio(
            daily_returns.mean(), math.sqrt(np.mean(np.minimum(daily_returns, 0) ** 2))
        ),
        "calmar": float(cagr / max_drawdown) if max_drawdown > 0 else math.nan,
        "trades": len(pnl),
        "win_rate": len(wins) / len(pnl) if len(pnl) else math.nan,
        "profit_factor": (
            float(wins.sum() / -losses.sum())
            if losses.sum() < 0
            else (math.inf if len(wins) else math.nan)
        ),
        "expectancy": float(pnl.mean()) if len(pnl) else math.nan,
        "exposure": float(np.count_nonzero(in_position) / len(in_position)),
        "fees": float(fees),
        "buy_and_hold_return": buy_and_hold,
        "final_equity": final,
        "days": span_days,
    }


def _ratio(mean: float, deviation: float) -> float:
    if not np.isfinite(deviation) or deviation == 0:
        return math.nan
    return float(mean / deviation * math.sqrt(DAYS_PER_YEAR))


# Metric name -> label, in the order reports show them.
METRICS = {
    "total_return": "total return",
    "cagr": "CAGR",
    "max_drawdown": "max drawdown",
    "max_drawdown_days": "max drawdown duration (days)",
    "sharpe": "Sharpe (daily, annualised)",
    "sortino": "Sortino (daily, annualised)",
    "calmar": "Calmar",
    "trades": "trades",
    "win_rate": "win rate",
    "profit_factor": "profit factor",
    "expectancy": "expectancy (quote per trade)",
    "exposure": "exposure (share of bars in a position)",
    "fees": "fees paid (quote)",
    "rejected_orders": "rejected orders",
    "skipped_entries": "entries skipped on imputed/incomplete bars",
    "buy_and_hold_return": "buy-and-hold return",
    "final_equity": "final equity (quote)",
    "bars": "bars",
    "days": "days",
}
