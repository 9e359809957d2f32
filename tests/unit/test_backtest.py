"""The backtest engine by hand: every figure here can be checked with a pencil.

The bars are tiny and made up; the signals are explicit boolean arrays given to simulate(),
so what is tested is the engine (fills, sizing, fees, rules, data policy, bookkeeping,
metrics) and not a strategy. One test replays a month of real BTC/USDT minutes and re-derives
the equity curve from the trades alone.
"""

import math
from datetime import UTC, date, datetime

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from candlestack.backtest import backtest, compute_metrics, simulate
from candlestack.execution import MarketRules, RuleBook
from candlestack.schema import DAY_MS, MINUTE_MS, TS
from candlestack.sources.replay import read_candle_file, read_exchange_info
from candlestack.strategies.config import StrategyConfig
from tests.conftest import EXCHANGE_INFO, REPLAY_FILES

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, epoch ms
HOUR_MS = 60 * MINUTE_MS
RULES = RuleBook.constant(
    MarketRules(amount_step=0.001, price_tick=0.01, min_amount=0.001, min_cost=10.0)
)
MIN_COST = "notional below the market's minimum (min cost)"
MIN_AMOUNT = "amount below the market's minimum"
BALANCE = "not enough quote balance for notional plus fee"


def config(**changes) -> StrategyConfig:
    """10,000 USDT, 1,000 per entry, 0.1 % fee, 5 bp slippage (the strategy is not used by
    simulate(): the signals are given)."""
    settings = {
        "name": "by_hand",
        "strategy": "ma_cross",
        "symbol": "BTC/USDT",
        "timeframe": "1m",
        "capital": 10_000.0,
        "order_value": 1_000.0,
        "fee": 0.001,
        "slippage": 0.0005,
    }
    return StrategyConfig(**(settings | changes))


def minute(i: int, step_ms: int = MINUTE_MS) -> int:
    """Open time (epoch ms) of bar i."""
    return T0 + i * step_ms


def minute_bars(prices, imputed=(), step_ms=MINUTE_MS, start=T0) -> pl.DataFrame:
    """1m bars from (open, close) pairs; high and low span them; rows in `imputed` imputed."""
    opens = [float(o) for o, _ in prices]
    closes = [float(c) for _, c in prices]
    return pl.DataFrame(
        {
            "ts": [start + i * step_ms for i in range(len(prices))],
            "open": opens,
            "high": [max(o, c) for o, c in zip(opens, closes, strict=True)],
            "low": [min(o, c) for o, c in zip(opens, closes, strict=True)],
            "close": closes,
            "volume": [1.0] * len(prices),
            "imputed": [i in imputed for i in range(len(prices))],
        }
    ).with_columns(pl.col("ts").cast(TS))


def resampled_bars(prices, n_imputed, complete, ts_rows=None, step_ms=15 * MINUTE_MS):
    """Resampled bars (n_imputed, complete); `ts_rows` places rows at bar numbers (gaps)."""
    rows = ts_rows if ts_rows is not None else range(len(prices))
    bars = minute_bars(prices).drop("imputed")
    return bars.with_columns(
        pl.Series("ts", [T0 + i * step_ms for i in rows]).cast(TS),
        n_imputed=pl.Series(n_imputed, dtype=pl.Int64),
        complete=pl.Series(complete, dtype=pl.Boolean),
    )


def flags(n: int, rows) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(rows)] = True
    return out


def run(cfg, bars, entries=(), exits=(), first=0, rules=RULES):
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    return simulate(
        cfg, bars, ts, flags(bars.height, entries), flags(bars.height, exits), rules, first
    )


def ms(column: pl.Series) -> list[int]:
    return column.dt.epoch("ms").to_list()


def assert_same_metrics(left: dict, right: dict) -> None:
    """Equal metrics, NaN equal to NaN (undefined in both)."""
    assert left.keys() == right.keys()
    for name, value in left.items():
        other = right[name]
        assert value == other or (math.isnan(value) and math.isnan(other)), name


# --- fills, sizing, fees --------------------------------------------------------------------


