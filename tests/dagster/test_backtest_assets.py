"""Backtest and sweep assets on the recorded Binance candles: what a user sees in the UI."""

import base64
import re
from datetime import date

import dagster as dg
import duckdb
import polars as pl
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

import assets.backtests
from assets.backtests import _backtest_asset, _sweep_asset
from assets.bars import bar_assets
from assets.market_data import catalog, markets
from candlestack.lake import DayData
from candlestack.strategies.config import StrategyConfig, SweepConfig
from tests.dagster.conftest import ingest_months

APRIL = "2021-04-01|BTC-USDT"  # the recording's whole days: 2021-04-21..30
BARS_15M = next(a for a in bar_assets if a.key.to_user_string() == "bars_15m")
MEAN_REVERSION = StrategyConfig(
    name="btc_mr",
    strategy="mean_reversion",
    symbol="BTC/USDT",
    timeframe="15m",
    min_profit=0.005,
    params={"window": 20, "threshold": 0.005},
)


@pytest.fixture
def lake_with_bars(resources):
    instance = dg.DagsterInstance.ephemeral()
    ingest_months(resources, instance, ("2021-04",))
    dg.materialize(
        [BARS_15M],
        resources=resources,
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: APRIL, ASSET_PARTITION_RANGE_END_TAG: APRIL},
    )
    dg.materialize([markets], partition_key="2021-04-21", resources=resources, instance=instance)
    return resources, instance


def _metadata(result, name):
    (materialization,) = result.asset_materializations_for_node(name)
    return {k: v.value for k, v in materialization.metadata.items()}


def test_backtest_asset_shows_metrics_picture_report_and_passes_lookahead(lake_with_bars, tmp_path):
    resources, instance = lake_with_bars
    asset = _backtest_asset(MEAN_REVERSION)
    result = dg.materialize([asset], resources=resources, instance=instance)
    meta = _metadata(result, "backtest_btc_mr")
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "no_lookahead" and check.passed
    assert meta["trades"] > 0 and meta["total_return"] == pytest.approx(
        meta["final_equity"] / 10_000 - 1
    )
    for plotted in ("total_return", "max_drawdown", "sharpe"):
        assert isinstance(meta[plotted], float)
    assert "| total return |" in meta["metrics"] and "| Sharpe" in meta["metrics"]
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", meta["equity_and_drawdown"])
    assert base64.b64decode(png.group(1)).startswith(b"\x89PNG")
    report = tmp_path / "reports" / "backtest_btc_mr.html"
    assert meta["report"] == str(report) and "total return" in report.read_text()
    assert meta["window"] == "2021-04-21 to 2021-04-30"

    # The lake holds the run under its inputs hash; the catalog's views read it.
    dg.materialize([catalog], resources=resources, instance=instance)
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        trades = con.sql("SELECT * FROM trades WHERE strategy = 'btc_mr'").pl()
        stored = con.sql("SELECT * FROM backtest_metrics").pl()
    assert trades.height == meta["trades"]
    assert stored["run"].to_list() == [meta["run_id"]]
    assert stored["sharpe"][0] == pytest.approx(meta["sharpe"])
    assert stored["trades_hash"][0] == meta["trades_hash"]

    # Same inputs: same run, same trades, nothing rewritten.
    again = _metadata(
        dg.materialize([asset], resources=resources, instance=instance), "backtest_btc_mr"
    )
    assert (again["run_id"], again["trades_hash"]) == (meta["run_id"], meta["trades_hash"])


def test_a_window_chosen_at_launch_changes_the_run(lake_with_bars):
    resources, instance = lake_with_bars
    asset = _backtest_asset(MEAN_REVERSION)
    full = _metadata(
        dg.materialize([asset], resources=resources, instance=instance), "backtest_btc_mr"
    )
    short = _metadata(
        dg.materialize(
            [asset],
            resources=resources,
            instance=instance,
            run_config={"ops": {"backtest_btc_mr": {"config": {"start": "2021-04-26"}}}},
        ),
        "backtest_btc_mr",
    )
    assert short["window"] == "2021-04-26 to 2021-04-30"
    assert short["run_id"] != full["run_id"] and short["bars"] == 5 * 96


