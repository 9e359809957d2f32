"""Benchmark: ledger writes and the full verification the audit_chain check runs.

    python bench/ledger_verify.py [--bars 20000] [--postgres URL]

Writes `--bars` decided 1m bars of one strategy (a buy and a sell every 20 bars: decisions,
orders, fills, positions, balances, audit events) through `Ledger.record_decision`, one
transaction per bar as the dry-run writes them, then times `verify_audit_chain` (the chain
and every state row against its binding). SQLite in a temporary folder, or a throwaway
schema on `--postgres`. Prints bars/s written and events and rows/s verified.
Target: a year of one 5m strategy (105,120 bars) verified in under 5 s.
"""

import argparse
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, select

from candlestack.ledger import (
    STATE_TABLES,
    Balance,
    DecisionRecord,
    FillRecord,
    Ledger,
    OrderRecord,
    Position,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
BALANCE = Balance(cash=10_000.0, realised_pnl=0.0, fees=0.0, peak_equity=10_000.0)


def bar(index: int) -> DecisionRecord:
    bar_ts = T0 + timedelta(minutes=index)
    fill_at = bar_ts + timedelta(minutes=1)
    fill = FillRecord(60_000.0 + index, 0.01, 0.6, filled_at=fill_at, bar_ts=fill_at)
    common = {"strategy": "bench", "symbol": "BTC/USDT", "timeframe": "1m", "bar_ts": bar_ts}
    if index % 20 == 0:
        return DecisionRecord(
            **common,
            entry_signal=True,
            exit_signal=False,
            action="buy",
            order=OrderRecord("buy", 0.01, fill.price, "filled"),
            fill=fill,
            position=Position(0.01, fill.price, 0.6, opened_at=fill_at),
            balance=BALANCE,
        )
    if index % 20 == 10:
        return DecisionRecord(
            **common,
            entry_signal=False,
            exit_signal=True,
            action="sell",
            order=OrderRecord("sell", 0.01, fill.price, "filled", reason="exit signal"),
            fill=fill,
            balance=BALANCE,
        )
    held = index % 20 < 10
    position = Position(0.01, 60_000.0, 0.6, opened_at=T0) if held else None
    return DecisionRecord(
        **common,
        entry_signal=False,
        exit_signal=False,
        action="none",
        position=position,
        balance=BALANCE,
    )


def run(url: str, bars: int) -> None:
    ledger = Ledger(url)
    ledger.migrate()
    started = time.perf_counter()
    for index in range(bars):
        ledger.record_decision(bar(index))
    wrote = time.perf_counter() - started
    events = ledger.audit_count()
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = sum(
            conn.execute(select(func.count()).select_from(t)).scalar_one() for t in STATE_TABLES
        )
    engine.dispose()
    started = time.perf_counter()
    problems = ledger.verify_audit_chain()
    verified = time.perf_counter() - started
    assert not problems, problems[:3]
    print(f"{ledger.url}")
    print(f"  write   {bars:>9,} bars     {wrote:7.2f} s   {bars / wrote:9,.0f} bars/s")
    print(
        f"  verify  {events:>9,} events and {rows:,} state rows   {verified:7.2f} s   "
        f"{events / verified:9,.0f} events/s"
    )
    ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=20_000)
    parser.add_argument("--postgres", help="a server URL: a throwaway schema is made there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run(f"sqlite:///{Path(folder) / 'ledger.sqlite'}", args.bars)
    if args.postgres:
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        try:
            run(f"{args.postgres}?options=-csearch_path%3D{schema}", args.bars)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
            admin.dispose()


if __name__ == "__main__":
    main()