def test_a_round_trip_fills_next_open_with_slippage_ticks_lots_and_fees():
    bars = minute_bars(
        [
            (100.00, 100.50),  # 0: entry signal at this close
            (101.23, 102.00),  # 1: bought at this open
            (102.00, 104.00),  # 2: exit signal at this close
            (105.67, 105.00),  # 3: sold at this open
            (105.00, 106.00),  # 4
        ]
    )
    result = run(config(), bars, entries=[0], exits=[2])
    (trade,) = result.trades.iter_rows(named=True)

    # Buy: 101.23 x 1.0005 = 101.280615 -> up to the tick: 101.29.
    assert trade["entry_price"] == 101.29
    # 1,000 / 101.29 = 9.8726...; down to the 0.001 lot: 9.872 (9.873 would cost 1,000.04).
    assert trade["amount"] == 9.872
    # Entry notional 9.872 x 101.29 = 999.93488; fee 0.1 % = 0.99993488.
    assert trade["entry_fee"] == pytest.approx(0.99993488, rel=1e-12)
    # Sell: 105.67 x 0.9995 = 105.617165 -> down to the tick: 105.61.
    assert trade["exit_price"] == 105.61
    # Exit notional 9.872 x 105.61 = 1,042.58192; fee 1.04258192.
    assert trade["exit_fee"] == pytest.approx(1.04258192, rel=1e-12)
    # pnl = 1,042.58192 - 1.04258192 - 999.93488 - 0.99993488 = 40.6045232
    assert trade["pnl"] == pytest.approx(40.6045232, rel=1e-12)
    # return = pnl / entry cost with fee = 40.6045232 / 1,000.93481488
    assert trade["return"] == pytest.approx(40.6045232 / 1000.93481488, rel=1e-12)
    assert trade["exit_reason"] == "exit_signal"
    assert trade["bars_held"] == 2  # bought at the open of bar 1, sold at the open of bar 3
    assert trade["trade"] == 1
    row = result.trades.select(pl.col("^.*_ts$").dt.epoch("ms")).row(0, named=True)
    assert row == {
        "entry_signal_ts": minute(0),
        "entry_ts": minute(1),
        "exit_signal_ts": minute(2),
        "exit_ts": minute(3),
    }

    # Equity at each close: cash after the entry 10,000 - 1,000.93481488 = 8,999.06518512.
    assert ms(result.equity["ts"]) == [minute(i) for i in range(5)]
    assert result.equity["equity"].to_list() == pytest.approx(
        [
            10_000.0,
            8_999.06518512 + 9.872 * 102.0,  # 10,006.00918512
            8_999.06518512 + 9.872 * 104.0,  # 10,025.75318512
            10_040.6045232,  # capital + pnl, flat
            10_040.6045232,
        ],
        rel=1e-12,
    )
    assert result.equity["in_position"].to_list() == [False, True, True, False, False]
    metrics = result.metrics
    assert metrics["final_equity"] == pytest.approx(10_000 + 40.6045232, rel=1e-12)
    assert metrics["fees"] == pytest.approx(0.99993488 + 1.04258192, rel=1e-12)
    assert metrics["trades"] == 1
    assert metrics["exposure"] == 2 / 5
    assert metrics["rejected_orders"] == 0
    assert metrics["skipped_entries"] == 0
    assert result.rejections.is_empty()


def test_an_entry_signal_on_the_last_bar_is_not_filled():
    bars = minute_bars([(100, 100), (100, 101), (101, 102)])
    result = run(config(), bars, entries=[2])
    assert result.trades.is_empty()
    assert result.rejections.is_empty()
    assert result.equity["equity"].to_list() == [10_000.0] * 3
    assert result.metrics["final_equity"] == 10_000.0
    assert result.metrics["exposure"] == 0.0
    # The data is clean: nothing is counted as skipped for imputed or incomplete bars.
    assert result.metrics["skipped_entries"] == 0


def test_a_position_open_at_the_end_is_sold_at_the_last_close():
    bars = minute_bars([(100, 100), (100, 101), (101, 102), (102, 104)])
    result = run(config(), bars, entries=[0])
    (trade,) = result.trades.iter_rows(named=True)
    # Buy: 100 x 1.0005 = 100.05 (on the tick); 1,000 / 100.05 = 9.995002... -> 9.995.
    assert (trade["entry_price"], trade["amount"]) == (100.05, 9.995)
    # Sold at the last close: 104 x 0.9995 = 103.948 -> 103.94.
    assert trade["exit_price"] == 103.94
    assert trade["exit_reason"] == "end_of_window"
    assert ms(result.trades["exit_signal_ts"]) == ms(result.trades["exit_ts"]) == [minute(3)]
    # Fees: 9.995 x 100.05 = 999.99975 -> 0.99999975; 9.995 x 103.94 = 1,038.8803 -> 1.0388803.
    assert trade["exit_fee"] == pytest.approx(1.0388803, rel=1e-12)
    # pnl = 1,038.8803 - 1.0388803 - 999.99975 - 0.99999975 = 36.84166995
    assert trade["pnl"] == pytest.approx(36.84166995, rel=1e-12)
    # The last bar's equity is the realised cash, still shown as in a position.
    assert result.equity["equity"][-1] == pytest.approx(10_036.84166995, rel=1e-12)
    assert result.equity["in_position"].to_list() == [False, True, True, True]
    assert result.metrics["final_equity"] == pytest.approx(10_036.84166995, rel=1e-12)