def test_a_strategy_that_peeks_fails_the_blocking_lookahead_check(
    lake_with_bars, tmp_path, monkeypatch
):
    resources, instance = lake_with_bars
    (tmp_path / "peeking_asset.py").write_text(
        "import polars as pl\n"
        "from candlestack.strategies import Strategy\n"
        "class Tomorrow(Strategy):\n"
        "    def entry(self):\n"
        "        return pl.col('close').shift(-1) > pl.col('close')\n"
        "    def exit(self):\n"
        "        return pl.col('close').shift(-1) < pl.col('close')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = MEAN_REVERSION.model_copy(
        update={"name": "peek", "strategy": "peeking_asset:Tomorrow"}
    )
    config = StrategyConfig.model_validate({**config.model_dump(), "params": {}})
    result = dg.materialize(
        [_backtest_asset(config)], resources=resources, instance=instance, raise_on_error=False
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["changed_signals"].value > 0
    assert not result.success  # blocking: nothing downstream runs on a peeking strategy


def test_sweep_ranks_every_valid_combination(lake_with_bars, monkeypatch):
    resources, instance = lake_with_bars
    base = StrategyConfig(name="btc_cross", strategy="ma_cross", symbol="BTC/USDT", timeframe="15m")
    sweep = SweepConfig(
        name="grid", strategy="btc_cross", grid={"fast": [5, 10, 50], "slow": [20, 50]}
    )
    monkeypatch.setattr(
        assets.backtests,
        "strategies_file",
        assets.backtests.strategies_file.model_copy(update={"strategies": [base]}),
    )
    result = dg.materialize([_sweep_asset(sweep)], resources=resources, instance=instance)
    meta = _metadata(result, "sweep_grid")
    # fast < slow leaves (5,20) (5,50) (10,20) (10,50): (50,20) and (50,50) are left out.
    assert (meta["combinations"], meta["left_out"]) == (4, 2)
    stored = pl.read_parquet(meta["results"])
    sharpe = stored["sharpe"].fill_nan(None).drop_nulls().to_list()
    assert sharpe == sorted(sharpe, reverse=True)
    assert stored["rank"].to_list() == [1, 2, 3, 4]


def test_changed_bars_make_a_new_run_and_keep_the_old_one(lake_with_bars, tmp_path):
    resources, instance = lake_with_bars
    asset = _backtest_asset(MEAN_REVERSION)
    first = _metadata(
        dg.materialize([asset], resources=resources, instance=instance), "backtest_btc_mr"
    )
    lake = resources["lake"].lake
    day, key = date(2021, 4, 27), ("bars", "binance", "15m", "BTC-USDT", date(2021, 4, 1))
    month = lake.read_month(*key)
    changed = month.day(day).with_columns(pl.col("close") * 1.0001)
    lake.write_month(*key, {day: DayData(changed, month.reports[day])})
    second = _metadata(
        dg.materialize([asset], resources=resources, instance=instance), "backtest_btc_mr"
    )
    assert second["inputs_hash"] != first["inputs_hash"]
    runs = sorted(p.name for p in (tmp_path / "lake").glob("backtests/strategy=btc_mr/run=*"))
    assert runs == sorted([f"run={first['run_id']}", f"run={second['run_id']}"])


def test_a_sweep_takes_another_grid_and_metric_at_launch(lake_with_bars, monkeypatch):
    resources, instance = lake_with_bars
    base = StrategyConfig(name="btc_cross", strategy="ma_cross", symbol="BTC/USDT", timeframe="15m")
    sweep = SweepConfig(name="grid", strategy="btc_cross", grid={"fast": [5], "slow": [20]})
    monkeypatch.setattr(
        assets.backtests,
        "strategies_file",
        assets.backtests.strategies_file.model_copy(update={"strategies": [base]}),
    )
    launch = {"config": {"grid": '{"fast": [5, 10], "slow": [50]}', "rank_by": "max_drawdown"}}
    result = dg.materialize(
        [_sweep_asset(sweep)],
        resources=resources,
        instance=instance,
        run_config={"ops": {"sweep_grid": launch}},
    )
    meta = _metadata(result, "sweep_grid")
    assert (meta["combinations"], meta["rank_by"]) == (2, "max_drawdown")
    stored = pl.read_parquet(meta["results"])
    assert stored["max_drawdown"].to_list() == sorted(stored["max_drawdown"].to_list())
