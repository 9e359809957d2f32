"""Backup and restore of the ledger on SQLite and PostgreSQL: a wiped ledger restored from
its backup lets the dry-run go on at the next bar; online backups are consistent; a
tampered backup, or a restore over a ledger that holds something, is refused."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from candlestack.drift import drift_from_lake
from candlestack.dryrun import DryRun
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.ledger import (
    VERSION_TABLE,
    Balance,
    Base,
    DecisionRecord,
    FillRecord,
    Ledger,
    OrderRecord,
    Position,
    alembic_config,
    head_revision,
)
from candlestack.ledger_backup import backup, main, restore, verify
from candlestack.sources.synthetic import SyntheticSource
from candlestack.strategies.config import StrategyConfig

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SYMBOL = "BTC/USDT"
SESSION_START = datetime(2024, 3, 5, 9, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A ledger URL: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    schema = f"ledger_backup_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {PG_URL} is unreachable (CI provides it): {exc}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def wipe(url: str) -> None:
    """Lose the ledger: its file (and write-ahead log), or its tables (only the ledger's)."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        for lost in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            lost.unlink(missing_ok=True)
        return
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.exec_driver_sql(f"DROP TABLE {VERSION_TABLE}")
    finally:
        engine.dispose()


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CANDLESTACK_LEDGER_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "candlestack.ledger_backup", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def state(ledger: Ledger) -> tuple[Any, ...]:
    return (
        ledger.positions().rows(),
        ledger.balances().rows(),
        ledger.kill_switch_states().rows(),
        ledger.audit_head(),
        ledger.audit_count(),
    )


# --- the dry-run goes on after a restore ----------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


def fast_cross() -> StrategyConfig:
    return StrategyConfig.model_validate(
        {
            "name": "btc_fast_cross",
            "strategy": "ma_cross",
            "symbol": SYMBOL,
            "timeframe": "1m",
            "order_value": 1000,
            "capital": 10000,
            "params": {"fast": 3, "slow": 12, "average": "ema"},
            "dry_run": {"enabled": True},
        }
    )


def live(lake: Lake, source: SyntheticSource, clock: Clock, ledger: Ledger, bars: int) -> list:
    """Minute by minute, as the sensor runs it: the bar closes, its candles land, the dry-run
    decides it. The decisions written."""
    decided = []
    for _ in range(bars):
        bar_ts = clock.now.replace(second=0, microsecond=0)
        clock.now = bar_ts + MINUTE + timedelta(seconds=2)
        today = clock.now.date()
        Ingestor(source, lake).ingest(SYMBOL, [today - timedelta(days=1), today])
        outcome = DryRun(fast_cross(), lake, "synthetic", source, ledger, clock).run(bar_ts)
        decided += outcome.decisions
    return decided


def test_backup_wipe_restore_and_the_dry_run_goes_on_at_the_next_bar(url: str, tmp_path: Path):
    config = fast_cross()
    clock = Clock(SESSION_START)
    source = SyntheticSource(seed=7, symbols=[SYMBOL], clock=clock)
    lake = Lake(tmp_path / "lake")
    for day in (date(2024, 3, 4), date(2024, 3, 5)):
        write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    ledger = Ledger(url)
    ledger.migrate()
    live(lake, source, clock, ledger, 30)
    position = ledger.position(config.name, SYMBOL)
    assert position is not None, "the session should hold a position when it is backed up"
    before = state(ledger)
    last = ledger.last_decided(config.name, SYMBOL, "1m")
    ledger.close()

    taken = cli("backup", "--to", str(tmp_path / "backups" / "ledger.sqlite"), url=url)
    assert taken.returncode == 0, taken.stderr
    seq, digest = before[3]
    assert f"chain head seq {seq} {digest}" in taken.stdout
    wipe(url)
    restored = cli("restore", "--from", str(tmp_path / "backups" / "ledger.sqlite"), url=url)
    assert restored.returncode == 0, restored.stderr
    assert f"chain head seq {seq} {digest}" in restored.stdout

    ledger = Ledger(url)
    assert state(ledger) == before
    assert ledger.verify_audit_chain() == []
    [decision] = live(lake, source, clock, ledger, 1)
    assert decision.bar_ts == last + MINUTE  # the next bar, not the first again
    assert decision.action == "none" and decision.position == position
    assert ledger.audit_events(last=1).item(0, "seq") == seq + 1
    # Through the restored position's exit: the dry-run still trades as its backtest does.
    live(lake, source, clock, ledger, 30)
    assert ledger.position(config.name, SYMBOL) != position
    report = drift_from_lake(lake, "synthetic", ledger, config, clock.now)
    assert report.passed, report.failures
    assert report.metrics["bars_compared"] == 61
    assert report.metrics["unmatched_fills"] == 0
    assert ledger.verify_audit_chain() == []
    ledger.close()


# --- online backups -------------------------------------------------------------------------

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
PRICE, AMOUNT, FEE = 60_000.0, 0.01, 0.6


def round_trip_bar(n: int) -> DecisionRecord:
    """Bar n of a strategy that buys on even bars and sells (at the same price) on odd ones,
    its balance carried exactly."""
    trips, selling = divmod(n, 2)
    at = T0 + (n + 1) * timedelta(minutes=15)
    spent = trips * 2 * FEE
    if selling:
        balance = Balance(10_000 - spent - 2 * FEE, -spent - 2 * FEE, spent + 2 * FEE, 10_000)
        position = None
    else:
        balance = Balance(10_000 - spent - PRICE * AMOUNT - FEE, -spent, spent + FEE, 10_000)
        position = Position(AMOUNT, PRICE, FEE, at)
    side = "sell" if selling else "buy"
    return DecisionRecord(
        strategy="ema",
        symbol=SYMBOL,
        timeframe="15m",
        bar_ts=T0 + n * timedelta(minutes=15),
        entry_signal=not selling,
        exit_signal=bool(selling),
        action=side,
        order=OrderRecord(side, AMOUNT, PRICE, "filled", "exit_signal" if selling else None),
        fill=FillRecord(PRICE, AMOUNT, FEE, at, at),
        position=position,
        balance=balance,
    )


def _write_bars(url: str, stop: Any, written: Any) -> None:
    ledger = Ledger(url)
    try:
        n = 0
        while not stop.is_set():
            assert ledger.record_decision(round_trip_bar(n))
            n += 1
            written.value = n
    finally:
        ledger.close()


def test_an_online_backup_while_another_process_writes_is_consistent(url: str, tmp_path: Path):
    Ledger(url).migrate()
    # spawn, not fork: forking a process that runs polars' thread pool can deadlock.
    context = multiprocessing.get_context("spawn")
    stop, written = context.Event(), context.Value("i", 0)
    writer = context.Process(target=_write_bars, args=(url, stop, written))
    writer.start()
    try:
        while written.value < 20:
            assert writer.is_alive()
            time.sleep(0.01)
        first = written.value
        taken = [backup(url, tmp_path / f"backup{i}.sqlite") for i in range(3)]
        last = written.value
    finally:
        stop.set()
        writer.join(timeout=60)
    assert writer.exitcode == 0
    heads = [summary.head[0] for summary in taken]
    assert first <= heads[0] and heads == sorted(heads) and heads[-1] <= last
    assert last > first, "the writer should have gone on writing during the backups"
    for summary in taken:
        assert verify(summary.path).head == summary.head
        with sqlite3.connect(summary.path) as db:
            decisions, positions, fills = db.execute(
                "SELECT (SELECT count(*) FROM decisions), (SELECT count(*) FROM positions), "
                "(SELECT count(*) FROM fills)"
            ).fetchone()
        # One bar, one transaction: each table as it was after the same bar.
        assert decisions == fills == summary.head[0] == summary.events
        assert positions == decisions % 2


# --- refusals -------------------------------------------------------------------------------


def some_history(ledger: Ledger, bars: range) -> None:
    for n in bars:
        assert ledger.record_decision(round_trip_bar(n))
    ledger.trip("ema", "drawdown", "test")


def test_a_tampered_backup_is_refused(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CANDLESTACK_LEDGER_URL", url)
    ledger = Ledger(url)
    ledger.migrate()
    some_history(ledger, range(5))
    file = tmp_path / "backup.sqlite"
    assert main(["backup", "--to", str(file)]) == 0
    with sqlite3.connect(file) as db:
        db.execute(
            "UPDATE audit_events SET payload = replace(payload, '60000', '6000') WHERE seq = 2"
        )
    assert main(["verify", str(file)]) == 1
    assert "seq 2: hash mismatch" in capsys.readouterr().err

    wipe(url)
    ledger.close()
    assert main(["restore", "--from", str(file)]) == 1
    err = capsys.readouterr().err
    assert f"{file}: the audit chain does not verify (1): seq 2: hash mismatch" in err
    if url.startswith("sqlite"):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.sqlite"]
    fresh = Ledger(url)
    assert fresh.schema_revision() is None  # nothing restored
    fresh.close()

    # A ledger whose own chain is broken is not backed up either.
    ledger = Ledger(url)
    ledger.migrate()
    some_history(ledger, range(3))
    ledger.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit_events WHERE seq = 2")
    engine.dispose()
    assert main(["backup", "--to", str(tmp_path / "broken.sqlite")]) == 1
    assert "seq 2: missing (deleted)" in capsys.readouterr().err
    assert not (tmp_path / "broken.sqlite").exists()


def test_a_restore_over_a_ledger_that_holds_anything_needs_force_and_loses_nothing(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CANDLESTACK_LEDGER_URL", url)
    ledger = Ledger(url)
    ledger.migrate()
    some_history(ledger, range(4))
    file = tmp_path / "backup.sqlite"
    assert main(["backup", "--to", str(file)]) == 0
    backed_up = state(ledger)
    ledger.reset("ema", "reviewed", "test")
    some_history(ledger, range(4, 7))
    now = state(ledger)

    assert main(["restore", "--from", str(file)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (rows: " in err and f"audit_events {now[4]}" in err and "--force" in err
    assert state(ledger) == now and ledger.verify_audit_chain() == []

    ledger.close()
    assert main(["restore", "--from", str(file), "--force"]) == 0
    ledger = Ledger(url)
    assert state(ledger) == backed_up and ledger.verify_audit_chain() == []
    ledger.close()
    # An empty ledger (migrated, nothing written) is no obstacle.
    wipe(url)
    Ledger(url).migrate()
    assert main(["restore", "--from", str(file)]) == 0
    ledger = Ledger(url)
    assert state(ledger) == backed_up
    ledger.close()


def test_a_backup_of_an_older_schema_restores_and_migrates(url: str, tmp_path: Path):
    ledger = Ledger(url)
    ledger.migrate()
    some_history(ledger, range(3))
    before = state(ledger)
    ledger.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0001")
    engine.dispose()

    taken = backup(url, tmp_path / "backup.sqlite")
    assert taken.revision == "0001" and taken.head == before[3]
    with sqlite3.connect(taken.path) as db:
        assert db.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall() == [("0001",)]
    wipe(url)
    restored = restore(taken.path, url)
    assert restored.head == before[3]
    ledger = Ledger(url)
    assert ledger.schema_revision() == head_revision()
    assert state(ledger) == before
    ledger.close()


def test_errors_name_the_file_or_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def refused(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err

    missing = tmp_path / "missing.sqlite"
    assert f"no ledger backup at {missing}: not a file" in refused("verify", str(missing))
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    assert f"{garbage} is not a ledger backup (a SQLite file): file is not a database" in refused(
        "verify", str(garbage)
    )
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    assert f"{other} is not a ledger backup: it has no {VERSION_TABLE} table" in refused(
        "verify", str(other)
    )
    ledger_file = tmp_path / "ledger.sqlite"
    monkeypatch.setenv("CANDLESTACK_LEDGER_URL", f"sqlite:///{ledger_file}")
    err = refused("backup", "--to", str(tmp_path / "b.sqlite"))
    assert f"no ledger at {ledger_file}: not a file" in err
    assert not ledger_file.exists()
    Ledger(f"sqlite:///{ledger_file}").migrate()
    err = refused("backup", "--to", str(ledger_file))
    assert f"{ledger_file} is the ledger itself: back it up to another file" in err

    down = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test"
    err = refused("backup", "--to", str(tmp_path / "b.sqlite"), "--url", down)
    assert "ledger postgresql+psycopg://postgres:***@127.0.0.1:1/test: " in err
    assert "s3cret" not in err
    assert not list(tmp_path.glob("*b.sqlite*"))