def test_bars_held_of_a_position_closed_at_the_end_counts_every_bar_held():
    bars = minute_bars([(100, 100), (100, 101), (101, 102), (102, 104)])
    result = run(config(), bars, entries=[0])
    assert result.equity["in_position"].sum() == 3  # bars 1, 2 and 3
    assert result.trades["bars_held"].to_list() == [3]


def test_each_order_follows_the_rules_of_the_day_it_fills():
    day = T0 // DAY_MS  # 2024-01-01; the day before keeps the 0.01 tick and 0.001 lot
    rules = RuleBook.of(
        [day - 1, day],
        [
            MarketRules(amount_step=0.001, price_tick=0.01, min_amount=0.001, min_cost=10.0),
            MarketRules(amount_step=0.01, price_tick=0.1, min_amount=0.01, min_cost=10.0),
        ],
    )
    # 23:58, 23:59 on Dec 31, then 00:00 and 00:01 on Jan 1; the signal at 23:59.
    bars = minute_bars([(100, 100)] * 4, start=T0 - 2 * MINUTE_MS)
    result = run(config(), bars, entries=[1], rules=rules)
    (trade,) = result.trades.iter_rows(named=True)
    # Filled on Jan 1: 100 x 1.0005 = 100.05 -> up to a 0.1 tick: 100.1 (not 100.05);
    # 1,000 / 100.1 = 9.99000999 -> down to a 0.01 lot: 9.99 (not 9.995).
    assert (trade["entry_price"], trade["amount"]) == (100.1, 9.99)
    # Sold at the last close: 100 x 0.9995 = 99.95 -> down to a 0.1 tick: 99.9.
    assert trade["exit_price"] == 99.9


# --- order rejections -----------------------------------------------------------------------


def test_an_order_under_the_minimum_notional_is_rejected_and_never_filled():
    bars = minute_bars([(100, 100)] * 4)
    result = run(config(order_value=5.0), bars, entries=[1])
    # 5 / 100.05 = 0.04997... -> 0.049; notional 0.049 x 100.05 = 4.90 < 10 USDT.
    assert result.trades.is_empty()
    assert result.rejections.to_dicts() == [
        {"signal_ts": datetime(2024, 1, 1, 0, 1, tzinfo=UTC), "side": "buy", "reason": MIN_COST}
    ]
    assert result.metrics["rejected_orders"] == 1
    assert result.metrics["final_equity"] == 10_000.0
    assert result.metrics["fees"] == 0.0


def test_every_rejection_is_kept_however_many():
    bars = minute_bars([(100, 100)] * 101)
    # A 5 USDT order on every one of the first 100 bars (the 101st has no next bar).
    result = run(config(order_value=5.0), bars, entries=range(101))
    assert result.rejections.height == result.metrics["rejected_orders"] == 100
    assert ms(result.rejections["signal_ts"]) == [minute(i) for i in range(100)]
    assert set(result.rejections["side"]) == {"buy"}
    assert set(result.rejections["reason"]) == {MIN_COST}


def test_an_amount_that_rounds_to_nothing_is_rejected_under_the_minimum_amount():
    bars = minute_bars([(100_000, 100_000)] * 3)
    # 50 / 100,050 = 0.0004997 -> 0.000 at a 0.001 lot.
    result = run(config(order_value=50.0), bars, entries=[0])
    assert result.trades.is_empty()
    assert result.rejections["reason"].to_list() == [MIN_AMOUNT]


def test_a_buy_the_cash_cannot_pay_for_is_rejected_for_balance():
    bars = minute_bars(
        [
            (100, 100),  # 0: entry signal
            (100, 95),  # 1: bought 9.9 at 100; exit signal
            (90, 100),  # 2: sold 9.9 at 90; entry signal
            (100, 100),  # 3: the second buy would fill here
            (100, 100),
        ]
    )
    cfg = config(capital=1_000.0, order_value=990.0, slippage=0.0)  # 990 x 1.001 <= 1,000
    result = run(cfg, bars, entries=[0, 2], exits=[1])
    # Cash: 1,000 - 990 - 0.99 = 9.01; + 891 - 0.891 = 899.119 after the sale.
    # The second buy needs 9.9 x 100 + 0.99 = 990.99 > 899.119.
    assert result.trades["pnl"].to_list() == pytest.approx([891 - 0.891 - 990 - 0.99])
    assert result.rejections.to_dicts() == [
        {"signal_ts": datetime(2024, 1, 1, 0, 2, tzinfo=UTC), "side": "buy", "reason": BALANCE}
    ]
    assert result.metrics["rejected_orders"] == 1
    assert result.metrics["final_equity"] == pytest.approx(899.119, rel=1e-12)


