"""Backtests against the lake: load bars and market rules, run, hash, store.

One folder per run (Lake.backtest_folder, Lake.sweep_path). The run id is the start of the
inputs hash (bar content hashes, market rules, config, code version), so a rerun on the same
inputs is recognised and writes nothing, and a changed input never overwrites an old result.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from candlestack.backtest import BacktestResult, backtest, strategy_features
from candlestack.config import symbol_key
from candlestack.errors import LakeError
from candlestack.execution import RuleBook
from candlestack.features import warmup_bars
from candlestack.lake import Lake, LakePath, content_hash, write_parquet_atomic
from candlestack.provenance import PACKAGE, code_version
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.strategies.config import StrategyConfig
from candlestack.sweep import sweep

logger = logging.getLogger(__name__)

BAR_COLUMNS_1M = ["ts", "open", "high", "low", "close", "volume", "imputed"]
BAR_COLUMNS = ["ts", "open", "high", "low", "close", "volume", "n_imputed", "complete"]


def _strategy_source_hash(config: StrategyConfig) -> str:
    """A user strategy lives outside the package: its module's source counts too."""
    module = inspect.getmodule(type(config.strategy_object))
    source = inspect.getsourcefile(module) if module else None
    if source is None or Path(source).resolve().is_relative_to(PACKAGE):
        return ""
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


@dataclass(frozen=True)
class BarWindow:
    bars: pl.DataFrame  # warm-up history included
    start: date  # first traded day
    end: date  # last traded day
    day_hashes: dict[str, str]  # ISO day -> content hash of that day's stored bars


def bar_dataset(config: StrategyConfig) -> str:
    """Where the config's bars are: 1-minute candles for 1m, else the bars dataset."""
    return "ohlcv" if config.timeframe == "1m" else "bars"


def load_window(lake: Lake, exchange: str, config: StrategyConfig) -> BarWindow:
    """The config's bars from the lake: its window plus enough earlier days to warm up."""
    dataset, key = bar_dataset(config), symbol_key(config.symbol)
    reports = lake.day_reports(dataset, exchange, config.timeframe, key)
    if not reports:
        raise LakeError(
            f"no {config.timeframe} bars of {config.symbol} on {exchange} in {lake.root}; "
            f"materialize them first (strategy {config.name!r})"
        )
    days = sorted(reports)
    start = max(config.start or days[0], days[0])
    end = min(config.end or days[-1], days[-1])
    if end < start:
        raise LakeError(
            f"strategy {config.name!r}: no {config.timeframe} bars of {config.symbol} between "
            f"{config.start} and {config.end} (stored: {days[0]} to {days[-1]})"
        )
    specs = strategy_features(config.strategy_object, config.timeframe)
    warmup_minutes = warmup_bars(specs) * TIMEFRAME_MINUTES[config.timeframe] if specs else 0
    first_load = start - timedelta(days=math.ceil(warmup_minutes / 1440) + 1)
    chosen = [d for d in days if first_load <= d <= end]
    columns = BAR_COLUMNS_1M if config.timeframe == "1m" else BAR_COLUMNS
    bars = lake.read_days(dataset, exchange, config.timeframe, key, chosen[0], end, columns)
    hashes = {d.isoformat(): reports[d]["content_hash"] for d in chosen}
    return BarWindow(bars=bars, start=start, end=end, day_hashes=hashes)


def load_rules(lake: Lake, exchange: str, symbol: str, since: date | None = None) -> RuleBook:
    """The symbol's market rules (from the snapshot in force on `since` on, when given: a
    dry-run bar reads the days it fills on, not the lake's whole history)."""
    snapshots = lake.read_markets(exchange, since)
    if snapshots is None:
        raise LakeError(
            f"no market rules for {exchange} in {lake.root}: materialize the markets asset "
            "(lot and tick sizes and min notional come from it)"
        )
    try:
        return RuleBook.from_snapshots(snapshots, symbol)
    except KeyError as exc:
        raise LakeError(f"{exchange} markets snapshots have no {symbol}") from exc


