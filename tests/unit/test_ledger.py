"""The ledger on SQLite and PostgreSQL: one transaction per bar, a bar executed once,
a tamper-evident audit chain, the kill switch, and writers serialised across processes."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from candlestack.errors import LedgerError
from candlestack.execution import EXIT_REASONS, EXIT_SIGNAL, REJECT_MIN_COST, REJECTION_REASONS
from candlestack.ledger import (
    BALANCES,
    DECISIONS,
    FILLS,
    GENESIS_HASH,
    KILL_SWITCH,
    ORDERS,
    POSITIONS,
    VERSION_TABLE,
    AuditEvent,
    Balance,
    Base,
    DecisionRecord,
    FillRecord,
    Ledger,
    OrderRecord,
    Position,
    alembic_config,
    chain_hash,
    head_revision,
    iso_utc,
)

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TABLES = (
    "strategy_configs",
    "decisions",
    "orders",
    "fills",
    "positions",
    "balances",
    "kill_switch",
    "audit_events",
)
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
BAR = timedelta(minutes=15)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A ledger URL: a SQLite file, or a fresh PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    schema = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except OperationalError as exc:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {PG_URL} is unreachable (CI provides it): {exc}")
    try:
        # Tables and Alembic's version table all land in the test's schema.
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def open_ledger(url: str) -> Iterator[Callable[[], Ledger]]:
    opened: list[Ledger] = []

    def open_() -> Ledger:
        opened.append(Ledger(url))
        return opened[-1]

    yield open_
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger: Callable[[], Ledger]) -> Ledger:
    opened = open_ledger()
    opened.migrate()
    return opened


def sql(url: str, statement: str, **params: object) -> list[tuple]:
    """Raw SQL outside the ledger, as a tamperer (or an inspector) would run it."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    return {table: sql(url, f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}


def buy(bar: int = 0, strategy: str = "ema", **changes: object) -> DecisionRecord:
    fill_at = T0 + (bar + 1) * BAR
    record = DecisionRecord(
        strategy=strategy,
        symbol="BTC/USDT",
        timeframe="15m",
        bar_ts=T0 + bar * BAR,
        entry_signal=True,
        exit_signal=False,
        action="buy",
        order=OrderRecord(side="buy", amount=0.01, price=60_000.0, status="filled"),
        fill=FillRecord(price=60_000.0, amount=0.01, fee=0.6, filled_at=fill_at, bar_ts=fill_at),
        position=Position(amount=0.01, entry_price=60_000.0, entry_fee=0.6, opened_at=fill_at),
        balance=Balance(cash=9_399.4, realised_pnl=0.0, fees=0.6, peak_equity=10_000.0),
    )
    return replace(record, **changes)


def sell(bar: int, strategy: str = "ema") -> DecisionRecord:
    fill_at = T0 + (bar + 1) * BAR
    return DecisionRecord(
        strategy=strategy,
        symbol="BTC/USDT",
        timeframe="15m",
        bar_ts=T0 + bar * BAR,
        entry_signal=False,
        exit_signal=True,
        action="sell",
        order=OrderRecord(
            side="sell",
            amount=0.01,
            price=61_000.0,
            status="filled",
            reason=EXIT_REASONS[EXIT_SIGNAL],
        ),
        fill=FillRecord(price=61_000.0, amount=0.01, fee=0.61, filled_at=fill_at, bar_ts=fill_at),
        position=None,
        balance=Balance(cash=10_008.79, realised_pnl=8.79, fees=1.21, peak_equity=10_008.79),
        note="exit on signal",
    )


# --- schema ---------------------------------------------------------------------------------


def test_migrate_twice_is_a_no_op_and_a_newer_schema_is_refused(
    url: str, open_ledger: Callable[[], Ledger]
):
    fresh = open_ledger()
    with pytest.raises(LedgerError, match="no schema"):
        fresh.orders()
    fresh.migrate()
    fresh.migrate()
    assert fresh.schema_revision() == head_revision() == "0004"
    assert counts(url) == dict.fromkeys(TABLES, 0)
    assert sql(url, "SELECT id, seq, hash FROM chain_head") == [(1, 0, GENESIS_HASH)]
    if url.startswith("postgresql"):
        where = f"table_schema = current_schema() AND table_name = '{VERSION_TABLE}'"
        assert sql(url, f"SELECT count(*) FROM information_schema.tables WHERE {where}") == [(1,)]

    sql(url, f"UPDATE {VERSION_TABLE} SET version_num = '0099'")
    for call in (lambda ledger: ledger.migrate(), lambda ledger: ledger.audit_count()):
        with pytest.raises(LedgerError, match="revision 0099, newer than this code's head 0004"):
            call(open_ledger())