def test_a_refused_sell_is_retried_on_every_bar_until_it_fills():
    bars = minute_bars([(100, 100), (100, 99), (99, 99), (99, 101), (101, 101)])
    cfg = config(order_value=10.0, slippage=0.0)
    result = run(cfg, bars, entries=[0], exits=[1])
    # Bought 10 / 100 = 0.1 at 100 (notional exactly 10: accepted).
    # Exit signal on bar 1: selling 0.1 at bar 2's open 99 = 9.90 < 10, refused; tried again
    # on bar 2 (bar 3 opens at 99: refused) and bar 3 (bar 4 opens at 101: 10.10, filled).
    assert result.rejections.to_dicts() == [
        {"signal_ts": datetime(2024, 1, 1, 0, 1, tzinfo=UTC), "side": "sell", "reason": MIN_COST},
        {"signal_ts": datetime(2024, 1, 1, 0, 2, tzinfo=UTC), "side": "sell", "reason": MIN_COST},
    ]
    (trade,) = result.trades.iter_rows(named=True)
    assert (trade["amount"], trade["exit_price"], trade["exit_reason"]) == (
        0.1,
        101.0,
        "exit_signal",
    )
    assert trade["exit_ts"] == datetime(2024, 1, 1, 0, 4, tzinfo=UTC)
    # pnl = 10.1 - 0.0101 - 10 - 0.01 = 0.0799
    assert trade["pnl"] == pytest.approx(0.0799, rel=1e-9)
    assert result.equity["in_position"].to_list() == [False, True, True, True, False]
    assert result.metrics["rejected_orders"] == 2


# --- data policy: imputed and incomplete bars -------------------------------------------------


def test_entries_are_skipped_on_imputed_minutes_and_before_them():
    bars = minute_bars([(100, 100)] * 6, imputed={1})
    # Signal 0: its fill bar (1) is imputed. Signal 1: the signal bar is imputed.
    # Signal 3: clean bar, clean fill bar (4): taken.
    result = run(config(slippage=0.0), bars, entries=[0, 1, 3])
    assert result.metrics["skipped_entries"] == 2
    assert ms(result.trades["entry_signal_ts"]) == [minute(3)]
    assert ms(result.trades["entry_ts"]) == [minute(4)]
    assert result.rejections.is_empty()


def test_entries_are_skipped_around_resampled_bars_with_imputed_or_missing_minutes():
    prices = [(100, 100)] * 7
    n_imputed = [0, 1, 0, 0, 0, 0, 0]  # bar 1 has an imputed minute
    complete = [True, True, True, False, True, True, True]  # bar 3 lacks a minute
    bars = resampled_bars(prices, n_imputed, complete)
    result = run(config(timeframe="15m", slippage=0.0), bars, entries=[0, 2, 4])
    # 0 would fill on bar 1 (imputed), 2 on bar 3 (incomplete); 4 fills on bar 5.
    assert result.metrics["skipped_entries"] == 2
    assert ms(result.trades["entry_ts"]) == [minute(5, 15 * MINUTE_MS)]


def test_an_entry_whose_fill_bar_is_missing_entirely_is_skipped():
    # 15m bars at 00:00, 00:15, then 01:00 (00:30 and 00:45 have no minute at all).
    bars = resampled_bars(
        [(100, 100), (100, 100), (120, 120), (120, 120)],
        n_imputed=[0, 0, 0, 0],
        complete=[True, True, True, True],
        ts_rows=[0, 1, 4, 5],
    )
    result = run(config(timeframe="15m", slippage=0.0), bars, entries=[1])
    assert result.trades.is_empty()
    assert result.metrics["skipped_entries"] == 1


def test_an_entry_before_a_missing_minute_is_skipped():
    # 1m bars 00:00 to 00:04 without 00:02: the signal at 00:01 would fill at 00:03.
    bars = minute_bars([(100, 100)] * 5).filter(pl.col("ts").dt.minute() != 2)
    result = run(config(slippage=0.0), bars, entries=[1])
    assert result.trades.is_empty()
    assert result.metrics["skipped_entries"] == 1


def test_entry_signals_while_holding_are_not_counted_as_skipped():
    bars = minute_bars([(100, 100)] * 5, imputed={2, 3})
    # Bought at bar 1 on the signal of bar 0; the signals of imputed bars 2 and 3 come while
    # the position is held, so bad data took nothing away.
    result = run(config(slippage=0.0), bars, entries=[0, 2, 3])
    assert ms(result.trades["entry_ts"]) == [minute(1)]
    assert result.metrics["skipped_entries"] == 0


