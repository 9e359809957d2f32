"""The demo: an offline backfill of the last 7 UTC days for 3 symbols, through every asset
and check that exists, then a summary of what the lake holds.

    DAGSTER_HOME=$PWD python -m pipelines.demo      (or: make demo)

Runs are recorded in the instance under data/, so `dagster dev` shows them afterwards.
"""

import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl

from assets.tags import RANGE_END_TAG, RANGE_START_TAG
from candlestack.catalog import connect
from candlestack.checks import gap_failures, sanity_failures
from candlestack.config import symbol_key
from candlestack.feature_store import load_feature_set
from candlestack.lake import month_of
from candlestack.resample import TIMEFRAME_MINUTES

DAYS = 7
# Closed bars each enabled strategy paper-trades in the demo, one dry-run run per bar.
DRY_RUN_BARS = 12


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _range_tags(start: str, end: str) -> dict[str, str]:
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


def _bars_summary(catalog: Path, lake, first: str) -> pl.DataFrame:
    with connect(catalog, lake) as con:
        return con.sql(
            "SELECT timeframe, count(*) AS bars, count(*) FILTER (complete) AS complete, "
            "sum(n_imputed) AS imputed_minutes, count(DISTINCT symbol || date) AS symbol_days "
            "FROM bars WHERE date >= ?::DATE GROUP BY timeframe "
            "ORDER BY min(n_source) DESC, timeframe",
            params=[first],
        ).pl()


def _features_summary(lake, exchange: str, timeframes, first: str) -> pl.DataFrame:
    rows = [
        report
        for timeframe in timeframes
        for symbol in lake.symbol_keys("features", exchange, timeframe)
        for day, report in lake.day_reports("features", exchange, timeframe, symbol).items()
        if day.isoformat() >= first
    ]
    if not rows:
        return pl.DataFrame()
    return (
        pl.DataFrame(rows)
        .group_by("timeframe")
        .agg(
            pl.len().alias("symbol_days"),
            pl.col("warm").sum().alias("warm_days"),
            pl.col("rows").sum(),
            pl.col("warmup_bars").first(),
            pl.col("nulls").sum().alias("null_values"),
        )
        .sort(pl.col("timeframe").replace_strict(TIMEFRAME_MINUTES, return_dtype=pl.Int64))
    )


def _materializations(result) -> list[tuple[str, dict]]:
    events = (e.materialization for e in result.get_asset_materialization_events())
    return [
        (m.asset_key.to_user_string(), {k: v.value for k, v in m.metadata.items()}) for m in events
    ]


def _backtest_summary(result) -> pl.DataFrame:
    rows = []
    for name, meta in _materializations(result):
        if not name.startswith("backtest_"):
            continue
        rows.append(
            {
                "strategy": name.removeprefix("backtest_"),
                "window": meta["window"],
                "trades": int(meta.get("trades", 0)),
                "total return %": round(100 * meta.get("total_return", float("nan")), 2),
                "buy & hold %": round(100 * meta.get("buy_and_hold_return", float("nan")), 2),
                "max drawdown %": round(100 * meta.get("max_drawdown", float("nan")), 2),
                "sharpe": round(meta.get("sharpe", float("nan")), 2),
                "win rate %": round(100 * meta.get("win_rate", float("nan")), 1),
                "fees": round(meta.get("fees", 0.0), 2),
                "rejected": int(meta.get("rejected_orders", 0)),
                "skipped (imputed)": int(meta.get("skipped_entries", 0)),
            }
        )
    return pl.DataFrame(rows)


def _dry_run_session(defs, instance, lake, exchange) -> list:
    """The sensor's work by hand: one run of the dry-run job per newest closed bar of each
    enabled strategy, in order, then the drift and audit checks."""
    from assets.dry_run import enabled_strategies
    from assets.keys import dry_run_key
    from pipelines.sensors import closed_bars, run_request

    job = defs.resolve_job_def("dry_run")
    today = datetime.now(UTC).date()
    results = []
    for strategy in enabled_strategies:
        for bar_ts in closed_bars(lake, exchange, strategy, today)[-DRY_RUN_BARS:]:
            request = run_request(strategy, bar_ts)
            results.append(
                job.execute_in_process(
                    instance=instance,
                    run_config={**request.run_config, **QUIET},
                    asset_selection=[dry_run_key(strategy.name)],
                    tags=request.tags,
                    raise_on_error=False,
                )
            )
    checks = defs.resolve_job_def("dry_run_checks").execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False
    )
    return [*results, checks]


