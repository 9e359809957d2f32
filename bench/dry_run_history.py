"""Benchmark: one dry-run step and its drift check with 0 and with N earlier decisions.

    python bench/dry_run_history.py [--decisions 500000] [--steps 3]

A lake of synthetic 1m BTC/USDT candles reaching today (one more day than the history
needs, plus the markets of every day), and the built-in 1m strategy (btc_scalp, ma_cross
5/20) with a price band it never enters in, so its history agrees with its backtest and
trades nothing. For each size, a fresh SQLite ledger gets that many earlier decisions of
the strategy, one per minute up to the bars the bench decides, with the strategy's own
signals and audit events that bind the rows as the ledger binds them (written in bulk; the
last two through `Ledger.record_decision`, the write path itself). Then, in process:

- audit_chain: one materialization of the `ledger` asset, the periodic full verification
  (timed, not counted in the steps: production runs it every 15 minutes);
- step: `--steps` materializations of the real `dryrun_btc_scalp` asset, one per new
  closed bar (verification, lake reads, decision, ledger commit, metadata);
- drift: `--steps` runs of its `drift` asset check.

Prints the median wall time of each, per size, and the ratio. Target: within 20 %.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

STRATEGIES = """
strategies:
  - name: btc_scalp
    strategy: ma_cross
    symbol: BTC/USDT
    timeframe: 1m
    order_value: 1000
    capital: 10000
    max_price: 1
    params: {fast: 5, slow: 20, average: ema}
    dry_run: {enabled: true, stale_after_seconds: 100000000}