def test_exits_are_not_held_back_by_imputed_bars():
    bars = minute_bars([(100, 100), (100, 100), (100, 100), (99, 99), (98, 98), (97, 97)], {3, 4})
    result = run(config(slippage=0.0), bars, entries=[0], exits=[3])
    # Exit signal on imputed bar 3, sold at the (imputed) open of bar 4.
    assert ms(result.trades["exit_ts"]) == [minute(4)]
    assert result.trades["exit_price"].to_list() == [98.0]
    assert result.trades["exit_reason"].to_list() == ["exit_signal"]
    assert result.metrics["skipped_entries"] == 0


# --- price band -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signal_close", "traded"),
    [(99.99, False), (100.0, True), (150.0, True), (200.0, True), (200.01, False)],
)
def test_entries_only_inside_the_price_band(signal_close, traded):
    bars = minute_bars([(150, signal_close), (150, 150), (150, 150)])
    result = run(config(min_price=100.0, max_price=200.0), bars, entries=[0])
    assert result.trades.height == int(traded)
    # Out of band is a rule, not a data problem nor an exchange rejection.
    assert result.metrics["skipped_entries"] == 0
    assert result.metrics["rejected_orders"] == 0


# --- stop loss and take profit --------------------------------------------------------------


def test_stop_loss_exits_on_the_first_close_at_or_below_the_stop():
    bars = minute_bars(
        [
            (100, 100),  # 0: entry signal
            (100, 97),  # 1: bought at 100 x 1.0005 = 100.05; stop at 100.05 x 0.95 = 95.0475
            (97, 95.05),  # 2: above the stop
            (95.05, 95.04),  # 3: below: stop
            (94, 94),  # 4: sold at 94 x 0.9995 = 93.953 -> 93.95
            (94, 94),
        ]
    )
    result = run(config(stop_loss=0.05), bars, entries=[0])
    (trade,) = result.trades.iter_rows(named=True)
    assert trade["exit_reason"] == "stop_loss"
    assert ms(result.trades["exit_signal_ts"]) == [minute(3)]
    assert ms(result.trades["exit_ts"]) == [minute(4)]
    assert trade["exit_price"] == 93.95


def test_an_exit_signal_wins_over_a_stop_on_the_same_bar():
    bars = minute_bars([(100, 100), (100, 97), (97, 90), (90, 90)])
    result = run(config(stop_loss=0.05), bars, entries=[0], exits=[2])
    assert result.trades["exit_reason"].to_list() == ["exit_signal"]


def test_min_profit_exits_once_selling_at_the_close_nets_the_target_after_both_fees():
    bars = minute_bars(
        [
            (100, 100),  # 0: entry signal
            (100, 101.25),  # 1: bought at 100.05; 101.25 x 0.999 = 101.14875: short
            (101.25, 101.26),  # 2: 101.26 x 0.999 = 101.15874: reached
            (101.5, 101.5),  # 3: sold at 101.5 x 0.9995 = 101.44925 -> 101.44
            (101, 101),
        ]
    )
    # Target: 100.05 x 1.001 x 1.01 = 101.1515505 net of the sell fee.
    result = run(config(min_profit=0.01), bars, entries=[0])
    (trade,) = result.trades.iter_rows(named=True)
    assert trade["exit_reason"] == "min_profit"
    assert ms(result.trades["exit_signal_ts"]) == [minute(2)]
    assert ms(result.trades["exit_ts"]) == [minute(3)]
    assert trade["exit_price"] == 101.44


# --- one position at a time -----------------------------------------------------------------


def test_one_position_at_a_time_and_no_reentry_on_the_exit_fill_bar():
    bars = minute_bars([(100, 100)] * 7)
    # Entry signals on every bar from 0 to 4; exit signal on bar 2.
    result = run(config(slippage=0.0), bars, entries=[0, 1, 2, 3, 4], exits=[2])
    # 0 fills at 1; 1 and 2 are ignored (holding; 2 would fill on bar 3, where the exit fills);
    # 3 fills at 4; 4 is ignored; the second position closes at the end (bar 6).
    assert ms(result.trades["entry_ts"]) == [minute(1), minute(4)]
    assert ms(result.trades["exit_ts"]) == [minute(3), minute(6)]
    assert result.trades["exit_reason"].to_list() == ["exit_signal", "end_of_window"]
    assert result.rejections.is_empty()
    assert result.metrics["skipped_entries"] == 0


# --- metrics --------------------------------------------------------------------------------