def _print_dry_run(defs, runs) -> None:
    from assets.dry_run import enabled_strategies
    from candlestack.dryrun import latency_stats

    ledger = defs.resources["ledger"].process_config_and_initialize().open()
    print(f"\ndry-run (paper trading only: nothing sends a real order), ledger {ledger.url}:")
    orders = ledger.orders()
    table = dict(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_cols=-1,
                 tbl_width_chars=200, tbl_rows=30)  # fmt: skip
    with pl.Config(**table):
        print("orders (latest 15):")
        print(orders.select("strategy", "symbol", "side", "amount", "price", "status", "reason",
                            "created_at").tail(15))  # fmt: skip
        print("rejections:")
        print(orders.filter(pl.col("status") == "rejected").select(
            "strategy", "side", "amount", "price", "reason").tail(10))  # fmt: skip
        print("fills (latest 10):")
        print(ledger.fills().select("strategy", "side", "amount", "price", "fee", "bar_ts",
                                    "filled_at").tail(10))  # fmt: skip
        print("positions:")
        print(ledger.positions().drop("refused_exit"))
        rows = []
        checks = {e.asset_key.to_user_string(): e for e in runs[-1].get_asset_check_evaluations()}
        for strategy in enabled_strategies:
            balance = ledger.balance(strategy.name)
            decisions = ledger.decisions(strategy.name)
            drift = checks.get(f"dryrun_{strategy.name}")
            meta = {k: v.value for k, v in drift.metadata.items()} if drift else {}
            stats = latency_stats(decisions, strategy.timeframe)
            rows.append(
                {
                    "strategy": strategy.name,
                    "bars": decisions.height,
                    "cash": round(balance.cash, 2) if balance else None,
                    "realised pnl": round(balance.realised_pnl, 4) if balance else None,
                    "fees": round(balance.fees, 4) if balance else None,
                    "kill switch": ledger.tripped(strategy.name) or "armed",
                    "signal agreement": meta.get("signal_agreement"),
                    "fill diff bps": meta.get("fill_price_diff_bps_max"),
                    "pnl diff": meta.get("pnl_diff"),
                    "drift": ("passed" if drift.passed else "FAILED") if drift else "n/a",
                    "compute p95 ms": round(stats.get("decision_compute_p95_ms", 0.0), 1),
                }
            )
        print("balances, kill switch and drift against the backtest replayed on the same bars:")
        print(pl.DataFrame(rows))
    audit = checks.get("ledger")
    head = ledger.audit_head()
    print(f"audit chain: {'verified' if audit and audit.passed else 'FAILED'}, "
          f"{head[0]} events, head {head[1][:16]}...")  # fmt: skip
    failed = [r.run_id for r in runs if not r.success]
    print(f"dry-run runs: {len(runs) - 1} succeeded" if not failed else f"FAILED runs: {failed}")


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    os.environ.setdefault("DAGSTER_HOME", str(root))
    os.chdir(root)
    logging.basicConfig(level=logging.WARNING)
    today = datetime.now(UTC).date()
    first = (today - timedelta(days=DAYS - 1)).isoformat()
    # Month partitions ingest their days from the start date on: the demo's 7 days, unless
    # the start date is set.
    os.environ.setdefault("CANDLESTACK_START_DATE", first)
    # Settings are read once, when the code loads: after DAGSTER_HOME and the start date.
    from assets.partitions import candle_range
    from pipelines.definitions import defs, settings

    instance = dg.DagsterInstance.get()
    if first < settings.start_date.isoformat():
        print(f"CANDLESTACK_START_DATE {settings.start_date} is after {first}", file=sys.stderr)
        return 2
    keys = candle_range(first, today.isoformat())
    print(
        f"candlestack demo: {settings.source} source, {len(settings.symbols)} symbols "
        f"({', '.join(settings.symbols)}), {first} .. {today} (today still open)"
    )

    candles = defs.resolve_job_def("ingest_and_build").execute_in_process(
        instance=instance,
        tags=_range_tags(keys.start, keys.end),
        run_config=QUIET,
        raise_on_error=False,
    )
    markets = defs.resolve_job_def("snapshot_markets").execute_in_process(
        instance=instance,
        tags=_range_tags(first, today.isoformat()),
        run_config=QUIET,
        raise_on_error=False,
    )
    backtests = defs.resolve_job_def("backtest").execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False
    )
    catalog = defs.resolve_job_def("refresh_catalog").execute_in_process(
        instance=instance, run_config=QUIET, raise_on_error=False
    )
    lake = defs.resources["lake"].lake
    exchange = defs.resources["source"].process_config_and_initialize().exchange_name()
    dry_runs = _dry_run_session(defs, instance, lake, exchange)

    reports = lake.reports(exchange).filter(pl.col("date") >= datetime.fromisoformat(first).date())
    stored = []
    for report in reports.iter_rows(named=True):
        gaps = lake.read_day_report(exchange, report["symbol"], report["date"])[1]
        stored.append((report["symbol"], report["date"], report, gaps))
    gaps_failed = gap_failures(stored, settings.imputed_max_share)
    months = {(s, month_of(d)) for s, d, _, _ in stored}
    sanity_failed = sanity_failures(
        (s, m, lake.month_path("ohlcv", exchange, "1m", s, m)) for s, m in sorted(months)
    )
    failed = [*gaps_failed["symbol"], *sanity_failed["symbol"]]
    rows = []
    for symbol in settings.symbols:
        mine = reports.filter(pl.col("symbol") == symbol_key(symbol))
        failures = failed.count(symbol_key(symbol))
        rows.append(
            {
                "symbol": symbol,
                "days": mine.height,
                "rows": mine["rows"].sum(),
                "missing found": mine["missing_found"].sum(),
                "re-fetched": mine["refetched"].sum(),
                "imputed": mine["imputed"].sum(),
                "still missing": mine["missing"].sum(),
                "rejected": mine["rejected"].sum(),
                "checks passed": 2 * mine.height - failures,
                "checks failed": failures,
            }
        )
    with pl.Config(
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        tbl_rows=50,
        tbl_cols=-1,
        tbl_width_chars=200,
    ):
        print(pl.DataFrame(rows))
        print("\nbars per timeframe (all symbols, the same days):")
        print(_bars_summary(settings.catalog, lake, first))
        print("\nfeatures per timeframe (a day is warm once its whole warm-up is in the lake):")
        timeframes = load_feature_set(settings.features).timeframes
        print(_features_summary(lake, exchange, timeframes, first))

    print("\nbacktests (fills at the next open with slippage, fees, lot/tick/min-notional rules):")
    with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_cols=-1,
                   tbl_width_chars=200, tbl_rows=20):  # fmt: skip
        print(_backtest_summary(backtests))
        for sweep in (m for m in _materializations(backtests) if m[0].startswith("sweep_")):
            name, meta = sweep
            print(f"\n{name}: {meta['combinations']} combinations ranked by {meta['rank_by']}, "
                  f"best {meta['best_params']}; results {meta['results']}")  # fmt: skip
    print("  reports: " + str((root / settings.reports).resolve()))

    print("\nasset checks recorded by Dagster (one evaluation per single-run range):")
    evaluations = sorted(
        [*candles.get_asset_check_evaluations(), *backtests.get_asset_check_evaluations()],
        key=lambda e: (e.asset_key.to_user_string(), e.check_name),
    )
    for evaluation in evaluations:
        name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
        print(f"  {name:<34} {'passed' if evaluation.passed else 'FAILED'}")
    for name, result in (
        ("ingest_and_build", candles),
        ("snapshot_markets", markets),
        ("backtest", backtests),
        ("refresh_catalog", catalog),
    ):
        print(f"  run {name:<17} {'succeeded' if result.success else 'FAILED'} ({result.run_id})")

    _print_dry_run(defs, dry_runs)

    print(f"\nlake:     {lake.location}")
    print(
        f"catalog:  {Path(settings.catalog).resolve()}  (views ohlcv, bars, features, gaps, "
        "partitions, revisions, markets, trades, backtest_metrics, sweep_results; open it "
        "read-only)"
    )
    print(f"instance: {Path(instance.root_directory).resolve()}")
    print("UI:       DAGSTER_HOME=$PWD dagster dev -h 127.0.0.1   (or: make ui)")
    runs = (candles, markets, backtests, catalog, *dry_runs)
    return 0 if all(run.success for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
