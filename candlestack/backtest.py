"""Backtests: strategy signals through the execution engine, bar by bar, then metrics.

Vectorised where the maths allows (features, signals, tradability, metrics); the one
path-dependent part, holding at most one position, is a compiled loop over bars that calls
`execution.step`, the decision the dry-run takes on each of its bars. The data policy for
imputed and incomplete bars is the engine's (see candlestack.execution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

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
MIN_CAGR_DAYS = 30

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
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # bar times are UTC
    return int(value.timestamp() * 1000)


def untradable_expr(columns: list[str]) -> pl.Expr | None:
    """True on bars with an imputed or missing minute (the engine's data policy), for bars
    (n_imputed, complete) or 1-minute candles (imputed); None when the frame has neither."""
    if "n_imputed" in columns:
        return ((pl.col("n_imputed") > 0) | ~pl.col("complete")).fill_null(True)
    if "imputed" in columns:
        return pl.col("imputed").fill_null(True)
    return None


def untradable(bars: pl.DataFrame) -> np.ndarray:
    """`untradable_expr` as an array (all False when the frame has no quality columns)."""
    flags = untradable_expr(bars.columns)
    if flags is None:
        return np.zeros(bars.height, dtype=bool)
    return bars.select(flags).to_series().to_numpy()


def config_signals(config: StrategyConfig, bars: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit flags of a configured strategy on each bar, its features computed."""
    strategy = config.strategy_object
    return signals(strategy, with_features(bars, strategy_features(strategy, config.timeframe)))


def backtest(
    config: StrategyConfig,
    bars: pl.DataFrame,
    rules: ex.RuleBook,
    start: date | datetime | None = None,
) -> BacktestResult:
    """Run `config` over `bars` (one symbol and timeframe, sorted, history before `start`
    included for the indicators' warm-up), trading from `start` to the last bar."""
    entry, exit_ = config_signals(config, bars)
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    first = int(np.searchsorted(ts, _epoch_ms(start, ts), side="left"))
    return simulate(config, bars, ts, entry, exit_, rules, first)


@dataclass(frozen=True)
class BarArrays:
    """The bar columns the simulation reads, taken out of polars once (a sweep reuses them)."""

    ts: np.ndarray  # epoch ms
    open: np.ndarray
    close: np.ndarray
    untradable: np.ndarray

    @classmethod
    def of(cls, bars: pl.DataFrame, ts: np.ndarray | None = None) -> BarArrays:
        if ts is None:
            ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
        return cls(
            ts=ts,
            open=bars.get_column("open").to_numpy(),
            close=bars.get_column("close").to_numpy(),
            untradable=untradable(bars),
        )


def simulate(
    config: StrategyConfig,
    bars: pl.DataFrame | BarArrays,
    ts: np.ndarray,
    entry: np.ndarray,
    exit_: np.ndarray,
    rules: ex.RuleBook,
    first: int = 0,
    frames: bool = True,
) -> BacktestResult:
    """Signals to trades, equity and metrics (rows before `first` are warm-up only).

    With `frames=False` only the metrics are made (a sweep needs no trade tables).
    """
    arrays = bars if isinstance(bars, BarArrays) else BarArrays.of(bars, ts)
    ts, open_, close = arrays.ts, arrays.open, arrays.close
    bar_ms = TIMEFRAME_MINUTES[config.timeframe] * MINUTE_MS
    if len(ts) > 1 and (step := int(np.diff(ts).min())) != bar_ms:
        raise ValueError(
            f"strategy {config.name!r} trades {config.timeframe} bars, but these bars are "
            f"{step // MINUTE_MS} minute(s) apart"
        )
    out = _loop(
        ts,
        open_,
        close,
        entry,
        exit_,
        arrays.untradable,
        bar_ms,
        rules.snapshot_days,
        rules.amount_step,
        rules.amount_decimals,
        rules.price_tick,
        rules.price_decimals,
        rules.min_amount,
        rules.max_amount,
        rules.min_cost,
        first,
        float(config.capital),
        engine_rules(config, rules.at(0)),
        int(np.count_nonzero(entry[first:])) + 1,
    )
    equity, in_position, skipped = out[0], out[1], out[-1]
    entry_price, amount, entry_fee, exit_fee, pnl = out[4], out[6], out[7], out[8], out[10]
    cost = amount * entry_price + entry_fee  # what each entry took from the cash
    metrics = _metrics(
        config.capital,
        ts[first:],
        equity,
        int(np.count_nonzero(in_position)),
        pnl,
        float(entry_fee.sum() + exit_fee.sum()),
        bar_ms,
        buy_and_hold=float(close[-1] / open_[first] - 1) if len(close) > first else math.nan,
    )
    metrics["rejected_orders"] = len(out[11])
    metrics["skipped_entries"] = int(skipped)
    if not frames:
        return BacktestResult(
            trades=pl.DataFrame(schema=TRADES),
            equity=pl.DataFrame(schema=EQUITY),
            rejections=pl.DataFrame(schema=REJECTIONS),
            metrics=metrics,
        )
    packed = out[11]
    unpacked = (packed // 16, packed // 8 % 2, packed % 8)
    trades, equity_frame, rejections = _frames(ts, first, *out[:10], *unpacked, cost, pnl)
    return BacktestResult(
        trades=trades, equity=equity_frame, rejections=rejections, metrics=metrics
    )


def engine_rules(config: StrategyConfig, market: ex.MarketRules) -> ex.Rules:
    """The rules `execution.step` trades `config` by, on a day of `market` rules."""
    return ex.rules_of(
        market,
        config.order_value,
        config.fee,
        config.slippage,
        config.min_profit,
        config.stop_loss,
        config.min_price,
        config.max_price,
    )


@njit(cache=True)
def _record(rejected, row, bar, side, code):
    """Append one rejection packed as bar * 16 + side * 8 + code, growing the array."""
    if row == len(rejected):
        grown = np.empty(2 * row, dtype=np.int64)
        for i in range(row):
            grown[i] = rejected[i]
        rejected = grown
    rejected[row] = bar * 16 + side * 8 + code
    return rejected


@njit(cache=True, nogil=True)
def _loop(
    ts,
    open_,
    close,
    entry,
    exit_signal,
    untradable,
    bar_ms,
    snapshot_days,
    amount_step,
    amount_decimals,
    price_tick,
    price_decimals,
    min_amount,
    max_amount,
    min_cost,
    first,
    capital,
    rules,
    trades_capacity,
):
    """execution.step on every bar; `rules` holds the market rules of snapshot row 0."""
    n = len(close)
    m = max(n - first, 0)
    equity = np.empty(m)
    in_position = np.zeros(m, dtype=np.bool_)
    capacity = trades_capacity  # a trade needs an entry signal
    t_entry = np.empty(capacity, dtype=np.int64)  # fill bar; the signal bar is one before
    t_exit = np.empty(capacity, dtype=np.int64)
    t_entry_price = np.empty(capacity)
    t_exit_price = np.empty(capacity)
    t_amount = np.empty(capacity)
    t_entry_fee = np.empty(capacity)
    t_exit_fee = np.empty(capacity)
    t_reason = np.empty(capacity, dtype=np.int64)
    t_pnl = np.empty(capacity)
    rejected = np.empty(64, dtype=np.int64)  # see _record; side 0 buy, 1 sell
    state = ex.State(capital, 0.0, 0.0, 0.0, ex.NO_EXIT)
    j = 0
    k = 0
    r = 0
    skipped = 0
    for t in range(first, n):
        in_position[t - first] = state.amount > 0.0
        equity[t - first] = state.cash + state.amount * close[t]
        if t == n - 1:
            break
        if ex.idle(state, entry[t]):
            continue
        row = ex.rules_row(snapshot_days, ts[t + 1], j)
        if row != j:
            j = row
            rules = ex.Rules(
                rules.order_value,
                rules.fee_rate,
                rules.slippage,
                rules.min_profit,
                rules.stop_loss,
                rules.min_price,
                rules.max_price,
                price_tick[j],
                price_decimals[j],
                amount_step[j],
                amount_decimals[j],
                min_amount[j],
                max_amount[j],
                min_cost[j],
            )
        bar = ex.Bar(
            close[t],
            entry[t],
            exit_signal[t],
            untradable[t],
            open_[t + 1],
            untradable[t + 1],
            ts[t + 1] - ts[t] == bar_ms,
        )
        state, event = ex.step(state, bar, rules)
        if event.kind == ex.NOTHING:
            continue
        if event.kind == ex.SKIPPED:
            skipped += 1
        elif event.rejected != ex.ACCEPTED:
            rejected = _record(rejected, r, t, int(event.kind == ex.SELL), event.rejected)
            r += 1
        elif event.kind == ex.BUY:
            t_entry[k], t_entry_price[k], t_amount[k] = t + 1, event.price, event.amount
            t_entry_fee[k] = event.fee
        else:
            t_exit[k], t_exit_price[k], t_exit_fee[k] = t + 1, event.price, event.fee
            t_reason[k], t_pnl[k] = event.reason, event.pnl
            k += 1
    if state.amount > 0.0 and m > 0:
        # Still open at the end of the window: sold at the last close, slippage and fee
        # included, so returns are realised and the trades add up to the equity curve.
        j = ex.rules_row(snapshot_days, ts[n - 1], j)
        price = ex.sell_price(close[n - 1], rules.slippage, price_tick[j], price_decimals[j])
        state, event = ex.sold(
            state, price, ex.fee_of(state.amount, price, rules.fee_rate), ex.EXIT_END
        )
        t_exit[k], t_exit_price[k], t_exit_fee[k] = n - 1, price, event.fee
        t_reason[k], t_pnl[k] = ex.EXIT_END, event.pnl
        k += 1
        equity[m - 1] = state.cash
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
        t_pnl[:k],
        rejected[:r],
        skipped,
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
    cost,
    pnl,
):
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
            # An end-of-window exit fills at its bar's close: that bar was held too.
            "bars_held": exit_bar - entry_bar + (reason == ex.EXIT_END),
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
    """Every metric from the equity curve (valued at each bar's close) and the trades."""
    fees = trades.get_column("entry_fee").sum() + trades.get_column("exit_fee").sum()
    return _metrics(
        capital,
        np.asarray(ts, dtype=np.int64),
        np.asarray(equity, dtype=np.float64),
        int(np.count_nonzero(in_position)),
        trades.get_column("pnl").to_numpy(),
        float(fees),
        bar_ms,
        buy_and_hold,
    )


@njit(cache=True, nogil=True)
def _equity_stats(ts, equity, capital, bar_ms):
    """One pass: max drawdown, longest time under water (ms) and each UTC day's last equity.

    Drawdowns run from the running peak, the starting capital included; time under water
    runs from the close of the last bar at a peak (or the window's start) to a bar's close.
    """
    n = len(equity)
    peak = capital
    peak_end = ts[0] if n else 0
    max_drawdown = 0.0
    underwater = 0
    day_end = np.empty(n)
    days = 0
    next_day = (ts[0] // DAY_MS + 1) * DAY_MS if n else 0
    for i in range(n):
        value = equity[i]
        if value >= peak:
            peak = value
            peak_end = ts[i] + bar_ms
        else:
            max_drawdown = max(max_drawdown, 1.0 - value / peak)
            underwater = max(underwater, ts[i] + bar_ms - peak_end)
        if i == n - 1 or ts[i + 1] >= next_day:
            day_end[days] = value
            days += 1
            if i < n - 1:
                next_day = (ts[i + 1] // DAY_MS + 1) * DAY_MS
    return max_drawdown, underwater, day_end[:days]


def _metrics(
    capital: float,
    ts: np.ndarray,
    equity: np.ndarray,
    bars_in_position: int,
    pnl: np.ndarray,
    fees: float,
    bar_ms: int,
    buy_and_hold: float,
) -> dict[str, float | int | str | None]:
    """Returns and drawdowns are fractions (0.1 = 10 %). Sharpe and Sortino are annualised
    from daily (UTC) returns with zero risk-free rate; NaN where a metric is undefined."""
    if not len(equity):
        empty = {"bars": 0, "trades": 0, "final_equity": capital, "fees": 0.0, "days": 0.0}
        return dict.fromkeys(METRICS, math.nan) | empty
    final = float(equity[-1])
    span_days = (int(ts[-1]) + bar_ms - int(ts[0])) / DAY_MS
    max_drawdown, underwater_ms, daily = _equity_stats(ts, equity, capital, bar_ms)
    daily_returns = np.diff(daily, prepend=capital) / np.concatenate(([capital], daily[:-1]))
    cagr = _cagr(final / capital, span_days)
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    downside = math.sqrt(np.mean(np.minimum(daily_returns, 0) ** 2))
    if losses.sum() < 0:
        profit_factor = float(wins.sum() / -losses.sum())
    else:
        profit_factor = math.inf if len(wins) else math.nan
    return {
        "total_return": final / capital - 1,
        "cagr": cagr,
        "max_drawdown": float(max_drawdown),
        "max_drawdown_days": underwater_ms / DAY_MS,
        "sharpe": _ratio(daily_returns.mean(), daily_returns.std(ddof=1) if len(daily) > 1 else 0),
        "sortino": _ratio(daily_returns.mean(), downside),
        "calmar": cagr / max_drawdown if max_drawdown > 0 else math.nan,
        "trades": len(pnl),
        "win_rate": len(wins) / len(pnl) if len(pnl) else math.nan,
        "profit_factor": profit_factor,
        "expectancy": float(pnl.mean()) if len(pnl) else math.nan,
        "exposure": bars_in_position / len(equity),
        "fees": fees,
        "buy_and_hold_return": buy_and_hold,
        "final_equity": final,
        "bars": len(equity),
        "days": span_days,
    }


def _cagr(growth: float, span_days: float) -> float:
    """Compound annual growth; NaN under MIN_CAGR_DAYS, where annualising a few days'
    return would print a meaningless (often astronomical) figure."""
    if span_days < MIN_CAGR_DAYS:
        return math.nan
    if growth <= 0:
        return -1.0
    return growth ** (365.25 / span_days) - 1


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


def _warm_up() -> None:
    """Compile every numba function of the engine into the on-disk cache (make setup runs
    this), so no backtest or dry-run decision pays numba's ~3 s of compile time."""
    ts = np.arange(4, dtype=np.int64) * MINUTE_MS
    bars = pl.DataFrame(
        {"ts": ts, "open": [100.0, 90.0, 120.0, 80.0], "close": [100.0, 90.0, 120.0, 80.0]}
    ).with_columns(pl.col("ts").cast(TS), high=pl.col("close"), low=pl.col("close"))
    config = StrategyConfig(name="warm_up", strategy="ma_cross", symbol="X/Y", timeframe="1m")
    rules = ex.RuleBook.constant(ex.MarketRules(amount_step=0.001, price_tick=0.01))
    entry, exit_ = np.array([True, False, False, False]), np.array([False, True, False, False])
    simulate(config, bars, ts, entry, exit_, rules)
    ex.fill_price(1.0, "buy", 0.0, ex.MarketRules(amount_step=0.001, price_tick=0.01))


if __name__ == "__main__":
    _warm_up()