# Four UTC days of 12-hour bars, capital 1,000; the day ends are bars 1, 3, 5 and 7.
HALF_DAY_MS = 12 * HOUR_MS
PATH_TS = np.array([T0 + i * HALF_DAY_MS for i in range(8)], dtype=np.int64)
PATH = np.array([1_020.0, 1_100.0, 1_050.0, 990.0, 1_000.0, 1_089.0, 1_200.0, 1_306.8])
HELD = np.array([False, True, True, False, True, True, True, False])
PATH_TRADES = pl.DataFrame(
    {"pnl": [30.0, -10.0, 20.0, 0.0], "entry_fee": [1.0] * 4, "exit_fee": [0.5] * 4}
)


def test_metrics_by_hand_on_a_four_day_path():
    m = compute_metrics(1_000.0, PATH_TS, PATH, HELD, PATH_TRADES, HALF_DAY_MS, 0.25)
    assert m["bars"] == 8
    assert m["total_return"] == pytest.approx(0.3068, rel=1e-12)
    assert m["final_equity"] == 1_306.8
    # Peak 1,100 (bar 1) to trough 990 (bar 3): 10 %.
    assert m["max_drawdown"] == pytest.approx(0.1, rel=1e-12)
    # Under water from the close of bar 1 (day 1 00:00) to the close of bar 5 (day 3 00:00).
    assert m["max_drawdown_days"] == 2.0
    # Span: first open to last close, 8 x 12 h = 4 days.
    assert m["days"] == 4.0
    # Four days are too few to annualise: CAGR and Calmar are undefined, not astronomical.
    assert math.isnan(m["cagr"]) and math.isnan(m["calmar"])
    # Daily returns: 1,100 / 1,000 (capital), 990 / 1,100, 1,089 / 990, 1,306.8 / 1,089:
    # +10 %, -10 %, +10 %, +20 %; mean 0.075.
    # Sample variance: (0.025² + 0.175² + 0.025² + 0.125²) / 3 = 0.0475 / 3.
    assert m["sharpe"] == pytest.approx(0.075 / math.sqrt(0.0475 / 3) * math.sqrt(365), rel=1e-9)
    # Downside deviation: sqrt((0 + 0.1² + 0 + 0) / 4) = 0.05.
    assert m["sortino"] == pytest.approx(0.075 / 0.05 * math.sqrt(365), rel=1e-9)
    # Trades: two wins (30, 20), a loss (-10) and a flat one (0, not a win).
    assert m["trades"] == 4
    assert m["win_rate"] == 0.5
    assert m["profit_factor"] == pytest.approx(50 / 10)
    assert m["expectancy"] == pytest.approx(40 / 4)
    assert m["fees"] == pytest.approx(4 * 1.5)
    assert m["exposure"] == 5 / 8
    assert m["buy_and_hold_return"] == 0.25  # passed through


def test_cagr_and_calmar_annualise_windows_of_thirty_days_or_more():
    # 60 daily bars: 1,000 -> 1,200 (peak) -> 1,080 (-10 %) -> 1,100 at the end.
    ts = np.array([T0 + i * DAY_MS for i in range(60)], dtype=np.int64)
    path = np.full(60, 1_100.0)
    path[20], path[30] = 1_200.0, 1_080.0
    m = compute_metrics(1_000.0, ts, path, np.ones(60, bool), PATH_TRADES, DAY_MS, 0.0)
    assert m["days"] == 60.0
    cagr = 1.1 ** (365.25 / 60) - 1  # 78.5 %
    assert m["cagr"] == pytest.approx(cagr, rel=1e-12)
    assert m["calmar"] == pytest.approx(cagr / 0.1, rel=1e-12)


def test_the_drawdown_peak_includes_the_starting_capital():
    # 1,000 -> 900 on the first bar is a 10 % drawdown though no bar was higher before.
    m = compute_metrics(
        1_000.0,
        PATH_TS[:3],
        np.array([900.0, 950.0, 1_100.0]),
        HELD[:3],
        PATH_TRADES,
        HALF_DAY_MS,
        0.0,
    )
    assert m["max_drawdown"] == pytest.approx(0.1, rel=1e-12)
    # Under water from the window's start to the close of bar 1: 24 h.
    assert m["max_drawdown_days"] == 1.0


def test_no_trades_gives_undefined_trade_metrics_not_zeros():
    flat = np.full(8, 1_000.0)
    empty = PATH_TRADES.clear()
    m = compute_metrics(1_000.0, PATH_TS, flat, np.zeros(8, bool), empty, HALF_DAY_MS, 0.0)
    assert (m["total_return"], m["max_drawdown"], m["max_drawdown_days"]) == (0.0, 0.0, 0.0)
    assert m["trades"] == 0
    for name in ("win_rate", "profit_factor", "expectancy", "sharpe", "sortino", "calmar"):
        assert math.isnan(m[name]), name