def test_migrations_match_the_models_and_downgrade(url: str, ledger: Ledger):
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            assert compare_metadata(context, Base.metadata) == []
            command.downgrade(alembic_config(conn), "base")
    finally:
        engine.dispose()
    assert ledger.schema_revision() is None
    ledger.migrate()
    assert ledger.audit_count() == 0


# --- one bar, one transaction ---------------------------------------------------------------


def test_record_decision_writes_everything_once(url: str, ledger: Ledger):
    first = buy(events=(AuditEvent("signal_lag", {"ms": 12}),))
    assert ledger.record_decision(first)
    after_first = counts(url)
    assert after_first == {
        **dict.fromkeys(TABLES, 0),
        **dict.fromkeys(("decisions", "orders", "fills", "positions", "balances"), 1),
        "audit_events": 2,  # the decision itself, then the caller's event
    }
    head = ledger.audit_head()

    # A repeated tick or a restarted run: same key, nothing written.
    assert not ledger.record_decision(buy(note="second attempt"))
    assert counts(url) == after_first
    assert ledger.audit_head() == head

    assert ledger.record_decision(sell(bar=4))
    assert ledger.positions().is_empty()
    assert ledger.balance("ema") == Balance(10_008.79, 8.79, 1.21, 10_008.79)
    kinds = sql(url, "SELECT seq, kind, strategy FROM audit_events ORDER BY seq")
    assert kinds == [(1, "decision", "ema"), (2, "signal_lag", "ema"), (3, "decision", "ema")]
    assert ledger.verify_audit_chain() == []


def test_the_unique_key_stops_a_writer_that_skipped_the_check(
    url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
):
    assert ledger.record_decision(buy())
    before = counts(url)
    real = Ledger._decision_exists
    calls: list[str] = []

    def blind_first_time(conn, key):  # the pre-check misses; the retry after the error reads
        calls.append(key)
        return False if len(calls) == 1 else real(conn, key)

    monkeypatch.setattr(Ledger, "_decision_exists", staticmethod(blind_first_time))
    assert not ledger.record_decision(buy())
    assert len(calls) == 2
    assert counts(url) == before

    # Any other constraint failure is an error, and leaves nothing behind either.
    broken = buy(bar=1)
    object.__setattr__(broken, "action", "hold")  # past validation: the CHECK constraint fires
    with pytest.raises(LedgerError, match="ck_decisions_action"):
        ledger.record_decision(broken)
    assert counts(url) == before


@pytest.mark.parametrize("step", ["_insert_fill", "_save_balance"])
def test_a_crash_mid_bar_leaves_nothing(
    url: str, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, step: str
):
    def crash(*args: object) -> None:
        raise RuntimeError("killed mid-bar")

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, step, staticmethod(crash))
        with pytest.raises(RuntimeError, match="killed mid-bar"):
            ledger.record_decision(buy())
    assert counts(url) == dict.fromkeys(TABLES, 0)
    assert ledger.audit_head() == (0, GENESIS_HASH)
    assert ledger.record_decision(buy())  # the bar was not half-taken


def test_a_rejected_order_is_recorded_with_its_reason_and_never_filled(ledger: Ledger):
    reason = REJECTION_REASONS[REJECT_MIN_COST]
    rejected = buy(
        order=OrderRecord(
            side="buy", amount=0.0001, price=60_000.0, status="rejected", reason=reason
        ),
        fill=None,
        position=None,
        balance=Balance(cash=10_000.0, realised_pnl=0.0, fees=0.0, peak_equity=10_000.0),
    )
    assert ledger.record_decision(rejected)
    orders = ledger.orders()
    assert orders.select("status", "reason").rows() == [("rejected", reason)]
    assert ledger.fills().is_empty()
    assert ledger.positions().is_empty()


