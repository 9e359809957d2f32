"""The one execution engine: sizing, exchange rules, fills and fees for backtest and dry-run.

`step` takes one closed bar's decision: explicit state in, state and event out (vectorbt's
`process_order_nb` is the model). It is compiled with numba and called on every bar by the
backtest's loop (candlestack.backtest) and, for the bar it decides, by the dry-run: a second
implementation of any of its rules would be a bug.

Rules, long-only spot:
- a signal on the closed bar t fills at the open of bar t+1, moved against us by
  `slippage` (a fraction), then rounded to the price tick against us too (buys up,
  sells down);
- the amount is the order value divided by that price, rounded down to the lot step;
- an order under the minimum amount, over the maximum amount or under the minimum
  notional (min cost) is rejected, with its reason, and never filled; so is a buy the
  cash cannot pay for (notional plus fee);
- the fee is `fee_rate` of the filled notional, paid in quote currency on both sides;
- a position is closed on an exit signal, a stop (close at or below entry price x
  (1 - stop_loss)) or a take-profit (selling at the close would net at least min_profit
  after both fees), checked in that order on each closed bar; an exit the exchange refuses
  is tried again on every bar until it fills; exits come before entries (one position);
- an entry needs its signal bar's close within [min_price, max_price]; the data policy then
  skips it when its bar or the bar it would fill on has an imputed or missing minute, or
  the fill bar is not the next period. Exits are never held back: getting out beats
  waiting for clean data.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import polars as pl
from numba import njit

from candlestack.schema import DAY_MS

# Relative tolerance for float noise in value/step quotients (0.3 / 0.1 = 2.9999999999999996).
_QUOTIENT_TOLERANCE = 1e-12

# Why an order was refused; the codes are what the compiled loop records.
ACCEPTED = 0
REJECT_MIN_AMOUNT = 1
REJECT_MAX_AMOUNT = 2
REJECT_MIN_COST = 3
REJECT_BALANCE = 4
REJECTION_REASONS = {
    REJECT_MIN_AMOUNT: "amount below the market's minimum",
    REJECT_MAX_AMOUNT: "amount above the market's maximum",
    REJECT_MIN_COST: "notional below the market's minimum (min cost)",
    REJECT_BALANCE: "not enough quote balance for notional plus fee",
}

# Why a position was closed.
NO_EXIT = 0
EXIT_SIGNAL = 1
EXIT_STOP = 2
EXIT_MIN_PROFIT = 3
EXIT_END = 4
EXIT_REASONS = {
    EXIT_SIGNAL: "exit_signal",
    EXIT_STOP: "stop_loss",
    EXIT_MIN_PROFIT: "min_profit",
    EXIT_END: "end_of_window",
}

# Why an entry was skipped by the data policy.
SKIP_BAR = 1
SKIP_FILL_BAR = 2
SKIP_NOT_NEXT = 3
SKIP_REASONS = {
    SKIP_BAR: "this bar has imputed or missing minutes",
    SKIP_FILL_BAR: "the next bar has imputed or missing minutes",
    SKIP_NOT_NEXT: "the next bar is not the next period",
}

# What a step did (Event.kind).
NOTHING = 0
BUY = 1  # an order was placed: filled, or refused (Event.rejected)
SELL = 2
SKIPPED = 3  # an entry held back by the data policy (Event.reason: a SKIP_ code)


@lru_cache(maxsize=256)
def step_decimals(step: float) -> int:
    """Decimal places of a step (0.01 -> 2), read from its shortest repr, not from floats."""
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


@dataclass(frozen=True)
class MarketRules:
    """One market's rules on one day (a row of the `markets` asset)."""

    amount_step: float
    price_tick: float
    min_amount: float = 0.0
    max_amount: float = float("inf")
    min_cost: float = 0.0

    @classmethod
    def from_row(cls, row: dict) -> MarketRules:
        return cls(
            amount_step=row["amount_step"],
            price_tick=row["price_tick"],
            min_amount=row["min_amount"] or 0.0,
            max_amount=row["max_amount"] or float("inf"),
            min_cost=row["min_cost"] or 0.0,
        )

    @classmethod
    def from_markets(cls, markets: pl.DataFrame, symbol: str) -> MarketRules:
        row = markets.filter(pl.col("symbol") == symbol)
        if row.is_empty():
            raise KeyError(f"no market rules for {symbol!r}")
        return cls.from_row(row.row(0, named=True))

    @property
    def amount_decimals(self) -> int:
        return step_decimals(self.amount_step)

    @property
    def price_decimals(self) -> int:
        return step_decimals(self.price_tick)


# --- the step's values (numba types them as named tuples) -----------------------------------


