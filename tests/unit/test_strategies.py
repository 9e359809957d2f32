"""Strategies by hand: the built-ins' signals on tiny frames, configs, user strategies, files.

Every moving average, channel and threshold below is worked out in a comment.
"""

import sys
import textwrap

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from candlestack.backtest import backtest, strategy_features, with_features
from candlestack.errors import ConfigError
from candlestack.execution import MarketRules, RuleBook
from candlestack.schema import MINUTE_MS, TS
from candlestack.strategies import Breakout, MeanReversion, MovingAverageCross, StrategyError
from candlestack.strategies.base import signals
from candlestack.strategies.config import (
    StrategyConfig,
    load_strategies,
)

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC, epoch ms
RULES = RuleBook.constant(
    MarketRules(amount_step=0.001, price_tick=0.01, min_amount=0.001, min_cost=10.0)
)


def bars(close, high=None, low=None, open_=None) -> pl.DataFrame:
    """1m bars; the open defaults to the close, high and low to the larger and smaller of
    open and close."""
    n = len(close)
    open_ = open_ or close
    return pl.DataFrame(
        {
            "ts": [T0 + i * MINUTE_MS for i in range(n)],
            "open": [float(x) for x in open_],
            "high": [float(x) for x in (high or map(max, open_, close))],
            "low": [float(x) for x in (low or map(min, open_, close))],
            "close": [float(x) for x in close],
            "volume": [1.0] * n,
            "imputed": [False] * n,
        }
    ).with_columns(pl.col("ts").cast(TS))


def rows(flags: np.ndarray) -> list[int]:
    return np.flatnonzero(flags).tolist()


def strategy_signals(strategy, frame: pl.DataFrame) -> tuple[list[int], list[int]]:
    """Rows with an entry and rows with an exit, features computed as backtest() does."""
    entry, exit_ = signals(strategy, with_features(frame, strategy_features(strategy, "1m")))
    return rows(entry), rows(exit_)


def config(**changes) -> StrategyConfig:
    settings = {"name": "by_hand", "strategy": "ma_cross", "symbol": "BTC/USDT"}
    return StrategyConfig(**(settings | changes))


# --- the built-in strategies' signals -------------------------------------------------------


def test_ma_cross_enters_on_the_crossing_bar_only_and_exits_on_the_cross_back():
    frame = bars([10, 10, 10, 10, 13, 14, 15, 9, 8, 8])
    # row: close  sma2   sma3    fast > slow   fast < slow
    #   2:  10    10     10      no            no
    #   3:  10    10     10      no            no
    #   4:  13    11.5   11      yes (cross)   no
    #   5:  14    13.5   12.33   yes           no
    #   6:  15    14.5   14      yes           no
    #   7:   9    12     12.67   no            yes (cross)
    #   8:   8    8.5    10.67   no            yes
    #   9:   8    8      8.33    no            yes
    assert strategy_signals(MovingAverageCross(fast=2, slow=3), frame) == ([4], [7])


def test_ma_cross_takes_no_entry_when_the_averages_start_out_already_crossed():
    # sma2/sma3 at row 2: 2.5 > 2; row 3: 3.5 > 3. Above from the first bar both exist:
    # no crossing was seen, so no entry.
    assert strategy_signals(MovingAverageCross(fast=2, slow=3), bars([1, 2, 3, 4])) == ([], [])


def test_ma_cross_with_ema_reads_ema_features():
    strategy = MovingAverageCross(fast=3, slow=5, average="ema")
    assert [spec.name for spec in strategy.features()] == ["ema_3", "ema_5"]
    assert [spec.function for spec in strategy.features()] == ["EMA", "EMA"]


