"""The look-ahead guard on the real candles, and the sweep that ranks a grid."""

import math

import numpy as np
import polars as pl
import pytest

from candlestack.backtest import backtest
from candlestack.execution import MarketRules, RuleBook
from candlestack.lookahead import main, violations
from candlestack.resample import minute_bars, resample
from candlestack.sources.replay import read_candle_file, read_exchange_info
from candlestack.strategies.config import StrategyConfig
from candlestack.sweep import sweep
from tests.conftest import EXCHANGE_INFO, REPLAY_FILES

PEEKING = """
import polars as pl
from candlestack.strategies import Strategy

class Tomorrow(Strategy):
    def entry(self):
        return pl.col("close").shift(-1) > pl.col("close")

    def exit(self):
        return pl.col("close").shift(-1) < pl.col("close")

class SmoothedTomorrow(Strategy):
    # Subtler: a centred rolling mean reads 2 bars ahead.
    def entry(self):
        return pl.col("close") < pl.col("close").rolling_mean(5, center=True)

    def exit(self):
        return pl.col("close") > pl.col("close").rolling_mean(5, center=True)
"""


@pytest.fixture(scope="module")
def btc_minutes(shared_data):
    candles = read_candle_file(REPLAY_FILES["BTC/USDT"]).with_columns(
        pl.col("ts").cast(pl.Datetime("ms", "UTC")), pl.lit(False).alias("imputed")
    )
    return minute_bars(candles)


def _config(strategy: str, timeframe: str, **params) -> StrategyConfig:
    return StrategyConfig(
        name="guarded", strategy=strategy, symbol="BTC/USDT", timeframe=timeframe, params=params
    )


@pytest.mark.parametrize(
    ("strategy", "timeframe", "params"),
    [
        ("mean_reversion", "1m", {"window": 20, "threshold": 0.003}),
        ("mean_reversion", "15m", {}),
        ("breakout", "1m", {}),
        ("breakout", "1h", {"entry_window": 10, "exit_window": 5}),
        ("ma_cross", "1m", {"fast": 10, "slow": 50}),
        ("ma_cross", "15m", {"fast": 5, "slow": 20, "average": "ema"}),
    ],
)
def test_builtin_signals_never_change_when_later_bars_are_removed_or_altered(
    btc_minutes, strategy, timeframe, params
):
    bars = btc_minutes if timeframe == "1m" else resample(btc_minutes, timeframe)
    config = _config(strategy, timeframe, **params)
    found = violations(config, bars, cuts=25)
    assert found.is_empty(), found.head()
    # The guard is only worth something if these strategies signal at all here.
    assert backtest(config, bars, RuleBook.constant(MarketRules(1e-6, 0.01))).metrics["trades"]


@pytest.mark.parametrize("name", ["Tomorrow", "SmoothedTomorrow"])
def test_a_strategy_reading_future_bars_is_caught(btc_minutes, tmp_path, monkeypatch, name):
    (tmp_path / "peeking_lookahead.py").write_text(PEEKING)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = violations(
        _config(f"peeking_lookahead:{name}", "15m"), resample(btc_minutes, "15m"), cuts=10
    )
    assert not found.is_empty()
    # Each violation names the bar whose signal changed, at or before its cut.
    assert (found["bar_ts"] <= found["cut_ts"]).all()


def test_the_command_line_fails_a_peeking_strategy_and_passes_a_builtin(
    shared_data, tmp_path, monkeypatch, capsys
):
    (tmp_path / "peeking_lookahead.py").write_text(PEEKING)
    monkeypatch.syspath_prepend(str(tmp_path))
    candles = str(REPLAY_FILES["BTC/USDT"])
    common = ["--candles", candles, "--timeframe", "15m", "--cuts", "5"]
    assert main(["--strategy", "peeking_lookahead:Tomorrow", *common]) == 1
    assert "LOOK-AHEAD" in capsys.readouterr().out
    assert main(["--strategy", "breakout", *common]) == 0
    assert "no look-ahead" in capsys.readouterr().out


def test_a_sweep_ranks_every_valid_combination_like_single_backtests(btc_minutes):
    bars = resample(btc_minutes, "15m")
    rules = RuleBook.constant(
        MarketRules.from_markets(read_exchange_info(EXCHANGE_INFO), "BTC/USDT")
    )
    base = _config("ma_cross", "15m")
    grid = {"fast": [5, 10, 30], "slow": [20, 30, 60]}
    results, invalid = sweep(base, grid, bars, rules, rank_by="total_return")
    # fast must be below slow: (30, 20) and (30, 30) are left out, with the reason.
    assert results.height == 7 and len(invalid) == 2
    assert all("fast (30) must be shorter than slow" in reason for reason in invalid)
    returns = results["total_return"].to_list()
    assert returns == sorted(returns, reverse=True) and results["rank"].to_list() == list(
        range(1, 8)
    )
    # Each row is exactly what a single backtest of those parameters gives.
    for row in results.iter_rows(named=True):
        alone = backtest(base.with_params(fast=row["fast"], slow=row["slow"]), bars, rules)
        for name in ("total_return", "sharpe", "max_drawdown", "trades", "fees"):
            expected = float(alone.metrics[name])
            assert row[name] == expected or (math.isnan(row[name]) and math.isnan(expected))


def test_a_sweep_ranks_drawdown_smallest_first(btc_minutes):
    bars = resample(btc_minutes, "1h")
    rules = RuleBook.constant(MarketRules(1e-6, 0.01))
    results, _ = sweep(
        _config("breakout", "1h"),
        {"entry_window": [5, 10, 20]},
        bars,
        rules,
        rank_by="max_drawdown",
    )
    drawdowns = results["max_drawdown"].to_list()
    assert drawdowns == sorted(drawdowns)
    with pytest.raises(ValueError, match="rank_by 'profit' is not a metric"):
        sweep(_config("breakout", "1h"), {"entry_window": [5]}, bars, rules, rank_by="profit")
    assert np.isfinite(drawdowns).all()