def inputs_hash(config: StrategyConfig, window: BarWindow, rules: RuleBook) -> str:
    digest = hashlib.sha256()
    payload = {
        "config": config.model_dump(mode="json"),
        "window": [window.start.isoformat(), window.end.isoformat()],
        "bars": window.day_hashes,
        "code": code_version(),
        "strategy_source": _strategy_source_hash(config),
    }
    digest.update(json.dumps(payload, sort_keys=True).encode())
    for array in vars(rules).values():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredBacktest:
    result: BacktestResult
    window: BarWindow
    run_id: str
    folder: LakePath
    inputs_hash: str
    trades_hash: str
    written: bool  # False when this exact run was already stored


def run_backtest(lake: Lake, exchange: str, config: StrategyConfig) -> StoredBacktest:
    """Load, run and store one configured backtest."""
    window = load_window(lake, exchange, config)
    rules = load_rules(lake, exchange, config.symbol)
    result = backtest(config, window.bars, rules, start=window.start)
    digest = inputs_hash(config, window, rules)
    trades_digest = content_hash(result.trades)
    run_id = digest[:16]
    folder = lake.backtest_folder(config.name, run_id)
    metrics = metrics_row(config, exchange, window, result, digest, trades_digest)
    written = _store(
        folder,
        {
            "trades": result.trades,
            "equity": result.equity,
            "rejections": result.rejections,
            "metrics": metrics,
        },
    )
    return StoredBacktest(result, window, run_id, folder, digest, trades_digest, written)


def metrics_row(
    config: StrategyConfig,
    exchange: str,
    window: BarWindow,
    result: BacktestResult,
    inputs_digest: str,
    trades_digest: str,
) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "exchange": exchange,
                "symbol": config.symbol,
                "timeframe": config.timeframe,
                "strategy_class": config.strategy,
                "window_start": window.start,
                "window_end": window.end,
                **{k: float(v) for k, v in result.metrics.items()},
                "inputs_hash": inputs_digest,
                "trades_hash": trades_digest,
                "code_version": code_version(),
                "config": json.dumps(config.model_dump(mode="json"), sort_keys=True),
            }
        ]
    )


def _store(folder: LakePath, frames: dict[str, pl.DataFrame]) -> bool:
    """Each file atomically; metrics last, so a stored metrics file means a complete run."""
    if (folder / "metrics.parquet").exists():
        return False
    for name, frame in frames.items():
        write_parquet_atomic(folder / f"{name}.parquet", frame.to_arrow(), {})
    return True


@dataclass(frozen=True)
class StoredSweep:
    results: pl.DataFrame  # ranked, best first
    invalid: list[str]  # combinations left out, with the reason
    run_id: str
    path: LakePath
    written: bool


def run_sweep(
    lake: Lake, exchange: str, config: StrategyConfig, grid: dict, rank_by: str, name: str
) -> StoredSweep:
    """Run and store a parameter sweep of one configured strategy over its window."""
    window = load_window(lake, exchange, config)
    rules = load_rules(lake, exchange, config.symbol)
    results, invalid = sweep(config, grid, window.bars, rules, window.start, rank_by)
    digest = hashlib.sha256(
        (inputs_hash(config, window, rules) + json.dumps([grid, rank_by], sort_keys=True)).encode()
    ).hexdigest()
    run_id = digest[:16]
    path = lake.sweep_path(name, run_id)
    written = not path.exists()
    if written:
        table = results.with_columns(
            pl.lit(config.name).alias("strategy"),
            pl.lit(rank_by).alias("rank_by"),
            pl.lit(window.start).alias("window_start"),
            pl.lit(window.end).alias("window_end"),
            pl.lit(digest).alias("inputs_hash"),
        )
        write_parquet_atomic(path, table.to_arrow(), {})
    return StoredSweep(results, invalid, run_id, path, written)