def test_compute_metrics_on_the_frames_agrees_with_the_run_and_with_a_metrics_only_run():
    bars = minute_bars([(100, 100.5), (101.23, 102), (102, 104), (105.67, 105), (105, 106)])
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    entry, exit_ = flags(5, [0]), flags(5, [2])
    result = simulate(config(), bars, ts, entry, exit_, RULES, 0)
    again = compute_metrics(
        10_000.0,
        ts,
        result.equity["equity"].to_numpy(),
        result.equity["in_position"].to_numpy(),
        result.trades,
        MINUTE_MS,
        result.metrics["buy_and_hold_return"],
    )
    assert_same_metrics(again, {k: v for k, v in result.metrics.items() if k in again})
    assert set(result.metrics) - set(again) == {"rejected_orders", "skipped_entries"}
    # A sweep asks for the metrics only: the same figures.
    metrics_only = simulate(config(), bars, ts, entry, exit_, RULES, 0, frames=False)
    assert_same_metrics(metrics_only.metrics, result.metrics)


def test_buy_and_hold_is_the_last_close_over_the_first_open_of_the_window():
    bars = minute_bars([(90, 95), (100, 101), (102, 103), (104, 105)])
    result = run(config(), bars, first=1)
    assert result.metrics["buy_and_hold_return"] == pytest.approx(105 / 100 - 1, rel=1e-12)


def test_metrics_of_a_simulated_run_span_whole_days_from_first_open_to_last_close():
    # One bar a day for three days, bought on day 1 and sold at the end.
    bars = minute_bars([(100, 100), (100, 110), (110, 121)], step_ms=DAY_MS)
    result = run(config(timeframe="1d", slippage=0.0, fee=0.0), bars, entries=[0])
    # 10 bought at 100: equity 10,000, 10,100, 10,210.
    assert result.equity["equity"].to_list() == pytest.approx([10_000.0, 10_100.0, 10_210.0])
    assert result.metrics["days"] == 3.0
    assert result.metrics["total_return"] == pytest.approx(0.021, rel=1e-12)
    # Daily returns 0, 0.01, 210 / 10,100; Sharpe from their mean and sample deviation.
    daily = np.array([0.0, 0.01, 110 / 10_100])
    assert result.metrics["sharpe"] == pytest.approx(
        daily.mean() / daily.std(ddof=1) * math.sqrt(365), rel=1e-9
    )


# --- a month of real minutes: the equity curve from the trades alone --------------------------


@pytest.fixture(scope="module")
def btc_minutes(shared_data):
    raw = read_candle_file(REPLAY_FILES["BTC/USDT"])
    return raw.with_columns(pl.col("ts").cast(TS), imputed=pl.lit(False))


@pytest.fixture(scope="module")
def btc_rules(shared_data):
    return RuleBook.constant(
        MarketRules.from_markets(read_exchange_info(EXCHANGE_INFO), "BTC/USDT")
    )


@pytest.fixture(scope="module")
def ma_cross_1m():
    return config(name="btc_cross", params={"fast": 10, "slow": 50})