class State(NamedTuple):
    """A strategy's account between two bars."""

    cash: float
    amount: float  # base held; 0 when flat
    entry_price: float
    entry_fee: float
    refused_exit: int  # the exit the exchange refused (NO_EXIT: none), tried again


class Bar(NamedTuple):
    """The closed bar decided on and the bar its order would fill on."""

    close: float
    entry: bool
    exit: bool
    untradable: bool  # imputed or missing minutes
    next_open: float
    next_untradable: bool
    next_adjacent: bool  # the fill bar is the very next period


class Rules(NamedTuple):
    """A strategy's order rules and the market rules of the day its order fills."""

    order_value: float
    fee_rate: float
    slippage: float
    min_profit: float
    stop_loss: float
    min_price: float
    max_price: float
    price_tick: float
    price_decimals: int
    amount_step: float
    amount_decimals: int
    min_amount: float
    max_amount: float
    min_cost: float


class Event(NamedTuple):
    """What one step did: price, amount and fee of the order it placed (filled or not)."""

    kind: int  # NOTHING, BUY, SELL or SKIPPED
    reason: int  # SELL: the exit reason; SKIPPED: the SKIP_ code
    rejected: int  # BUY, SELL: ACCEPTED or why the order was refused
    price: float
    amount: float
    fee: float
    pnl: float  # a filled SELL: realised, after both fees


def rules_of(
    market: MarketRules,
    order_value: float,
    fee_rate: float,
    slippage: float,
    min_profit: float,
    stop_loss: float,
    min_price: float,
    max_price: float | None,
) -> Rules:
    """Rules with every field of the type the compiled step was cached for."""
    return Rules(
        float(order_value),
        float(fee_rate),
        float(slippage),
        float(min_profit),
        float(stop_loss),
        float(min_price),
        float(max_price) if max_price is not None else np.inf,
        float(market.price_tick),
        int(market.price_decimals),
        float(market.amount_step),
        int(market.amount_decimals),
        float(market.min_amount),
        float(market.max_amount),
        float(market.min_cost),
    )


# --- compiled kernels (called from the backtest loop and the dry-run) ----------------------


@njit(cache=True)
def _round(value: float, decimals: int) -> float:
    # What np.round does for one float (scale, rint, unscale), at a tenth of numba's compile
    # time for np.round itself.
    scale = 10.0**decimals
    return np.rint(value * scale) / scale


@njit(cache=True)
def floor_step(value: float, step: float, decimals: int) -> float:
    """Largest multiple of `step` not above `value`, exact to the step's decimals."""
    return _round(np.floor(value / step * (1 + _QUOTIENT_TOLERANCE)) * step, decimals)


@njit(cache=True)
def ceil_step(value: float, step: float, decimals: int) -> float:
    """Smallest multiple of `step` not below `value`, exact to the step's decimals."""
    return _round(np.ceil(value / step * (1 - _QUOTIENT_TOLERANCE)) * step, decimals)


@njit(cache=True)
def buy_price(open_next: float, slippage: float, tick: float, tick_decimals: int) -> float:
    return ceil_step(open_next * (1 + slippage), tick, tick_decimals)


@njit(cache=True)
def sell_price(open_next: float, slippage: float, tick: float, tick_decimals: int) -> float:
    return floor_step(open_next * (1 - slippage), tick, tick_decimals)


@njit(cache=True)
def order_amount(order_value: float, price: float, step: float, step_decimals: int) -> float:
    return floor_step(order_value / price, step, step_decimals)


@njit(cache=True)
def reject_code(
    amount: float, price: float, min_amount: float, max_amount: float, min_cost: float
) -> int:
    if amount < min_amount or amount <= 0.0:
        return REJECT_MIN_AMOUNT
    if amount > max_amount:
        return REJECT_MAX_AMOUNT
    if amount * price < min_cost:
        return REJECT_MIN_COST
    return ACCEPTED


@njit(cache=True)
def fee_of(amount: float, price: float, fee_rate: float) -> float:
    return amount * price * fee_rate


@njit(cache=True)
def exit_code(
    close: float,
    entry_price: float,
    exit_signal: bool,
    min_profit: float,
    stop_loss: float,
    fee_rate: float,
) -> int:
    """Why the position should be closed at this bar's close (NO_EXIT: keep it).

    min_profit and stop_loss are fractions; 0 switches either off.
    """
    if exit_signal:
        return EXIT_SIGNAL
    if stop_loss > 0.0 and close <= entry_price * (1.0 - stop_loss):
        return EXIT_STOP
    if min_profit > 0.0 and close * (1.0 - fee_rate) >= entry_price * (1.0 + fee_rate) * (
        1.0 + min_profit
    ):
        return EXIT_MIN_PROFIT
    return NO_EXIT