"""
STRATEGY = "btc_scalp"
SYMBOL = "BTC/USDT"
BATCH = 20_000
MINUTE = timedelta(minutes=1)
WINDOW = 7 * 1440  # the drift check's default window_days, in 1m bars
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def build_lake(folder: Path, days: int):
    from candlestack.ingest import Ingestor
    from candlestack.lake import Lake, write_parquet_atomic
    from candlestack.sources.synthetic import SyntheticSource

    lake = Lake(folder / "lake")
    source = SyntheticSource(seed=7, symbols=[SYMBOL])
    today = datetime.now(UTC).date()
    span = [today - timedelta(days=k) for k in range(days, -1, -1)]
    Ingestor(source, lake).ingest(SYMBOL, span)
    markets = source.load_markets().to_arrow()
    for day in span:
        write_parquet_atomic(lake.markets_path("synthetic", day), markets, {})
    return lake


def seed(url: str, lake, config, first_bar: datetime, count: int) -> None:
    """`count` decisions on the bars from `first_bar` on, bound as the ledger binds them."""
    from sqlalchemy import create_engine, insert, inspect, text, update

    from candlestack.backtest import config_signals
    from candlestack.backtest_store import load_window
    from candlestack.ledger import (
        GENESIS_HASH,
        STATE_KEY,
        AuditEventRow,
        Balance,
        BalanceRow,
        ChainHeadRow,
        DecisionRecord,
        DecisionRow,
        Ledger,
        SeenBar,
        chained_rows,
        row_digest,
    )

    ledger = Ledger(url)
    ledger.migrate()
    if count == 0:
        ledger.close()
        return
    bulk = count - 2
    bars = load_window(lake, "synthetic", config).bars
    entry, exit_ = config_signals(config, bars)
    ts = bars.get_column("ts").to_list()
    index = {t: k for k, t in enumerate(ts)}
    balance = Balance(cash=config.capital, realised_pnl=0.0, fees=0.0, peak_equity=config.capital)
    now = datetime.now(UTC)
    balance_row = {"strategy": STRATEGY, **balance.__dict__, "updated_at": now}
    balance_binding = ["balances", {"strategy": STRATEGY}, row_digest("balances", balance_row)]
    flat = ["positions", {"strategy": STRATEGY, "symbol": SYMBOL}, None]

    def record(n: int) -> DecisionRecord:
        bar_ts = first_bar + n * MINUTE
        k = index[bar_ts]
        row = bars.row(k, named=True)
        return DecisionRecord(
            strategy=STRATEGY,
            symbol=SYMBOL,
            timeframe="1m",
            bar_ts=bar_ts,
            entry_signal=bool(entry[k]),
            exit_signal=bool(exit_[k]),
            action="none",
            balance=balance,
            seen=SeenBar(row["open"], row["high"], row["low"], row["close"], row["volume"], False),
            compute_ms=1.7,
            run_id=str(uuid.UUID(int=n)),
            decided_at=bar_ts + MINUTE + timedelta(seconds=1),
        )

    engine = create_engine(url)
    prev_hash = GENESIS_HASH
    with engine.begin() as conn:
        for start in range(0, bulk, BATCH):
            decisions, events = [], []
            for n in range(start, min(start + BATCH, bulk)):
                decision = record(n)
                values = {"id": n + 1, **Ledger._decision_values(decision)}
                decisions.append(values)
                binding = ["decisions", {"id": n + 1}, row_digest("decisions", values)]
                payload = decision.audit_payload()
                payload[STATE_KEY] = [binding, flat, balance_binding]
                events.append((decision.decided_at, "decision", STRATEGY, payload))
            rows = chained_rows(start, prev_hash, events)
            prev_hash = rows[-1]["hash"]
            conn.execute(insert(DecisionRow), decisions)
            conn.execute(insert(AuditEventRow), rows)
        conn.execute(insert(BalanceRow).values(**balance_row))
        conn.execute(update(ChainHeadRow).values(seq=bulk, hash=prev_hash))
        if "decision_totals" in inspect(conn).get_table_names():
            # The running totals each decision write keeps (schema 0004 on).
            totals = dict.fromkeys(("orders", "rejected", "fills", "blocked"), 0)
            conn.execute(
                text(
                    "INSERT INTO decision_totals VALUES (:strategy, :decisions, :orders, "
                    ":rejected, :fills, :blocked, :skipped_entries)"
                ),
                {"strategy": STRATEGY, "decisions": bulk, "skipped_entries": 0, **totals},
            )
    engine.dispose()
    for n in range(bulk, count):
        assert ledger.record_decision(record(n))
    ledger.close()


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def session(folder: Path, lake, size: int, steps: int, newest: datetime) -> tuple[float, float]:
    """Median wall seconds of a dry-run step and of a drift check, in ms."""
    import dagster as dg

    from assets.backtests import strategies_file
    from assets.dry_run import drift_checks, dry_run_assets, ledger_snapshot
    from resources import LakeResource, LedgerResource, SyntheticSourceResource

    config = next(c for c in strategies_file.strategies if c.name == STRATEGY)
    folder.mkdir(exist_ok=True)
    url = f"sqlite:///{folder / 'ledger.sqlite'}"
    first_step = newest - (steps - 1) * MINUTE
    started = time.perf_counter()
    seed(url, lake, config, first_step - size * MINUTE, size)
    print(f"  seeded {size:,} decisions in {time.perf_counter() - started:.1f} s")
    resources = {
        "source": SyntheticSourceResource(symbols=[SYMBOL]),
        "lake": LakeResource(
            root=str(lake.root),
            catalog_path=str(folder / "c.duckdb"),
            reports_path=str(folder / "reports"),
        ),
        "ledger": LedgerResource(url=url),
    }
    asset = next(a for a in dry_run_assets if a.key == dg.AssetKey(f"dryrun_{STRATEGY}"))
    check = next(c for c in drift_checks if any(k.asset_key == asset.key for k in c.check_keys))
    op = asset.op.name
    instance = dg.DagsterInstance.ephemeral()
    # The periodic full verification (audit_chain, every 15 minutes), as production runs
    # it before and between bars: its time is printed, not counted in the step.
    started = time.perf_counter()
    snapshot = dg.materialize([ledger_snapshot], resources=resources, instance=instance,
                              run_config=QUIET)  # fmt: skip
    (audit,) = snapshot.get_asset_check_evaluations()
    assert audit.passed, audit.description
    print(f"    audit_chain (full verification): {time.perf_counter() - started:8.2f} s")
    step_s, drift_s = [], []
    for k in range(steps):
        bar = first_step + k * MINUTE
        run_config = {"ops": {op: {"config": {"bar_open": bar.isoformat()}}}, **QUIET}
        started = time.perf_counter()
        result = dg.materialize([asset], run_config=run_config, resources=resources,
                                instance=instance)  # fmt: skip
        step_s.append(time.perf_counter() - started)
        metadata = result.get_asset_materialization_events()[0].materialization.metadata
        assert metadata["action"].value in ("none", "blocked"), metadata
        inside = metadata.get("step_ms")
        print(
            f"    step {bar:%H:%M}: {step_s[-1] * 1000:8.1f} ms"
            + (f"  (step_ms {inside.value:.1f})" if inside else "")
            + f"  session_decisions {metadata['session_decisions'].value:,}"
            + f"  kill switch: {metadata['kill_switch'].value[:40]}"
        )
    for _ in range(steps):
        started = time.perf_counter()
        result = dg.materialize([asset, check], selection=dg.AssetSelection.checks(check),
                                resources=resources, instance=instance,
                                run_config=QUIET)  # fmt: skip
        drift_s.append(time.perf_counter() - started)
        (evaluation,) = result.get_asset_check_evaluations()
        print(
            f"    drift: {drift_s[-1] * 1000:8.1f} ms  passed {evaluation.passed}  "
            f"bars_compared {evaluation.metadata['bars_compared'].value:,}"
        )
    return median_ms(step_s), median_ms(drift_s)


def measure(decisions: int, steps: int, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """Median ms of a dry-run step and of a drift check for each of `sizes` earlier
    decisions (0 among them), on one lake long enough for `decisions`."""
    with tempfile.TemporaryDirectory(prefix="bench_dry_run_history_") as tmp:
        folder = Path(tmp)
        (folder / "strategies.yaml").write_text(STRATEGIES)
        os.environ["CANDLESTACK_STRATEGIES"] = str(folder / "strategies.yaml")
        os.environ["CANDLESTACK_SYMBOLS"] = SYMBOL
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        days = (decisions + steps) // 1440 + 2
        started = time.perf_counter()
        lake = build_lake(folder, days)
        newest = lake.newest_ts("ohlcv", "synthetic", "1m", "BTC-USDT")
        newest = newest.replace(second=0, microsecond=0) - MINUTE  # its fill bar is stored
        print(f"lake: {days + 1} days of 1m candles in {time.perf_counter() - started:.1f} s")
        figures = {}
        print("warm-up (not counted):")
        session(folder / "warm", lake, 0, steps, newest)
        for size in sizes:
            print(f"{size:,} earlier decisions:")
            # A bar per step after the history: every size decides the same bars.
            figures[size] = session(folder / str(size), lake, size, steps, newest)
        return figures


def print_figures(figures: dict[int, tuple[float, float]], steps: int) -> None:
    step0, drift0 = figures[0]
    print(f"\nmedian of {steps}, ms (ratio to 0 earlier decisions)")
    print(f"{'earlier decisions':>18} {'dry-run step':>20} {'drift check':>20}")
    for size, (step, drift) in figures.items():
        print(
            f"{size:>18,} {step:>12.1f} ({step / step0:4.2f}) {drift:>12.1f} "
            f"({drift / drift0:4.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=500_000)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    # 0, one drift window of decisions (7 days of 1m bars), and the history asked for.
    sizes = sorted({0, min(WINDOW, args.decisions), args.decisions})
    print_figures(measure(args.decisions, args.steps, sizes), args.steps)


if __name__ == "__main__":
    main()