def test_decision_records_refuse_inconsistent_bars():
    with pytest.raises(ValueError, match="does not match order"):
        buy(order=None, fill=None)
    with pytest.raises(ValueError, match="fill goes with a filled order"):
        buy(fill=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        buy(bar_ts=datetime(2024, 3, 1, 12, 0))
    with pytest.raises(ValueError, match="needs its reason"):
        OrderRecord(side="buy", amount=1.0, price=1.0, status="rejected")


# --- reads ----------------------------------------------------------------------------------


def test_reads_are_typed_frames(ledger: Ledger):
    assert ledger.orders().schema == ORDERS and ledger.orders().is_empty()
    assert ledger.fills().schema == FILLS
    assert ledger.positions().schema == POSITIONS
    assert ledger.balances().schema == BALANCES
    assert ledger.decisions("ema").schema == DECISIONS
    assert ledger.kill_switch_states().schema == KILL_SWITCH

    ledger.record_decision(buy(bar=0))
    ledger.record_decision(sell(bar=3))
    ledger.record_decision(buy(bar=1, strategy="rsi"))
    hold = DecisionRecord(
        strategy="ema",
        symbol="BTC/USDT",
        timeframe="15m",
        bar_ts=T0 + 5 * BAR,
        entry_signal=False,
        exit_signal=False,
        action="none",
        balance=Balance(cash=10_008.79, realised_pnl=8.79, fees=1.21, peak_equity=10_008.79),
    )
    ledger.record_decision(hold)

    orders = ledger.orders("ema")
    assert orders.schema == ORDERS
    assert orders.select("side", "price", "status").rows() == [
        ("buy", 60_000.0, "filled"),
        ("sell", 61_000.0, "filled"),
    ]
    assert orders["client_order_id"].str.len_chars().to_list() == [35, 35]
    assert ledger.orders().height == 3
    fills = ledger.fills("ema")
    assert fills.select("side", "fee").rows() == [("buy", 0.6), ("sell", 0.61)]
    assert fills["bar_ts"].to_list() == [T0 + BAR, T0 + 4 * BAR]
    assert ledger.positions().select("strategy", "amount").rows() == [("rsi", 0.01)]
    assert ledger.balances()["strategy"].to_list() == ["ema", "rsi"]
    assert ledger.position("rsi", "BTC/USDT") == Position(0.01, 60_000.0, 0.6, T0 + 2 * BAR)
    assert ledger.position("ema", "BTC/USDT") is None

    decisions = ledger.decisions("ema", since=T0 + 3 * BAR)
    assert decisions.select("bar_ts", "action", "note").rows() == [
        (T0 + 3 * BAR, "sell", "exit on signal"),
        (T0 + 5 * BAR, "none", None),
    ]
    assert decisions["key"][0] == "ema|BTC/USDT|15m|2024-03-01T12:45:00+00:00"
    assert ledger.decisions("ema").height == 3
    assert ledger.audit_count() == 4


def test_strategy_configs_are_kept_once_per_hash(url: str, ledger: Ledger):
    first = ledger.record_strategy_config("ema", {"fast": 12, "slow": 26})
    assert ledger.record_strategy_config("ema", {"slow": 26, "fast": 12}) == first
    assert ledger.record_strategy_config("ema", {"fast": 10, "slow": 26}) != first
    assert counts(url)["strategy_configs"] == 2
    assert ledger.audit_count() == 2


# --- audit chain ----------------------------------------------------------------------------


def _rehash_seq_3(url: str) -> None:
    """A tamperer who edits seq 3 and recomputes its hash: the next link still breaks."""
    prev_hash, ts, kind, strategy = sql(
        url, "SELECT prev_hash, ts, kind, strategy FROM audit_events WHERE seq = 3"
    )[0]
    if isinstance(ts, str):  # SQLite hands raw text to raw SQL
        ts = datetime.fromisoformat(ts).replace(tzinfo=UTC)
    payload = '{"n":300}'
    digest = chain_hash(prev_hash, 3, iso_utc(ts), kind, strategy, payload)
    sql(url, "UPDATE audit_events SET payload = :p, hash = :h WHERE seq = 3", p=payload, h=digest)


TAMPERING = {
    "edit a payload": (
        ["UPDATE audit_events SET payload = '{\"n\": 999}' WHERE seq = 3"],
        ["seq 3: hash mismatch"],
    ),
    "edit a kind": (
        ["UPDATE audit_events SET kind = 'other' WHERE seq = 5"],
        ["seq 5: hash mismatch"],
    ),
    "delete a middle event": (["DELETE FROM audit_events WHERE seq = 3"], ["seq 3: missing"]),
    "delete the last event": (["DELETE FROM audit_events WHERE seq = 6"], ["seq 6: missing"]),
    "reorder two events": (
        [
            "UPDATE audit_events SET seq = -1 WHERE seq = 3",
            "UPDATE audit_events SET seq = 3 WHERE seq = 4",
            "UPDATE audit_events SET seq = 4 WHERE seq = -1",
        ],
        [
            "seq 3: prev_hash",
            "seq 3: hash mismatch",
            "seq 4: prev_hash",
            "seq 4: hash mismatch",
            "seq 5: prev_hash",
        ],
    ),
    "edit and rehash an event": (_rehash_seq_3, ["seq 4: prev_hash"]),
    "append past the head": (
        [
            "INSERT INTO audit_events SELECT 7, ts, kind, strategy, payload, hash, hash "
            "FROM audit_events WHERE seq = 6"
        ],
        ["seq 7: hash mismatch", "seq 7: beyond the chain head"],
    ),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_verify_names_the_tampered_seq(url: str, ledger: Ledger, case: str):
    for n in range(1, 7):
        assert ledger.append_audit("note", "ema" if n % 2 else None, {"n": n}) == n
    assert ledger.verify_audit_chain() == []
    tamper, expected = TAMPERING[case]
    if callable(tamper):
        tamper(url)
    else:
        for statement in tamper:
            sql(url, statement)
    problems = ledger.verify_audit_chain(batch_size=2)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems


# --- the state the chain vouches for ---------------------------------------------------------

STATE_TAMPERING = {
    "re-arm a tripped kill switch": (
        "UPDATE kill_switch SET tripped = false WHERE scope = 'ema'",
        "kill_switch row scope=ema: edited outside the ledger",
    ),
    "halve a fill price": (
        "UPDATE fills SET price = price * 0.5",
        "fills row id=1: edited outside the ledger",
    ),
    "add cash": (
        "UPDATE balances SET cash = cash + 100000",
        "balances row strategy=ema: edited outside the ledger",
    ),
    "double a position": (
        "UPDATE positions SET amount = amount * 2",
        "positions row strategy=ema, symbol=BTC/USDT: edited outside the ledger",
    ),
    "delete a position": (
        "DELETE FROM positions",
        "positions row strategy=ema, symbol=BTC/USDT: deleted outside the ledger",
    ),
    "edit an order": (
        "UPDATE orders SET amount = 1.0",
        "orders row id=1: edited outside the ledger",
    ),
    "rewrite a decision": (
        "UPDATE decisions SET entry_signal = NOT entry_signal",
        "decisions row id=1: edited outside the ledger",
    ),
    "invent a balance": (
        "INSERT INTO balances SELECT 'rsi', cash, realised_pnl, fees, peak_equity, updated_at "
        "FROM balances",
        "balances row strategy=rsi: bound by no audit event",
    ),
}


@pytest.mark.parametrize("case", STATE_TAMPERING)
def test_an_edit_of_any_state_table_fails_the_chain_naming_the_row(
    url: str, ledger: Ledger, case: str
):
    assert ledger.record_decision(buy())
    assert ledger.trip("ema", "drawdown", by="test")
    assert ledger.verify_audit_chain() == []
    statement, expected = STATE_TAMPERING[case]
    sql(url, statement)
    problems = ledger.verify_audit_chain(batch_size=2)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_failed_verification_trips_every_strategy_and_blocks_the_next_order(
    url: str, ledger: Ledger
):
    assert ledger.record_decision(buy())
    sql(url, "UPDATE balances SET cash = cash + 100000")
    assert ledger.tripped("rsi") is None
    problems = ledger.verify_or_trip(by="test")
    reason = ledger.tripped("rsi")
    assert reason == f"ledger verification failed: {problems[0]}"
    assert "balances row strategy=ema" in reason
    with pytest.raises(LedgerError, match="kill switch tripped for rsi"):
        ledger.record_decision(buy(strategy="rsi"))
    # The trip is audited and bound, and the edit stays a problem: no second trip.
    assert ledger.verify_or_trip(by="test") == problems
    assert sql(url, "SELECT count(*) FROM kill_switch")[0][0] == 1


def test_rows_written_before_the_state_was_audited_are_bound_by_one_baseline(
    url: str, open_ledger: Callable[[], Ledger]
):
    old = open_ledger()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
    finally:
        engine.dispose()
    # What a 0002 ledger holds: state rows and events binding none of them.
    sql(
        url,
        "INSERT INTO kill_switch VALUES ('ema', true, 'maintenance', :ts, 'operator')",
        ts=T0,
    )
    old.migrate()
    assert old.verify_audit_chain() == []
    (kind,) = old.audit_events().get_column("kind").to_list()
    assert kind == "state_baseline"
    sql(url, "UPDATE kill_switch SET tripped = false")
    assert old.verify_audit_chain()[0].startswith("kill_switch row scope=ema: edited")

    # A second baseline (0003 run again over an edited ledger) does not launder the edit.
    sql(url, f"UPDATE {VERSION_TABLE} SET version_num = '0002'")
    old.migrate()
    problems = old.verify_audit_chain()
    assert [p.split(":")[0] for p in problems] == ["seq 2"], problems
    assert "re-baselined" in problems[0]


# --- bounded per-bar verification -----------------------------------------------------------


def held(bar: int, strategy: str = "ema", **changes: object) -> DecisionRecord:
    """A bar decided while holding buy()'s position: no order."""
    position = Position(amount=0.01, entry_price=60_000.0, entry_fee=0.6, opened_at=T0 + BAR)
    record = replace(buy(bar, strategy), action="none", order=None, fill=None, position=position)
    return replace(record, entry_signal=False, **changes)


def long_history(ledger: Ledger, bars: int) -> None:
    """buy() on bar 0, then `bars` bars held, then a verification that leaves a checkpoint."""
    assert ledger.record_decision(buy())
    for bar in range(1, bars + 1):
        assert ledger.record_decision(held(bar))
    first = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert first.full and first.problems == []  # no checkpoint yet


def test_the_per_bar_verification_reads_the_events_since_the_checkpoint(ledger: Ledger):
    long_history(ledger, 60)
    for bar in range(61, 64):
        assert ledger.record_decision(held(bar))
    verification = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert verification.problems == [] and not verification.full
    # The three decisions since the checkpoint (the checkpoint event itself is the first),
    # not the 64 in the ledger; each binds its decision, position, balance, kill switches.
    assert verification.events == 4
    assert verification.head_seq == ledger.audit_head()[0] == 64
    assert verification.rows == 4 + 1 + 1 + 2
    again = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert (again.events, again.full) == (1, False)  # nothing written since: the head alone


def ema_trip_then_bar(ledger: Ledger, url: str) -> None:
    ledger.trip("ema", "drawdown", by="test")
    assert ledger.record_decision(held(62, action="none"))


WHAT_A_BAR_READS = {
    "re-arm a tripped kill switch": (
        ema_trip_then_bar,
        "UPDATE kill_switch SET tripped = false WHERE scope = 'ema'",
        "kill_switch row scope=ema: edited outside the ledger",
    ),
    "add cash": (
        None,
        "UPDATE balances SET cash = cash + 100000",
        "balances row strategy=ema: edited outside the ledger",
    ),
    "double a position": (
        None,
        "UPDATE positions SET amount = amount * 2",
        "positions row strategy=ema, symbol=BTC/USDT: edited outside the ledger",
    ),
    "delete a position": (
        None,
        "DELETE FROM positions",
        "positions row strategy=ema, symbol=BTC/USDT: deleted outside the ledger",
    ),
    "halve the newest fill's price": (
        lambda ledger, url: ledger.record_decision(sell(62)),
        "UPDATE fills SET price = price * 0.5 WHERE id = 2",
        "fills row id=2: edited outside the ledger",
    ),
    "re-arm the global kill switch": (
        lambda ledger, url: ledger.trip("*", "exchange outage", by="test"),
        "UPDATE kill_switch SET tripped = false WHERE scope = '*'",
        "kill_switch row scope=*: edited outside the ledger",
    ),
}


@pytest.mark.parametrize("case", WHAT_A_BAR_READS)
def test_the_per_bar_verification_catches_an_edit_of_what_the_bar_reads(
    url: str, ledger: Ledger, case: str
):
    long_history(ledger, 60)
    assert ledger.record_decision(held(61))
    assert ledger.verify_for_trading("ema", "BTC/USDT", by="test").problems == []
    before, statement, expected = WHAT_A_BAR_READS[case]
    if before is not None:
        before(ledger, url)
    sql(url, statement)
    verification = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert not verification.full and verification.events < 10
    assert len(verification.problems) == 1, verification.problems
    assert verification.problems[0].startswith(expected), verification.problems
    assert ledger.tripped("rsi") == f"ledger verification failed: {verification.problems[0]}"


def test_moving_the_checkpoint_forward_does_not_hide_an_edit_of_what_the_bar_reads(
    url: str, ledger: Ledger
):
    long_history(ledger, 50)
    assert ledger.record_decision(held(51))
    sql(url, "UPDATE balances SET cash = cash + 100000")
    # The tamperer also points the checkpoint at the head, as if all of it had been verified.
    sql(url, "UPDATE audit_checkpoint SET seq = h.seq, hash = h.hash FROM chain_head h")
    verification = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    # The window always reaches back to the strategy's newest decision, which bound it.
    assert not verification.full
    assert verification.problems[0].startswith("balances row strategy=ema: edited")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_checkpoint SET hash = 'forged'",
        "UPDATE audit_checkpoint SET seq = 10000",
        "UPDATE audit_checkpoint SET seq = 0",
        "DELETE FROM audit_checkpoint",
    ],
)
def test_a_checkpoint_the_chain_does_not_hold_falls_back_to_the_full_verification(
    url: str, ledger: Ledger, statement: str
):
    long_history(ledger, 50)
    sql(url, statement)
    verification = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert verification.full and verification.problems == []
    # ... which puts the checkpoint back where the chain is.
    assert sql(url, "SELECT seq, hash FROM audit_checkpoint") == [ledger.audit_head()]
    assert not ledger.verify_for_trading("ema", "BTC/USDT", by="test").full


