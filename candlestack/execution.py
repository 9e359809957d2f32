"""The one execution engine: sizing, exchange rules, fills and fees for backtest and dry-run.

The kernels here are compiled with numba and called both from the backtest's loop over bars
(candlestack.backtest) and, one order at a time, from the dry-run: a second implementation
of any of them would be a bug.

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
  after both fees), checked in that order on each closed bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

import numpy as np
import polars as pl
from numba import njit

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


# --- compiled kernels (scalars; called from the backtest loop and the dry-run) -------------


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
        """The rules of one snapshot row (see backtest.rules_row for the row of a day)."""
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