def test_breakout_compares_the_close_with_the_previous_bars_channel():
    high = [11, 12, 11, 13, 13, 14, 15, 14, 11, 10]
    low = [9, 10, 9, 11, 11, 12, 13, 10, 9, 8]
    close = [10, 11, 10, 12.5, 12, 13, 14.5, 10.5, 10, 8.5]
    # Entry (3 bars): close > the highest high of the 3 bars before.
    #   row 3: 12.5 > max(11, 12, 11) = 12: entry, though below its own high 13
    #   row 4: 12 vs max(12, 11, 13) = 13; row 5: 13 vs 13, not above: no
    #   row 6: 14.5 > max(13, 13, 14) = 14: entry
    # Exit (2 bars): close < the lowest low of the 2 bars before.
    #   row 7: 10.5 < min(12, 13) = 12: exit
    #   row 8: 10 vs min(13, 10) = 10, not below: no
    #   row 9: 8.5 < min(10, 9) = 9: exit
    frame = bars(close, high, low)
    assert strategy_signals(Breakout(entry_window=3, exit_window=2), frame) == ([3, 6], [7, 9])


def test_mean_reversion_enters_below_the_threshold_and_exits_on_reversion():
    frame = bars([10, 10, 10, 8.5, 8.6, 9.0, 9.0])
    # row: close  sma3               entry: close < 0.9 x sma   exit: close >= sma
    #   2:  10    10                 10 < 9: no                  yes
    #   3:  8.5   28.5 / 3 = 9.5     8.5 < 8.55: yes             no
    #   4:  8.6   27.1 / 3 = 9.033   8.6 < 8.13: no (4.8 %)      no
    #   5:  9.0   26.1 / 3 = 8.7     no                          yes
    #   6:  9.0   26.6 / 3 = 8.867   no                          yes
    strategy = MeanReversion(window=3, threshold=0.1)
    assert strategy_signals(strategy, frame) == ([3], [2, 5, 6])


def test_mean_reversion_backtest_buys_the_dip_and_sells_the_reversion():
    frame = bars([10, 10, 10, 8.5, 8.6, 9.0, 9.0, 9.0])
    cfg = config(
        strategy="mean_reversion",
        timeframe="1m",
        slippage=0.0,
        order_value=100.0,
        params={"window": 3, "threshold": 0.1},
    )
    result = backtest(cfg, frame, RULES)
    # Entry signal at row 3 -> bought at the open of row 4 (8.6); exit signal at row 5 ->
    # sold at the open of row 6 (9.0). 100 / 8.6 = 11.627... -> 11.627.
    (trade,) = result.trades.iter_rows(named=True)
    assert (trade["entry_price"], trade["exit_price"], trade["amount"]) == (8.6, 9.0, 11.627)
    # pnl = 11.627 x 9 x 0.999 - 11.627 x 8.6 x 1.001
    assert trade["pnl"] == pytest.approx(11.627 * 9 * 0.999 - 11.627 * 8.6 * 1.001, rel=1e-12)


# --- StrategyConfig errors name the field ---------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"strategy": "no_such_strategy"}, ["strategy", "unknown strategy 'no_such_strategy'"]),
        ({"strategy": "mean_reversion", "params": {"window": 0}}, ["params.window"]),
        ({"strategy": "mean_reversion", "params": {"windw": 5}}, ["params.windw"]),
        ({"params": {"fast": 50, "slow": 10}}, ["fast (50) must be shorter than slow (10)"]),
        ({"params": {"fast": 20, "slow": 20}}, ["fast (20) must be shorter than slow (20)"]),
        ({"min_price": 100.0, "max_price": 100.0}, ["max_price"]),
        ({"order_value": 10_000.0, "capital": 10_000.0}, ["order_value", "plus fee", "capital"]),
        ({"stop_los": 0.05}, ["stop_los", "Extra inputs are not permitted"]),
        ({"fee": 0.5}, ["fee", "less than 0.1"]),
        ({"timeframe": "7m"}, ["timeframe", "unknown timeframe '7m'"]),
        ({"symbol": "BTCUSDT"}, ["symbol", "not a ccxt symbol"]),
        ({"name": "Bad-Name"}, ["name", "lower case letters"]),
    ],
)
def test_config_errors_name_the_field(changes, words):
    with pytest.raises(ValidationError) as caught:
        config(**changes)
    for word in words:
        assert word in str(caught.value)