def test_an_edit_of_the_checkpoint_event_is_found(url: str, ledger: Ledger):
    long_history(ledger, 50)
    assert ledger.audit_head()[0] == 51
    sql(url, """UPDATE audit_events SET payload = replace(payload, '"none"', '"sell"')
                WHERE seq = 51""")  # fmt: skip
    verification = ledger.verify_for_trading("ema", "BTC/USDT", by="test")
    assert not verification.full
    assert verification.problems == ["seq 51: hash mismatch (ts, kind, strategy or payload edited)"]


def test_an_edit_of_an_old_fill_is_left_to_the_full_verification(url: str, ledger: Ledger):
    """The documented limit of the per-bar pass: a row bound only before its window (here
    the fill of the buy 60 bars back) is not read again; the audit_chain check's full
    verification finds it."""
    long_history(ledger, 60)
    assert ledger.record_decision(held(61))
    sql(url, "UPDATE fills SET price = price * 0.5 WHERE id = 1")
    assert ledger.verify_for_trading("ema", "BTC/USDT", by="test").problems == []
    assert ledger.verify_audit_chain()[0].startswith("fills row id=1: edited outside the ledger")


def test_session_totals_equal_the_counts_over_the_whole_history(url: str, ledger: Ledger):
    from candlestack.dryrun import session_summary

    reason = REJECTION_REASONS[REJECT_MIN_COST]
    rejected = OrderRecord(
        side="buy", amount=0.0001, price=60_000.0, status="rejected", reason=reason
    )
    flat = {"order": None, "fill": None, "position": None}
    for cycle in range(3):
        bar = 10 * cycle
        assert ledger.record_decision(buy(bar))
        assert ledger.record_decision(held(bar + 1, note="hold"))
        assert ledger.record_decision(sell(bar + 2))
        assert ledger.record_decision(
            replace(buy(bar + 3), fill=None, position=None, order=rejected)
        )
        assert ledger.record_decision(buy(bar + 4, action="none", note="entry skipped: x", **flat))
        assert ledger.record_decision(buy(bar + 5, action="blocked", note="buy not sent", **flat))
        assert ledger.record_decision(buy(bar + 6, action="none", note="Entry skipped", **flat))
    assert ledger.record_decision(buy(strategy="rsi"))
    expected = session_summary(ledger.decisions("ema"), ledger.orders("ema"))
    assert expected == {
        "decisions": 21,
        "orders": 9,
        "rejected": 3,
        "fills": 6,
        "blocked": 3,
        "skipped_entries": 3,
    }
    assert ledger.session_totals("ema") == expected
    assert ledger.session_totals("rsi")["fills"] == 1
    assert ledger.session_totals("never") == dict.fromkeys(expected, 0)

    # Migration 0004 counts the rows a ledger already holds the same way.
    sql(url, "DELETE FROM decision_totals")
    sql(url, f"UPDATE {VERSION_TABLE} SET version_num = '0003'")
    ledger.migrate()
    assert ledger.session_totals("ema") == expected
    assert ledger.verify_audit_chain() == []

    # Derived, not bound by the chain: the full verification recounts them.
    sql(url, "UPDATE decision_totals SET fills = 0 WHERE strategy = 'ema'")
    (problem,) = ledger.verify_audit_chain()
    assert problem.startswith("decision_totals row strategy=ema: ")
    assert problem.endswith("(edited outside the ledger)")


