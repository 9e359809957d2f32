"""Backtests of the configured strategies and their parameter sweeps.

One asset per strategy (backtest_<name>) and per sweep (sweep_<name>), downstream of the bars
and features of the strategy's timeframe. Each backtest carries its metrics table, an equity
and drawdown picture, the path of an HTML report, numeric metadata the UI plots across
materializations, and a look-ahead check of the strategy on the same bars.
"""

import json
import math
from datetime import date
from pathlib import Path

import dagster as dg
import polars as pl

from assets.keys import backtest_key, bars_key, sweep_key
from assets.markdown import md_table
from assets.market_data import candles_1m, markets
from candlestack.backtest import METRICS
from candlestack.backtest_store import run_backtest, run_sweep
from candlestack.errors import ConfigError
from candlestack.lookahead import violations
from candlestack.report import equity_png, html_report, markdown_image, metric_rows
from candlestack.strategies.config import (
    StrategiesFile,
    StrategyConfig,
    SweepConfig,
    load_strategies,
)
from resources import CandleSourceResource, LakeResource
from resources.deployment import settings

LOOKAHEAD_CHECK = "no_lookahead"
LOOKAHEAD_CUTS = 20


def _configured_strategies() -> StrategiesFile:
    """The strategies file, loaded with the code location: a mistake fails here, naming the
    field. A strategy on a symbol outside CANDLESTACK_SYMBOLS is an error in the user's own
    file; the built-in file just leaves it (and any sweep of it) out."""
    loaded = load_strategies(settings.strategies)
    configured = set(settings.symbols)
    outside = [c for c in loaded.strategies if c.symbol not in configured]
    if outside and settings.strategies is not None:
        raise ConfigError(
            f"strategy {outside[0].name!r} in {settings.strategies} trades "
            f"{outside[0].symbol}, which is not in CANDLESTACK_SYMBOLS "
            f"({', '.join(sorted(configured))})"
        )
    kept = [c for c in loaded.strategies if c.symbol in configured]
    names = {c.name for c in kept}
    return StrategiesFile(strategies=kept, sweeps=[s for s in loaded.sweeps if s.strategy in names])


strategies_file = _configured_strategies()


class BacktestWindow(dg.Config):
    """Override the configured window for one materialization (ISO days, inclusive)."""

    start: str | None = None
    end: str | None = None

    def apply(self, config: StrategyConfig) -> StrategyConfig:
        update = {k: date.fromisoformat(v) for k, v in vars(self).items() if v}
        return (
            StrategyConfig.model_validate({**config.model_dump(), **update}) if update else config
        )


def strategy_upstream(config: StrategyConfig) -> list[dg.AssetKey]:
    """What a strategy reads: its bars and the market rules. Not the stored features: a
    strategy computes its own indicators from the bars (with its own parameters, which a
    sweep varies), so the lineage shows no edge from features_<tf>."""
    bars = candles_1m.key if config.timeframe == "1m" else bars_key(config.timeframe)
    return [bars, markets.key]


def _numeric(metrics: dict) -> dict[str, float]:
    """Finite metrics as floats: the UI plots each across materializations."""
    return {
        name: float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }


