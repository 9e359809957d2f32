"""The execution engine by hand: every figure here can be checked with a pencil."""

import pytest

from candlestack.execution import (
    REJECT_MAX_AMOUNT,
    REJECT_MIN_AMOUNT,
    REJECT_MIN_COST,
    REJECTION_REASONS,
    MarketRules,
    buy_amount,
    ceil_to_step,
    fee,
    fill_price,
    floor_to_step,
    rejection,
)
from candlestack.sources.replay import read_exchange_info
from tests.conftest import EXCHANGE_INFO

BTC = MarketRules(
    amount_step=1e-6, price_tick=0.01, min_amount=1e-6, max_amount=9000.0, min_cost=10.0
)


@pytest.mark.parametrize(
    ("value", "step", "down", "up"),
    [
        (0.0123456789, 1e-5, 0.01234, 0.01235),
        (0.3, 0.1, 0.3, 0.3),  # 0.3 / 0.1 is 2.9999999999999996 in floats
        (0.7, 0.1, 0.7, 0.7),
        (27123.451, 0.01, 27123.45, 27123.46),
        (12.74, 0.5, 12.5, 13.0),
        (1260.0, 25.0, 1250.0, 1275.0),
        (999.9999999, 1e-6, 999.999999, 1000.0),
        (0.29999999999, 0.1, 0.2, 0.3),  # a real shortfall is not noise
    ],
)
def test_rounding_to_steps(value, step, down, up):
    assert floor_to_step(value, step) == down
    assert ceil_to_step(value, step) == up


def test_buy_fills_at_next_open_plus_slippage_rounded_up_to_the_tick():
    # 27,123.45 x 1.0005 = 27,137.011725 -> 27,137.02 (never better than the slippage)
    assert fill_price(27_123.45, "buy", 0.0005, BTC) == 27_137.02
    # 27,123.45 x 0.9995 = 27,109.888275 -> 27,109.88
    assert fill_price(27_123.45, "sell", 0.0005, BTC) == 27_109.88
    with pytest.raises(ValueError, match="side"):
        fill_price(1.0, "short", 0.0, BTC)


def test_amount_is_rounded_down_so_the_order_never_spends_more_than_its_value():
    price = 27_137.02
    amount = buy_amount(100.0, price, BTC)
    assert amount == 0.003685  # 100 / 27,137.02 = 0.00368500299...
    assert amount * price <= 100.0  # 99.99992 USDT
    assert fee(amount, price, 0.001) == pytest.approx(0.003685 * 27_137.02 * 0.001, rel=1e-15)


def test_orders_outside_the_rules_are_rejected_with_their_reason():
    assert rejection(0.0002, 27_000.0, BTC) == REJECTION_REASONS[REJECT_MIN_COST]  # 5.40 < 10 USDT
    assert rejection(0.0005, 27_000.0, BTC) == ""  # 13.50 >= 10
    assert rejection(0.0, 27_000.0, BTC) == REJECTION_REASONS[REJECT_MIN_AMOUNT]
    assert rejection(9_001.0, 27_000.0, BTC) == REJECTION_REASONS[REJECT_MAX_AMOUNT]


def test_rules_come_from_the_markets_of_the_day():
    markets = read_exchange_info(EXCHANGE_INFO)
    rules = MarketRules.from_markets(markets, "BTC/USDT")
    # Binance, 2021-03-24: LOT_SIZE 0.000001, PRICE_FILTER 0.01, MIN_NOTIONAL 10
    assert (rules.amount_step, rules.price_tick, rules.min_cost) == (1e-6, 0.01, 10.0)
    assert (
        rejection(buy_amount(9.99, 50_000.0, rules), 50_000.0, rules)
        == REJECTION_REASONS[REJECT_MIN_COST]
    )
    with pytest.raises(KeyError, match="DOGE/EUR"):
        MarketRules.from_markets(markets, "DOGE/EUR")


def test_one_order_as_the_dry_run_builds_it_matches_the_parts():
    """buy_order and sell_order are what the backtest loop and the dry-run both call."""
    from candlestack.execution import REJECT_BALANCE, buy_order, sell_order

    args = (0.0005, 0.001, BTC.price_tick, BTC.price_decimals, BTC.amount_step)
    limits = (BTC.amount_decimals, BTC.min_amount, BTC.max_amount, BTC.min_cost)
    price, amount, fee_paid, code = buy_order(27_123.45, 100.0, 1_000.0, *args, *limits)
    # 27,137.02 as above; 0.003685 x 27,137.02 = 99.9999187 notional, fee 0.0999999187.
    assert (price, amount, code) == (27_137.02, 0.003685, 0)
    assert fee_paid == pytest.approx(0.0999999187, rel=1e-12)
    # 99.9999187 + 0.0999999187 is more than 100 in cash: refused for balance.
    assert buy_order(27_123.45, 100.0, 100.0, *args, *limits)[3] == REJECT_BALANCE
    sold, sell_fee, sell_code = sell_order(
        27_123.45, 0.003685, 0.0005, 0.001, 0.01, 2, 1e-6, 9000.0, 10.0
    )
    assert (sold, sell_code) == (27_109.88, 0)
    assert sell_fee == pytest.approx(0.003685 * 27_109.88 * 0.001, rel=1e-12)