def test_the_newest_decisions_are_read_with_a_limit(ledger: Ledger):
    for bar in range(30):
        timed = None if bar % 4 == 0 else float(bar)
        assert ledger.record_decision(held(bar, compute_ms=timed))
    newest = ledger.newest_decisions("ema", 10, timed=True)
    everything = ledger.decisions("ema")
    expected = everything.filter(pl.col("compute_ms").is_not_null()).tail(10)
    assert newest.equals(expected)
    assert ledger.newest_decisions("ema", 100).equals(everything)


# --- kill switch ----------------------------------------------------------------------------


def test_kill_switch_trip_reset_and_the_global_scope(url: str, ledger: Ledger):
    assert ledger.tripped("ema") is None
    assert ledger.trip("ema", "drawdown 21% > 20%", by="drawdown-check")
    assert not ledger.trip("ema", "drawdown 22% > 20%", by="drawdown-check")  # first cause stays
    assert ledger.tripped("ema") == "drawdown 21% > 20%"
    assert ledger.tripped("rsi") is None

    assert ledger.trip("*", "exchange outage", by="alice")
    assert ledger.tripped("rsi") == "exchange outage"
    assert ledger.tripped("ema") == "drawdown 21% > 20%"
    with pytest.raises(LedgerError, match="kill switch tripped for rsi"):
        ledger.record_decision(buy(strategy="rsi"))
    blocked = buy(strategy="rsi", action="blocked", order=None, fill=None, position=None)
    assert ledger.record_decision(blocked)

    assert ledger.reset("ema", "reviewed", by="alice")
    assert not ledger.reset("ema", "again", by="alice")
    assert not ledger.reset("never-tripped", "no-op", by="alice")
    assert ledger.tripped("ema") == "exchange outage"
    assert ledger.reset("*", "exchange back", by="bob")
    assert ledger.tripped("ema") is None and ledger.tripped("rsi") is None

    states = ledger.kill_switch_states()
    assert states.select("scope", "tripped", "reason", "changed_by").rows() == [
        ("*", False, "exchange back", "bob"),
        ("ema", False, "reviewed", "alice"),
    ]
    events = sql(url, "SELECT kind, strategy FROM audit_events ORDER BY seq")
    assert events == [
        ("kill_switch_trip", "ema"),
        ("kill_switch_trip", None),
        ("decision", "rsi"),
        ("kill_switch_reset", "ema"),
        ("kill_switch_reset", None),
    ]
    assert ledger.verify_audit_chain() == []


