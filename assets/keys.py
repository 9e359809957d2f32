"""Asset keys, spelled once: the names a user sees in the UI, the CLI and the catalog."""

import dagster as dg

CANDLES_KEY = dg.AssetKey("candles_1m")
LEDGER_KEY = dg.AssetKey("ledger")


def bars_key(timeframe: str) -> dg.AssetKey:
    return dg.AssetKey(f"bars_{timeframe}")


def features_key(timeframe: str) -> dg.AssetKey:
    return dg.AssetKey(f"features_{timeframe}")


def backtest_key(strategy: str) -> dg.AssetKey:
    return dg.AssetKey(f"backtest_{strategy}")


def sweep_key(sweep: str) -> dg.AssetKey:
    return dg.AssetKey(f"sweep_{sweep}")


def dry_run_key(strategy: str) -> dg.AssetKey:
    return dg.AssetKey(f"dryrun_{strategy}")