def test_order_value_plus_fee_may_use_the_whole_capital():
    # 1,000 x 1.001 = 1,001: exactly the capital, allowed; a cent more is not.
    assert config(order_value=1_000.0, capital=1_001.0, fee=0.001).order_value == 1_000.0
    with pytest.raises(ValidationError, match="order_value"):
        config(order_value=1_000.01, capital=1_001.0, fee=0.001)


def test_with_params_returns_a_validated_copy():
    base = config(strategy="mean_reversion", params={"window": 10})
    changed = base.with_params(threshold=0.05)
    assert changed.strategy_object == MeanReversion(window=10, threshold=0.05)
    assert changed.params == {"window": 10, "threshold": 0.05}
    assert changed.model_dump(exclude={"params"}) == base.model_dump(exclude={"params"})
    # The original is untouched.
    assert base.params == {"window": 10}
    assert base.strategy_object == MeanReversion(window=10)
    with pytest.raises(ValidationError, match=r"params\.window"):
        base.with_params(window=1)
    with pytest.raises(ValidationError, match=r"params\.windw"):
        base.with_params(windw=5)
    with pytest.raises(ValidationError, match="fast"):
        config(params={"fast": 5, "slow": 20}).with_params(fast=30)


# --- user strategies from a module path -----------------------------------------------------

USER_MODULE = '''
import polars as pl
from pydantic import Field

from candlestack.strategies import Strategy


class MyStrategy(Strategy):
    """Buy after a bar closing `min_move` above its open; sell after a red bar."""

    min_move: float = Field(0.0, ge=0)

    def entry(self) -> pl.Expr:
        return pl.col("close") > pl.col("open") * (1 + self.min_move)

    def exit(self) -> pl.Expr:
        return pl.col("close") < pl.col("open")


class ReadsNothingThere(Strategy):
    def entry(self) -> pl.Expr:
        return pl.col("no_such_column") > 0

    def exit(self) -> pl.Expr:
        return pl.lit(False)


class NotAStrategy:
    pass
'''


@pytest.fixture
def mymod(tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(tmp_path)
    sys.modules.pop("mymod", None)
    yield "mymod"
    sys.modules.pop("mymod", None)


def test_a_user_strategy_from_a_module_path_runs_a_backtest(mymod):
    cfg = config(
        strategy="mymod:MyStrategy", timeframe="1m", slippage=0.0, params={"min_move": 0.01}
    )
    assert type(cfg.strategy_object).__name__ == "MyStrategy"
    frame = bars(
        open_=[100, 100, 102, 103, 100],
        close=[100.5, 102, 103, 101, 100],
    )
    # Row 0: 100.5 > 101? no. Row 1: 102 > 101: entry, bought at the open of row 2 (102).
    # Row 3 is red: exit, sold at the open of row 4 (100).
    # 1,000 / 102 = 9.8039 -> 9.803 at a 0.001 lot.
    result = backtest(cfg, frame, RULES)
    (trade,) = result.trades.iter_rows(named=True)
    assert (trade["entry_price"], trade["exit_price"], trade["amount"]) == (102.0, 100.0, 9.803)
    # pnl = 980.3 - 0.9803 - 999.906 - 0.999906 = -21.586206
    assert trade["pnl"] == pytest.approx(-21.586206, rel=1e-12)
    assert trade["exit_reason"] == "exit_signal"


def test_a_user_strategy_validates_its_parameters(mymod):
    with pytest.raises(ValidationError, match=r"params\.min_move"):
        config(strategy="mymod:MyStrategy", params={"min_move": -1})


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        ("mymod:NotAStrategy", ["not a subclass of candlestack.strategies.Strategy"]),
        ("mymod:Missing", ["module 'mymod' has no 'Missing'"]),
        ("no_such_module_xyz:Thing", ["cannot import 'no_such_module_xyz'"]),
    ],
)
def test_a_bad_strategy_reference_says_what_is_wrong(mymod, reference, words):
    with pytest.raises(ValidationError) as caught:
        config(strategy=reference)
    for word in [reference, *words]:
        assert word in str(caught.value)