def _backtest_asset(strategy: StrategyConfig) -> dg.AssetsDefinition:
    key = backtest_key(strategy.name)

    @dg.asset(
        key=key,
        deps=strategy_upstream(strategy),
        group_name="backtests",
        kinds={"parquet", "polars"},
        description=f"{strategy.strategy} on {strategy.symbol} {strategy.timeframe} bars "
        f"({strategy.strategy_object!r}); trades, equity and metrics stored in the lake.",
        check_specs=[
            dg.AssetCheckSpec(
                LOOKAHEAD_CHECK,
                asset=key,
                blocking=True,
                description="Signals at bar t do not change when the bars after t are "
                f"removed or altered ({LOOKAHEAD_CUTS} cut points over the backtest's bars).",
            )
        ],
    )
    def backtest(
        context: dg.AssetExecutionContext,
        source: CandleSourceResource,
        lake: LakeResource,
        config: BacktestWindow,
    ) -> dg.MaterializeResult:
        run_config = config.apply(strategy)
        exchange = source.exchange_name()
        stored = run_backtest(lake.lake, exchange, run_config)
        result, metrics = stored.result, stored.result.metrics
        equity = result.equity
        ts_ms = equity.get_column("ts").dt.epoch("ms").to_numpy()
        values = equity.get_column("equity").to_numpy()
        bars = stored.window.bars
        closes = bars.filter(pl.col("ts") >= equity.get_column("ts").first()).get_column("close")
        benchmark = (run_config.capital * closes / closes.first()).to_numpy()
        png = equity_png(ts_ms, values, benchmark, title=f"{strategy.name}: equity vs buy and hold")
        rows = metric_rows(metrics, METRICS)
        report = Path(lake.reports_path) / f"backtest_{strategy.name}.html"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(
            html_report(
                f"Backtest {strategy.name}", rows, png, result.trades, run_config.model_dump()
            )
        )
        found = violations(run_config, bars, cuts=LOOKAHEAD_CUTS)
        context.log.info(
            "%s: %d trades, total return %.4f, run %s (%s)",
            strategy.name,
            metrics["trades"],
            metrics["total_return"],
            stored.run_id,
            "stored" if stored.written else "already stored",
        )
        table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
        return dg.MaterializeResult(
            metadata={
                "metrics": dg.MetadataValue.md(table),
                "equity_and_drawdown": dg.MetadataValue.md(markdown_image(png, strategy.name)),
                "report": dg.MetadataValue.path(str(report.resolve())),
                **_numeric({k: metrics.get(k) for k in METRICS}),
                "last_trades": dg.MetadataValue.md(md_table(result.trades.tail(10))),
                "window": f"{stored.window.start} to {stored.window.end}",
                "run_id": stored.run_id,
                "inputs_hash": stored.inputs_hash,
                "trades_hash": stored.trades_hash,
                "results": dg.MetadataValue.path(str(stored.folder.resolve())),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=LOOKAHEAD_CHECK,
                    passed=found.is_empty(),
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "bars": bars.height,
                        "cut_points": LOOKAHEAD_CUTS,
                        "changed_signals": found.height,
                        "examples": dg.MetadataValue.md(md_table(found, limit=10)),
                    },
                )
            ],
        )

    return backtest


class SweepOverride(dg.Config):
    """Another grid (JSON, parameter -> values) or ranking metric for one materialization."""

    grid: str | None = None
    rank_by: str | None = None

    def apply(self, sweep: SweepConfig) -> SweepConfig:
        update = {"grid": json.loads(self.grid) if self.grid else None, "rank_by": self.rank_by}
        changed = {k: v for k, v in update.items() if v is not None}
        return SweepConfig.model_validate({**sweep.model_dump(), **changed}) if changed else sweep


def _sweep_asset(sweep: SweepConfig) -> dg.AssetsDefinition:
    strategy = strategies_file.strategy(sweep.strategy)

    @dg.asset(
        key=sweep_key(sweep.name),
        deps=strategy_upstream(strategy),
        group_name="backtests",
        kinds={"parquet", "polars"},
        description=f"Parameter sweep of {sweep.strategy} over {sweep.grid}, ranked by "
        f"{sweep.rank_by}.",
    )
    def sweep_asset(
        context: dg.AssetExecutionContext,
        source: CandleSourceResource,
        lake: LakeResource,
        config: SweepOverride,
    ) -> dg.MaterializeResult:
        run = config.apply(sweep)
        stored = run_sweep(
            lake.lake, source.exchange_name(), strategy, run.grid, run.rank_by, run.name
        )
        for reason in stored.invalid:
            context.log.info("left out %s", reason)
        if stored.results.is_empty():
            raise ValueError(f"sweep {run.name!r}: no valid combination: {stored.invalid}")
        top = stored.results.select("rank", *sorted(run.grid), *METRICS)
        best = top.row(0, named=True) if not top.is_empty() else {}
        return dg.MaterializeResult(
            metadata={
                "combinations": stored.results.height,
                "left_out": len(stored.invalid),
                "rank_by": run.rank_by,
                **_numeric({f"best_{run.rank_by}": best.get(run.rank_by)}),
                "best_params": {k: best.get(k) for k in sorted(run.grid)},
                "ranking": dg.MetadataValue.md(md_table(top.head(20))),
                "results": dg.MetadataValue.path(str(stored.path.resolve())),
                "run_id": stored.run_id,
            }
        )

    return sweep_asset


backtest_assets = [_backtest_asset(c) for c in strategies_file.strategies]
sweep_assets = [_sweep_asset(s) for s in strategies_file.sweeps]
