"""The one execution engine: sizing, exchange rules, fills and fees for backtest and dry-run.

Every function works on scalars and on numpy arrays alike, so the vectorised backtest and
the bar-by-bar dry-run call the very same code: a second implementation would be a bug.

Rules, long-only spot:
- a signal on the closed bar t fills at the open of bar t+1, moved against us by
  `slippage` (a fraction), then rounded to the price tick against us too (buys up,
  sells down);
- the amount is the order value divided by that price, rounded down to the lot step;
- an order under the minimum amount, over the maximum amount or under the minimum
  notional (min cost) is rejected, with its reason, and never filled;
- the fee is `fee_rate` of the filled notional, paid in quote currency on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import polars as pl

# Relative tolerance for float noise in value/step quotients (0.3 / 0.1 = 2.9999999999999996).
_QUOTIENT_TOLERANCE = 1e-12


@dataclass(frozen=True)
class MarketRules:
    """One market's rules on one day (a row of the `markets` asset)."""

    amount_step: float
    price_tick: float
    min_amount: float = 0.0
    max_amount: float = float("inf")
    min_cost: float = 0.0

    @classmethod
    def from_markets(cls, markets: pl.DataFrame, symbol: str) -> MarketRules:
        row = markets.filter(pl.col("symbol") == symbol)
        if row.is_empty():
            raise KeyError(f"no market rules for {symbol!r}")
        r = row.row(0, named=True)
        return cls(
            amount_step=r["amount_step"],
            price_tick=r["price_tick"],
            min_amount=r["min_amount"] or 0.0,
            max_amount=r["max_amount"] or float("inf"),
            min_cost=r["min_cost"] or 0.0,
        )


def _decimals(step: float) -> int:
    exponent = Decimal(repr(step)).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def floor_to_step(values, step: float):
    """Largest multiple of `step` not above each value (amounts, sell prices)."""
    quotient = np.asarray(values, dtype=np.float64) / step
    return np.round(np.floor(quotient * (1 + _QUOTIENT_TOLERANCE)) * step, _decimals(step))


def ceil_to_step(values, step: float):
    """Smallest multiple of `step` not below each value (buy prices)."""
    quotient = np.asarray(values, dtype=np.float64) / step
    return np.round(np.ceil(quotient * (1 - _QUOTIENT_TOLERANCE)) * step, _decimals(step))


def fill_price(open_price, side: str, slippage: float, rules: MarketRules):
    """The price a market order placed at the close of bar t gets at the open of bar t+1."""
    if side == "buy":
        return ceil_to_step(np.asarray(open_price) * (1 + slippage), rules.price_tick)
    if side == "sell":
        return floor_to_step(np.asarray(open_price) * (1 - slippage), rules.price_tick)
    raise ValueError(f"side must be 'buy' or 'sell', not {side!r}")


def buy_amount(order_value, price, rules: MarketRules):
    """Base amount bought for `order_value` quote at `price`, rounded down to the lot step."""
    return floor_to_step(np.asarray(order_value) / np.asarray(price), rules.amount_step)


REJECT_MIN_AMOUNT = "amount below the market's minimum"
REJECT_MAX_AMOUNT = "amount above the market's maximum"
REJECT_MIN_COST = "notional below the market's minimum (min cost)"


def rejection(amount, price, rules: MarketRules):
    """Why each order would be refused by the exchange, or "" when it is valid."""
    amount = np.asarray(amount, dtype=np.float64)
    notional = amount * np.asarray(price, dtype=np.float64)
    reasons = np.select(
        [
            amount < rules.min_amount,
            amount > rules.max_amount,
            notional < rules.min_cost,
        ],
        [REJECT_MIN_AMOUNT, REJECT_MAX_AMOUNT, REJECT_MIN_COST],
        default="",
    )
    return reasons.item() if reasons.ndim == 0 else reasons


def fee(amount, price, fee_rate: float):
    """Fee in quote currency on the filled notional."""
    return np.asarray(amount, dtype=np.float64) * np.asarray(price, dtype=np.float64) * fee_rate
