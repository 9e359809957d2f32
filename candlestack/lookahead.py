"""Look-ahead guard: a strategy's signals at bar t must not depend on bars after t.

Like freqtrade's lookahead-analysis, but over every signal, not a sample of trades: signals
are computed on the full history, then again on the history cut at several bars t, once
with the later bars removed and once with them altered (prices scrambled). Any signal at or
before t that differs is a violation: the strategy peeked at the future.

    python -m candlestack.lookahead                    # every configured strategy, lake bars
    python -m candlestack.lookahead --name btc_ma_cross --cuts 50
    python -m candlestack.lookahead --strategy mymod:MyStrategy --params '{"n": 5}' \
        --candles BTCUSDT_1m.csv --timeframe 15m
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from candlestack.backtest import config_signals
from candlestack.backtest_store import load_window
from candlestack.config import load_settings
from candlestack.lake import Lake
from candlestack.resample import minute_bars, resample
from candlestack.sources.replay import read_candle_file
from candlestack.strategies.config import StrategyConfig, load_strategies

VIOLATIONS = pl.Schema(
    {
        "cut_ts": pl.Datetime("ms", "UTC"),
        "bar_ts": pl.Datetime("ms", "UTC"),
        "signal": pl.String,
        "variant": pl.String,  # "removed" or "altered": what happened to the bars after the cut
        "with_future": pl.Boolean,
        "without_future": pl.Boolean,
    }
)
_PRICES = ["open", "high", "low", "close"]


def _altered(bars: pl.DataFrame, cut: int, rng: np.random.Generator) -> pl.DataFrame:
    """Bars after `cut` with prices scaled by a random factor per bar (still valid OHLC)."""
    factor = np.ones(bars.height)
    factor[cut + 1 :] = rng.uniform(0.5, 1.5, bars.height - cut - 1)
    return bars.with_columns(pl.col(c) * pl.Series(factor) for c in _PRICES if c in bars.columns)


def cut_points(height: int, cuts: int, first: int = 0) -> list[int]:
    """`cuts` bars spread evenly from `first` to the second-to-last bar."""
    if height - first < 2:
        return []
    return sorted({int(c) for c in np.linspace(first, height - 2, num=cuts)})


def violations(
    config: StrategyConfig, bars: pl.DataFrame, cuts: int = 20, seed: int = 0
) -> pl.DataFrame:
    """Every signal at or before a cut that changes when the bars after it are removed or
    altered (VIOLATIONS); empty when the strategy never looks ahead on these bars."""
    full_entry, full_exit = config_signals(config, bars)
    rng = np.random.default_rng(seed)
    ts = bars.get_column("ts")
    found = []
    for cut in cut_points(bars.height, cuts):
        variants = {
            "removed": bars.head(cut + 1),
            "altered": _altered(bars, cut, rng),
        }
        for variant, changed in variants.items():
            entry, exit_ = config_signals(config, changed)
            for name, full, partial in (("entry", full_entry, entry), ("exit", full_exit, exit_)):
                differs = np.flatnonzero(full[: cut + 1] != partial[: cut + 1])
                found.extend(
                    {
                        "cut_ts": ts[cut],
                        "bar_ts": ts[int(i)],
                        "signal": name,
                        "variant": variant,
                        "with_future": bool(full[i]),
                        "without_future": bool(partial[i]),
                    }
                    for i in differs
                )
    return pl.DataFrame(found, schema=VIOLATIONS)


def _configs_from_args(args: argparse.Namespace) -> list[StrategyConfig]:
    if args.strategy:
        return [
            StrategyConfig(
                name="cli",
                strategy=args.strategy,
                symbol=args.symbol,
                timeframe=args.timeframe,
                params=json.loads(args.params),
            )
        ]
    configured = load_strategies(args.strategies).strategies
    chosen = [c for c in configured if args.name in (None, c.name)]
    if not chosen:
        raise SystemExit(f"no strategy named {args.name!r} in {args.strategies or 'the default'}")
    return chosen


def _bars_from_args(args: argparse.Namespace, config: StrategyConfig) -> pl.DataFrame:
    if args.candles:
        candles = read_candle_file(args.candles).with_columns(
            pl.col("ts").cast(pl.Datetime("ms", "UTC")), pl.lit(False).alias("imputed")
        )
        minutes = minute_bars(candles)
        return minutes if config.timeframe == "1m" else resample(minutes, config.timeframe)
    settings = load_settings()
    return load_window(Lake(settings.lake), settings.exchange_id, config).bars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m candlestack.lookahead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--strategies", type=Path, help="strategies file (default: built-in)")
    parser.add_argument("--name", help="only this configured strategy")
    parser.add_argument(
        "--strategy", help="a strategy reference (built-in, entry point, module:Class)"
    )
    parser.add_argument("--params", default="{}", help="its parameters as JSON")
    parser.add_argument("--symbol", default="BTC/USDT")
    parser.add_argument("--timeframe", default="1m")
    parser.add_argument("--candles", type=Path, help="1m candle file instead of the lake")
    parser.add_argument("--cuts", type=int, default=20, help="cut points per strategy")
    args = parser.parse_args(argv)
    failed = False
    for config in _configs_from_args(args):
        bars = _bars_from_args(args, config)
        found = violations(config, bars, cuts=args.cuts)
        if found.is_empty():
            print(f"{config.name}: no look-ahead in {bars.height} bars, {args.cuts} cuts")
        else:
            failed = True
            print(f"{config.name}: LOOK-AHEAD, {found.height} signals change with future bars")
            print(found.head(10))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