def test_signals_on_a_missing_column_raise_a_strategy_error_naming_the_strategy(mymod):
    cfg = config(strategy="mymod:ReadsNothingThere", timeframe="1m")
    with pytest.raises(StrategyError, match=r"ReadsNothingThere.*no_such_column"):
        backtest(cfg, bars([100, 101, 102]), RULES)


# --- strategies files -----------------------------------------------------------------------

GOOD_ENTRY = """\
strategies:
  - name: good_one
    strategy: ma_cross
    symbol: BTC/USDT
    params: {fast: 5, slow: 20}
"""


@pytest.mark.parametrize(
    ("bad_lines", "field"),
    [
        ("    fee: 0.5\n", "strategies[1] (the_name).fee: "),
        ("    stop_los: 0.05\n", "strategies[1] (the_name).stop_los: "),
        ("    params: {window: 0}\n", "strategies[1] (the_name): "),
    ],
)
def test_a_bad_entry_in_a_strategies_file_names_the_file_entry_and_field(
    tmp_path, bad_lines, field
):
    path = tmp_path / "strategies.yaml"
    path.write_text(
        GOOD_ENTRY
        + "  - name: the_name\n    strategy: mean_reversion\n    symbol: BTC/USDT\n"
        + bad_lines
    )
    with pytest.raises(ConfigError) as caught:
        load_strategies(path)
    message = str(caught.value)
    assert str(path) in message
    assert field in message
    if "params" in bad_lines:
        assert "params.window" in message


def test_a_good_strategies_file_loads(tmp_path):
    path = tmp_path / "strategies.yaml"
    path.write_text(
        GOOD_ENTRY + "sweeps:\n  - name: grid\n    strategy: good_one\n    grid: {fast: [3, 5]}\n"
    )
    loaded = load_strategies(path)
    assert loaded.strategy("good_one").strategy_object == MovingAverageCross(fast=5, slow=20)
    assert [s.name for s in loaded.sweeps] == ["grid"]


def test_strategies_file_cross_checks_names(tmp_path):
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text(GOOD_ENTRY + GOOD_ENTRY.removeprefix("strategies:\n"))
    with pytest.raises(ConfigError, match="strategy names repeat: good_one"):
        load_strategies(repeated)
    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(
        GOOD_ENTRY + "sweeps:\n  - name: grid\n    strategy: nope\n    grid: {fast: [3]}\n"
    )
    with pytest.raises(ConfigError, match="no configured strategy 'nope'"):
        load_strategies(dangling)


def test_unreadable_or_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read strategies file"):
        load_strategies(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("strategies: [\n")
    with pytest.raises(ConfigError, match="not valid yaml"):
        load_strategies(broken)


def test_the_default_strategies_file_loads_the_built_in_strategies():
    loaded = load_strategies()
    kinds = {c.name: type(c.strategy_object) for c in loaded.strategies}
    assert kinds == {
        "btc_mean_reversion": MeanReversion,
        "eth_breakout": Breakout,
        "btc_ma_cross": MovingAverageCross,
        "btc_scalp": MovingAverageCross,
    }
    assert [(s.name, s.strategy) for s in loaded.sweeps] == [("btc_ma_cross_grid", "btc_ma_cross")]


def test_a_user_strategy_registered_as_an_entry_point_is_found_by_name(mymod, tmp_path):
    # What `pip install` of a package declaring [project.entry-points."candlestack.strategies"]
    # leaves on the path: a dist-info folder with entry_points.txt.
    dist = tmp_path / "my_strategies-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategies\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[candlestack.strategies]\nbig_move = mymod:MyStrategy\n"
    )
    cfg = config(strategy="big_move", params={"min_move": 0.02})
    assert type(cfg.strategy_object).__name__ == "MyStrategy"
    assert cfg.strategy_object.min_move == 0.02