@njit(cache=True)
def buy_order(
    open_next: float,
    order_value: float,
    cash: float,
    slippage: float,
    fee_rate: float,
    price_tick: float,
    price_decimals: int,
    amount_step: float,
    amount_decimals: int,
    min_amount: float,
    max_amount: float,
    min_cost: float,
) -> tuple[float, float, float, int]:
    """(price, amount, fee, code) of a market buy for `order_value` filled at the next open;
    code is ACCEPTED or why the exchange, or the cash, refuses it."""
    price = buy_price(open_next, slippage, price_tick, price_decimals)
    amount = order_amount(order_value, price, amount_step, amount_decimals)
    code = reject_code(amount, price, min_amount, max_amount, min_cost)
    fee = fee_of(amount, price, fee_rate)
    if code == ACCEPTED and amount * price + fee > cash:
        code = REJECT_BALANCE
    return price, amount, fee, code


@njit(cache=True)
def sell_order(
    open_next: float,
    amount: float,
    slippage: float,
    fee_rate: float,
    price_tick: float,
    price_decimals: int,
    min_amount: float,
    max_amount: float,
    min_cost: float,
) -> tuple[float, float, int]:
    """(price, fee, code) of a market sell of the whole position filled at the next open."""
    price = sell_price(open_next, slippage, price_tick, price_decimals)
    return (
        price,
        fee_of(amount, price, fee_rate),
        reject_code(amount, price, min_amount, max_amount, min_cost),
    )


@njit(cache=True)
def sold(state: State, price: float, fee: float, reason: int) -> tuple[State, Event]:
    """The position sold at `price`: flat, the proceeds in cash, the PnL realised."""
    proceeds = state.amount * price - fee
    pnl = proceeds - (state.amount * state.entry_price + state.entry_fee)
    flat = State(state.cash + proceeds, 0.0, 0.0, 0.0, NO_EXIT)
    return flat, Event(SELL, reason, ACCEPTED, price, state.amount, fee, pnl)


@njit(cache=True, inline="always")
def idle(state: State, entry: bool) -> bool:
    """True when `step` does nothing whatever else the bar says: flat, no entry signal (most
    bars; the backtest's loop skips building them)."""
    return state.amount <= 0.0 and not entry


@njit(cache=True, inline="always")
def step(state: State, bar: Bar, rules: Rules) -> tuple[State, Event]:
    """One closed bar's decision, its order filled at the next open (the module's rules)."""
    nothing = Event(NOTHING, 0, ACCEPTED, 0.0, 0.0, 0.0, 0.0)
    if idle(state, bar.entry):
        return state, nothing
    if state.amount > 0.0:
        reason = exit_code(
            bar.close,
            state.entry_price,
            bar.exit,
            rules.min_profit,
            rules.stop_loss,
            rules.fee_rate,
        )
        if reason == NO_EXIT:
            reason = state.refused_exit
        if reason == NO_EXIT:
            return state, nothing
        price, fee, code = sell_order(
            bar.next_open,
            state.amount,
            rules.slippage,
            rules.fee_rate,
            rules.price_tick,
            rules.price_decimals,
            rules.min_amount,
            rules.max_amount,
            rules.min_cost,
        )
        if code != ACCEPTED:
            held = State(state.cash, state.amount, state.entry_price, state.entry_fee, reason)
            return held, Event(SELL, reason, code, price, state.amount, fee, 0.0)
        return sold(state, price, fee, reason)
    if not rules.min_price <= bar.close <= rules.max_price:
        return state, nothing
    skip = 0
    if bar.untradable:
        skip = SKIP_BAR
    elif bar.next_untradable:
        skip = SKIP_FILL_BAR
    elif not bar.next_adjacent:
        skip = SKIP_NOT_NEXT
    if skip:
        return state, Event(SKIPPED, skip, ACCEPTED, 0.0, 0.0, 0.0, 0.0)
    price, amount, fee, code = buy_order(
        bar.next_open,
        rules.order_value,
        state.cash,
        rules.slippage,
        rules.fee_rate,
        rules.price_tick,
        rules.price_decimals,
        rules.amount_step,
        rules.amount_decimals,
        rules.min_amount,
        rules.max_amount,
        rules.min_cost,
    )
    event = Event(BUY, 0, code, price, amount, fee, 0.0)
    if code != ACCEPTED:
        return state, event
    return State(state.cash - (amount * price + fee), amount, price, fee, NO_EXIT), event