def test_equity_is_the_cash_walk_of_the_trades_on_real_minutes(btc_minutes, btc_rules, ma_cross_1m):
    result = backtest(ma_cross_1m, btc_minutes, btc_rules)
    trades = result.trades
    assert trades.height > 100
    ts = btc_minutes.get_column("ts").dt.epoch("ms").to_numpy()
    open_ = btc_minutes.get_column("open").to_numpy()
    close = btc_minutes.get_column("close").to_numpy()
    row = {int(t): i for i, t in enumerate(ts)}
    rows = trades.with_columns(pl.col("^.*_ts$").dt.epoch("ms")).to_dicts()

    entries, exits = {}, {}
    for t in rows:
        entries[row[t["entry_ts"]]] = t
        if t["exit_reason"] != "end_of_window":
            exits[row[t["exit_ts"]]] = t
        # Fills against us: within one tick of the next open moved by 5 bp.
        target = open_[row[t["entry_ts"]]] * 1.0005
        assert target - 1e-9 <= t["entry_price"] < target + 0.01
        assert row[t["entry_signal_ts"]] == row[t["entry_ts"]] - 1
        reference = close[-1] if t["exit_reason"] == "end_of_window" else open_[row[t["exit_ts"]]]
        assert reference * 0.9995 - 0.01 < t["exit_price"] <= reference * 0.9995 + 1e-9
        # Lots: 1e-6 BTC, never over 1,000 USDT, one more lot would be.
        assert t["amount"] * t["entry_price"] <= 1_000.0 + 1e-9
        assert (t["amount"] + 1e-6) * t["entry_price"] > 1_000.0
        assert t["entry_fee"] == pytest.approx(t["amount"] * t["entry_price"] * 0.001, rel=1e-12)
        assert t["exit_fee"] == pytest.approx(t["amount"] * t["exit_price"] * 0.001, rel=1e-12)
    # One position at a time, never re-entered on the bar it was left.
    starts = [row[t["entry_ts"]] for t in rows]
    ends = [row[t["exit_ts"]] for t in rows]
    assert all(start > end for start, end in zip(starts[1:], ends[:-1], strict=True))

    # The cash walk: pay notional and fee at an entry fill, receive both at an exit fill.
    capital = ma_cross_1m.capital
    cash, amount = capital, 0.0
    walk = np.empty(len(ts))
    held = np.zeros(len(ts), dtype=bool)
    for i in range(len(ts)):
        if i in exits:
            cash += exits[i]["amount"] * exits[i]["exit_price"] - exits[i]["exit_fee"]
            amount = 0.0
        if i in entries:
            cash -= entries[i]["amount"] * entries[i]["entry_price"] + entries[i]["entry_fee"]
            amount = entries[i]["amount"]
        held[i] = amount > 0
        walk[i] = cash + amount * close[i]
    if rows[-1]["exit_reason"] == "end_of_window":
        last = rows[-1]
        walk[-1] = cash + last["amount"] * last["exit_price"] - last["exit_fee"]
    np.testing.assert_allclose(result.equity["equity"].to_numpy(), walk, rtol=0, atol=1e-6)
    assert result.equity["in_position"].to_list() == held.tolist()

    pnl = [
        t["amount"] * (t["exit_price"] - t["entry_price"]) - t["entry_fee"] - t["exit_fee"]
        for t in rows
    ]
    np.testing.assert_allclose(trades["pnl"].to_numpy(), pnl, rtol=0, atol=1e-9)
    assert result.metrics["final_equity"] == pytest.approx(capital + sum(pnl), abs=1e-6)

    # The entries are exactly the crossings of a 10- over a 50-minute mean (polars, not
    # TA-Lib), but those on the last minute or just before a gap in the minutes.
    above = pl.col("close").rolling_mean(10) > pl.col("close").rolling_mean(50)
    next_minute = pl.col("ts").shift(-1) - pl.col("ts") == pl.duration(minutes=1)
    crosses = (
        btc_minutes.with_row_index()
        .filter((above & ~above.shift(1) & next_minute).fill_null(False))
        .get_column("index")
        .to_list()
    )
    assert [row[t["entry_signal_ts"]] for t in rows] == crosses


def test_the_window_start_bounds_trades_and_equity(btc_minutes, btc_rules, ma_cross_1m):
    result = backtest(ma_cross_1m, btc_minutes, btc_rules, start=date(2021, 5, 1))
    start = datetime(2021, 5, 1, tzinfo=UTC)
    assert result.equity["ts"][0] == start
    assert result.trades["entry_signal_ts"].min() >= start
    window = btc_minutes.filter(pl.col("ts") >= start)
    assert result.metrics["bars"] == window.height == result.equity.height
    assert result.metrics["buy_and_hold_return"] == pytest.approx(
        window["close"][-1] / window["open"][0] - 1, rel=1e-12
    )


def test_signals_before_the_window_start_are_warm_up_only():
    bars = minute_bars([(100 + i, 100 + i) for i in range(6)])
    # first = 2: the signal on bar 1 (which would fill on bar 2, the window's first) is
    # warm-up; the one on bar 3 fills on bar 4.
    result = run(config(slippage=0.0), bars, entries=[0, 1, 3], first=2)
    assert ms(result.trades["entry_signal_ts"]) == [minute(3)]
    assert ms(result.trades["entry_ts"]) == [minute(4)]
    assert ms(result.equity["ts"]) == [minute(i) for i in range(2, 6)]
    assert result.equity["equity"][0] == 10_000.0
    assert result.metrics["bars"] == 4


def test_identical_inputs_give_identical_results(btc_minutes, btc_rules, ma_cross_1m):
    first = backtest(ma_cross_1m, btc_minutes, btc_rules)
    again = backtest(ma_cross_1m, btc_minutes, btc_rules)
    assert_frame_equal(first.trades, again.trades)
    assert_frame_equal(first.equity, again.equity)
    assert_frame_equal(first.rejections, again.rejections)
    assert_same_metrics(first.metrics, again.metrics)
