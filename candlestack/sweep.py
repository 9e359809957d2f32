"""Parameter sweeps: every combination of a grid, ranked by one metric.

Each distinct feature is computed once for the whole grid (an SMA(20) shared by ten
combinations is one TA-Lib call); signals and the compiled simulation run per combination.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from typing import Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from candlestack.backtest import METRICS, BarArrays, _epoch_ms, simulate, strategy_features
from candlestack.execution import RuleBook
from candlestack.features import compute
from candlestack.strategies.base import signals
from candlestack.strategies.config import StrategyConfig

# Metrics where smaller is better; every other one ranks largest first.
LOWER_IS_BETTER = {"max_drawdown", "max_drawdown_days", "fees", "rejected_orders"}


def combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def sweep(
    config: StrategyConfig,
    grid: dict[str, list[Any]],
    bars: pl.DataFrame,
    rules: RuleBook,
    start: date | datetime | None = None,
    rank_by: str = "sharpe",
) -> tuple[pl.DataFrame, list[str]]:
    """One row per valid combination (its parameters, then every metric), best first, and
    the reasons invalid combinations (e.g. fast >= slow) were left out."""
    if rank_by not in METRICS:
        raise ValueError(f"rank_by {rank_by!r} is not a metric; one of {', '.join(METRICS)}")
    runs: list[tuple[dict[str, Any], StrategyConfig]] = []
    invalid: list[str] = []
    for combo in combinations(grid):
        try:
            runs.append((combo, config.with_params(**combo)))
        except ValidationError as exc:
            invalid.append(f"{combo}: {exc.errors()[0]['msg']}")
    ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
    first = int(np.searchsorted(ts, _epoch_ms(start, ts), side="left"))
    arrays = BarArrays.of(bars, ts)
    computed: dict[str, pl.DataFrame] = {}
    frames = []
    for _, run_config in runs:
        specs = strategy_features(run_config.strategy_object, run_config.timeframe)
        for spec in specs:
            key = spec.model_dump_json()
            if key not in computed:
                computed[key] = compute(bars, [spec]).drop("ts")
        columns = [computed[spec.model_dump_json()] for spec in specs]
        frames.append(bars.hstack([c for frame in columns for c in frame.get_columns()]))

    def run(job: tuple[tuple[dict[str, Any], StrategyConfig], pl.DataFrame]) -> dict[str, Any]:
        (combo, run_config), frame = job
        entry, exit_ = signals(run_config.strategy_object, frame)
        result = simulate(run_config, arrays, ts, entry, exit_, rules, first, frames=False)
        return {**combo, **{k: float(result.metrics[k]) for k in METRICS}}

    # polars and the compiled loop release the GIL: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = list(pool.map(run, zip(runs, frames, strict=True)))
    if not rows:
        return pl.DataFrame(), invalid
    results = pl.DataFrame(rows)
    descending = rank_by not in LOWER_IS_BETTER
    ranked = results.with_columns(
        pl.when(pl.col(rank_by).is_nan()).then(None).otherwise(pl.col(rank_by)).alias("_key")
    ).sort("_key", descending=descending, nulls_last=True, maintain_order=True)
    ranked = ranked.drop("_key").with_row_index("rank", offset=1)
    return ranked.with_columns(pl.col("rank").cast(pl.Int64)), invalid