@njit(cache=True, inline="always")
def rules_row(snapshot_days, fill_ts, row):
    """Row of the rules of the day an order fills: the latest snapshot on or before it (the
    first one before any), searched from `row` (the loop's last row; the dry-run passes the
    newest: orders fill mostly on recent days, and numba's np.searchsorted costs 0.4 s of
    compile time)."""
    # In ms, not days: no division on the loop's every bar.
    while row + 1 < len(snapshot_days) and snapshot_days[row + 1] * DAY_MS <= fill_ts:
        row += 1
    while row > 0 and snapshot_days[row] * DAY_MS > fill_ts:
        row -= 1
    return row


# --- Python conveniences over the kernels (one order: tests, dry-run, reports) -----------


def floor_to_step(value: float, step: float) -> float:
    """Largest multiple of `step` not above `value` (amounts, sell prices)."""
    return float(floor_step(float(value), step, step_decimals(step)))


def ceil_to_step(value: float, step: float) -> float:
    """Smallest multiple of `step` not below `value` (buy prices)."""
    return float(ceil_step(float(value), step, step_decimals(step)))


def fill_price(open_price: float, side: str, slippage: float, rules: MarketRules) -> float:
    """The price a market order placed at the close of bar t gets at the open of bar t+1."""
    if side == "buy":
        return float(buy_price(open_price, slippage, rules.price_tick, rules.price_decimals))
    if side == "sell":
        return float(sell_price(open_price, slippage, rules.price_tick, rules.price_decimals))
    raise ValueError(f"side must be 'buy' or 'sell', not {side!r}")


def buy_amount(order_value: float, price: float, rules: MarketRules) -> float:
    """Base amount bought for `order_value` quote at `price`, rounded down to the lot step."""
    return float(order_amount(order_value, price, rules.amount_step, rules.amount_decimals))


def rejection(amount: float, price: float, rules: MarketRules) -> str:
    """Why the exchange would refuse this order, or "" when it is valid."""
    code = reject_code(amount, price, rules.min_amount, rules.max_amount, rules.min_cost)
    return REJECTION_REASONS.get(code, "")


def fee(amount: float, price: float, fee_rate: float) -> float:
    """Fee in quote currency on the filled notional."""
    return float(fee_of(amount, price, fee_rate))


@dataclass(frozen=True)
class RuleBook:
    """A market's rules by UTC day, as arrays the compiled loop reads for the day an order fills.

    Each day takes the rules of the latest snapshot on or before it; days before the first
    snapshot take the first one (history predates the snapshots we keep; the README says so).
    """

    snapshot_days: np.ndarray  # epoch days of the snapshots, ascending
    amount_step: np.ndarray
    amount_decimals: np.ndarray
    price_tick: np.ndarray
    price_decimals: np.ndarray
    min_amount: np.ndarray
    max_amount: np.ndarray
    min_cost: np.ndarray

    @classmethod
    def of(cls, days: list[int], rules: list[MarketRules]) -> RuleBook:
        if not rules:
            raise ValueError("a rule book needs at least one day of market rules")
        return cls(
            snapshot_days=np.asarray(days, dtype=np.int64),
            amount_step=np.array([r.amount_step for r in rules]),
            amount_decimals=np.array([r.amount_decimals for r in rules], dtype=np.int64),
            price_tick=np.array([r.price_tick for r in rules]),
            price_decimals=np.array([r.price_decimals for r in rules], dtype=np.int64),
            min_amount=np.array([r.min_amount for r in rules]),
            max_amount=np.array([r.max_amount for r in rules]),
            min_cost=np.array([r.min_cost for r in rules]),
        )

    def at(self, row: int) -> MarketRules:
        """The rules of one snapshot row (see rules_row for the row of a day)."""
        return MarketRules(
            amount_step=float(self.amount_step[row]),
            price_tick=float(self.price_tick[row]),
            min_amount=float(self.min_amount[row]),
            max_amount=float(self.max_amount[row]),
            min_cost=float(self.min_cost[row]),
        )

    @classmethod
    def constant(cls, rules: MarketRules) -> RuleBook:
        return cls.of([0], [rules])

    @classmethod
    def from_snapshots(cls, snapshots: pl.DataFrame, symbol: str) -> RuleBook:
        """From `markets` rows with a `date` column (one snapshot a day)."""
        rows = snapshots.filter(pl.col("symbol") == symbol).sort("date")
        if rows.is_empty():
            raise KeyError(f"no market rules for {symbol!r} in any markets snapshot")
        epoch_days = rows.get_column("date").cast(pl.Int64).to_list()
        return cls.of(epoch_days, [MarketRules.from_row(r) for r in rows.iter_rows(named=True)])