# --- concurrency ----------------------------------------------------------------------------

WORKERS, EVENTS_EACH = 3, 30


def _append_many(url: str, worker: int, start: Any) -> None:
    ledger = Ledger(url)
    try:
        ledger.audit_count()  # open (and check) the ledger before the race starts
        start.wait()
        for n in range(EVENTS_EACH):
            ledger.append_audit("tick", f"worker{worker}", {"worker": worker, "n": n})
    finally:
        ledger.close()


def test_processes_appending_at_once_keep_one_chain(url: str, ledger: Ledger):
    # spawn, not fork: forking a process that runs polars' thread pool can deadlock.
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WORKERS)
    processes = [context.Process(target=_append_many, args=(url, w, start)) for w in range(WORKERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    total = WORKERS * EVENTS_EACH
    assert sql(url, "SELECT min(seq), max(seq), count(DISTINCT seq) FROM audit_events") == [
        (1, total, total)
    ]
    assert ledger.audit_head()[0] == total
    assert ledger.verify_audit_chain() == []
    per_worker = pl.DataFrame(
        sql(url, "SELECT strategy FROM audit_events"), schema=["strategy"], orient="row"
    )["strategy"].value_counts()
    assert per_worker["count"].to_list() == [EVENTS_EACH] * WORKERS
