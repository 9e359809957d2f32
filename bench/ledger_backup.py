"""Benchmark: backup, verify and restore of a large ledger (python -m candlestack.ledger_backup).

    python bench/ledger_backup.py [--bars 525600] [--postgres DATABASE_URL]

Builds a SQLite ledger of `--bars` decided 1m bars (a year of one 1m strategy by default:
one decision and one audit event per bar, chained as the ledger chains them), then times
backup, verify and restore on SQLite, and with `--postgres` (e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/test, in a throwaway schema) a restore into
PostgreSQL and a backup out of it. Prints figures only.
"""

import argparse
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, update

from candlestack.ledger import (
    GENESIS_HASH,
    STATE_KEY,
    TOTALS,
    AuditEventRow,
    Balance,
    ChainHeadRow,
    DecisionRecord,
    DecisionRow,
    DecisionTotalsRow,
    Ledger,
    SeenBar,
    chained_rows,
    row_digest,
)
from candlestack.ledger_backup import backup, restore, verify

START = datetime(2024, 1, 1, tzinfo=UTC)
BATCH = 20_000


def build(url: str, bars: int) -> None:
    """A ledger of `bars` decisions of one strategy that never trades, written in bulk (the
    dry-run writes one transaction per bar: far too slow to build a year with)."""
    Ledger(url).migrate()
    engine = create_engine(url)
    balance = Balance(cash=10_000.0, realised_pnl=0.0, fees=0.0, peak_equity=10_000.0)
    prev_hash = GENESIS_HASH
    with engine.begin() as conn:
        for first in range(0, bars, BATCH):
            decisions, events = [], []
            for n in range(first, min(first + BATCH, bars)):
                bar_ts = START + n * timedelta(minutes=1)
                record = DecisionRecord(
                    strategy="btc_scalp",
                    symbol="BTC/USDT",
                    timeframe="1m",
                    bar_ts=bar_ts,
                    entry_signal=False,
                    exit_signal=False,
                    action="none",
                    balance=balance,
                    seen=SeenBar(60_000.0, 60_010.0, 59_990.0, 60_005.0, 12.5, False),
                    compute_ms=1.7,
                    run_id=str(uuid.UUID(int=n)),
                    decided_at=bar_ts + timedelta(minutes=1, seconds=8),
                )
                values = {"id": n + 1, **Ledger._decision_values(record)}
                decisions.append(values)
                # Bound as the ledger binds each row it writes: verify checks every row.
                binding = ["decisions", {"id": n + 1}, row_digest("decisions", values)]
                payload = {**record.audit_payload(), STATE_KEY: [binding]}
                events.append((record.decided_at, "decision", "btc_scalp", payload))
            rows = chained_rows(first, prev_hash, events)
            prev_hash = rows[-1]["hash"]
            conn.execute(insert(DecisionRow), decisions)
            conn.execute(insert(AuditEventRow), rows)
        conn.execute(update(ChainHeadRow).values(seq=bars, hash=prev_hash))
        # The running session counts each decision write keeps (verify recounts them).
        counts = {**dict.fromkeys(TOTALS, 0), "decisions": bars}
        conn.execute(insert(DecisionTotalsRow).values(strategy="btc_scalp", **counts))
    engine.dispose()


def timed(what: str, call) -> None:
    started = time.perf_counter()
    summary = call()
    seconds = time.perf_counter() - started
    rate = summary.events / seconds
    print(
        f"{what:<28} {seconds:7.2f} s  {rate:>9,.0f} events/s  "
        f"{summary.bytes / 1e6:7.1f} MB  head seq {summary.head[0]}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=525_600, help="decided bars in the ledger")
    parser.add_argument(
        "--postgres", metavar="DATABASE_URL", help="also restore into and back up out of PostgreSQL"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ledger-backup-") as scratch:
        folder = Path(scratch)
        url = f"sqlite:///{folder / 'ledger.sqlite'}"
        started = time.perf_counter()
        build(url, args.bars)
        print(f"built a ledger of {args.bars:,} bars in {time.perf_counter() - started:.1f} s")
        file = folder / "backup.sqlite"
        timed("backup (SQLite)", lambda: backup(url, file))
        timed("verify", lambda: verify(file))
        timed("restore (SQLite)", lambda: restore(file, f"sqlite:///{folder / 'restored.sqlite'}"))
        if args.postgres:
            schema = f"bench_backup_{uuid.uuid4().hex[:12]}"
            admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
            pg = f"{args.postgres}?options=-csearch_path%3D{schema}"
            try:
                timed("restore (PostgreSQL)", lambda: restore(file, pg))
                timed("backup (PostgreSQL)", lambda: backup(pg, folder / "pg.sqlite"))
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
                admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
