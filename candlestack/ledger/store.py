"""The dry-run ledger: orders, fills, positions, balances, kill switch and a hash-chained audit log.

SQLAlchemy 2.x over a SQLite file by default (DEFAULT_URL) or PostgreSQL by URL
(`postgresql+psycopg://...`). Alembic is the migration tool: its scripts live in
candlestack/ledger_migrations/ and ship with the package; `Ledger.migrate()` runs
`upgrade head`, and a ledger whose schema is newer than this code is refused, not misread.

What the ledger guarantees:
- one bar, one transaction: `record_decision` writes the decision, its order and fill, the
  position and balance it leaves and its audit events together, or nothing;
- a bar is executed once: `decisions.key` is UNIQUE, so a repeated sensor tick or a
  restarted run writes nothing and gets False;
- writers are serialised across processes (`pg_advisory_xact_lock` on PostgreSQL,
  `BEGIN IMMEDIATE` on SQLite), so the audit chain never forks;
- the audit log is append-only and hash-chained, and `chain_head` holds its last seq and
  hash in the same transaction, so `verify_audit_chain` finds an edited, deleted (the last
  one too) or reordered event. Whoever can write the database can still rebuild the whole
  chain and its head: publishing `audit_head()` elsewhere (check metadata) catches that;
- the chain vouches for the state: every write binds the digest of each state row it
  inserted, changed or deleted (STATE_TABLES) into its audit event, so an edit of a
  position, balance, fill, order, decision or kill switch row outside the ledger fails
  `verify_audit_chain`, naming the table and the row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import polars as pl
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

from candlestack.errors import LedgerError

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///data/ledger.sqlite"
MIGRATIONS = Path(__file__).resolve().parent.parent / "ledger_migrations"
# Not "alembic_version": Dagster's PostgreSQL storage keeps its own Alembic table, and the
# ledger may share its database.
VERSION_TABLE = "ledger_alembic_version"
GENESIS_HASH = "0" * 64
GLOBAL_SCOPE = "*"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Key of the PostgreSQL advisory lock every ledger writer holds for its transaction ("candle").
PG_WRITE_LOCK = 0x63616E646C65
# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITE_OPTION = "candlestack_ledger_write"

ACTIONS = ("none", "buy", "sell", "blocked")
SIDES = ("buy", "sell")
ORDER_STATUSES = ("filled", "rejected")

AUDIT_DECISION = "decision"
AUDIT_KILL_SWITCH_TRIP = "kill_switch_trip"
AUDIT_KILL_SWITCH_RESET = "kill_switch_reset"
AUDIT_STRATEGY_CONFIG = "strategy_config"
AUDIT_ERROR = "error"
# Binds the rows a ledger held before its state was audited (migration 0003); at most one,
# before any other bound state.
AUDIT_STATE_BASELINE = "state_baseline"
# The payload key of an event's state bindings: [[table, {pk column: value}, digest], ...],
# digest None for a deleted row.
STATE_KEY = "state"
# A bar a run did not decide (catch-up policy "latest"): action none, note starting so.
SKIPPED_PREFIX = "skipped:"
# The note of an entry the data policy skipped (the dry-run's; counted in decision_totals).
ENTRY_SKIPPED_PREFIX = "entry skipped"


# --- pure helpers ---------------------------------------------------------------------------


def _utc(name: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(UTC)


# Built once: json.dumps with options builds an encoder per call, a third of verifying a row.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical_json(payload: Any) -> str:
    """The one text form of an audit payload: what is stored and what is hashed."""
    return _CANONICAL.encode(payload)


def iso_utc(ts: datetime) -> str:
    """A timestamp as hashed in the audit chain: UTC, always with microseconds."""
    return _utc("ts", ts).isoformat(timespec="microseconds")


def chain_hash(
    prev_hash: str, seq: int, ts_iso: str, kind: str, strategy: str | None, payload: str
) -> str:
    """sha256 of one audit event, chained to the previous event's hash."""
    text_ = "|".join((prev_hash, str(seq), ts_iso, kind, strategy or "", payload))
    return hashlib.sha256(text_.encode()).hexdigest()


def _digest_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # Naive: SQLite's UTC text read without the ledger's UTCDateTime (a migration).
        return iso_utc(value if value.tzinfo else value.replace(tzinfo=UTC))
    return value


def row_digest(table: str, row: Mapping[str, Any]) -> str:
    """sha256 of one state row as the audit chain binds it. NULL columns are left out, so a
    nullable column added later leaves the digests of the rows before it unchanged."""
    body = {name: _digest_value(value) for name, value in row.items() if value is not None}
    return hashlib.sha256(canonical_json({"table": table, "row": body}).encode()).hexdigest()


def decision_key(strategy: str, symbol: str, timeframe: str, bar_ts: datetime) -> str:
    """ "strategy|symbol|timeframe|bar_open_iso": one bar of one strategy, executed once."""
    return f"{strategy}|{symbol}|{timeframe}|{_utc('bar_ts', bar_ts).isoformat()}"


def client_order_id(key: str, side: str) -> str:
    """Deterministic, so a retried bar names the same order; 35 characters of [a-z0-9-]
    fit the strictest exchange limit we know (Binance: 36)."""
    return "cs-" + hashlib.sha256(f"{key}|{side}".encode()).hexdigest()[:32]


# --- what the dry-run hands over ------------------------------------------------------------


@dataclass(frozen=True)
class OrderRecord:
    """An order built for a bar: filled, or rejected with its reason (execution.py's texts).

    A filled sell carries its exit reason (execution.EXIT_REASONS) in `reason` too.
    """

    side: str
    amount: float
    price: float
    status: str
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"order side must be one of {SIDES}, not {self.side!r}")
        if self.status not in ORDER_STATUSES:
            raise ValueError(f"order status must be one of {ORDER_STATUSES}, not {self.status!r}")
        if self.status == "rejected" and not self.reason:
            raise ValueError("a rejected order needs its reason")


@dataclass(frozen=True)
class FillRecord:
    price: float
    amount: float
    fee: float
    filled_at: datetime
    bar_ts: datetime  # open time of the bar whose open price filled the order

    def __post_init__(self) -> None:
        _utc("filled_at", self.filled_at)
        _utc("bar_ts", self.bar_ts)


@dataclass(frozen=True)
class Position:
    amount: float
    entry_price: float
    entry_fee: float
    opened_at: datetime
    refused_exit: str | None = None  # an exit the exchange refused: retried on the next bar

    def __post_init__(self) -> None:
        _utc("opened_at", self.opened_at)


@dataclass(frozen=True)
class Balance:
    cash: float
    realised_pnl: float
    fees: float
    peak_equity: float


@dataclass(frozen=True)
class AuditEvent:
    kind: str
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class SeenBar:
    """The closed bar as the dry-run saw it when it decided, and the next bar's open it
    filled at (None: no order), so the drift check can tell revised data from drift."""

    open: float
    high: float
    low: float
    close: float
    volume: float
    untradable: bool  # imputed or missing minutes (the backtest's data policy)
    fill_open: float | None = None


@dataclass(frozen=True)
class LedgerState:
    """What a strategy holds when its next bar is decided, read under the write lock."""

    position: Position | None
    balance: Balance | None
    tripped: str | None  # why the kill switch stops its orders; None: it may trade
    last_bar_ts: datetime | None  # the newest bar already decided for this symbol/timeframe


@dataclass(frozen=True)
class Verification:
    """What a verification of the ledger found and how much it read."""

    problems: list[str]
    head_seq: int
    head_hash: str
    full: bool  # every event and state row (verify_audit_chain), or a bounded window
    events: int = 0  # audit events hash-checked
    rows: int | None = None  # state rows compared (None: all of them)


@dataclass(frozen=True)
class DecisionRecord:
    """Everything one executed bar leaves behind, written in one transaction.

    `position` is the position after the bar (None: flat) and `balance` the balance after
    it. The ledger audits the record itself (kind "decision"); `events` are appended after
    it, in order, with the record's strategy.
    """

    strategy: str
    symbol: str
    timeframe: str
    bar_ts: datetime  # open time of the closed bar the strategy decided on
    entry_signal: bool
    exit_signal: bool
    action: str  # none | buy | sell | blocked (the kill switch stopped an order)
    balance: Balance
    position: Position | None = None
    order: OrderRecord | None = None
    fill: FillRecord | None = None
    note: str | None = None
    events: tuple[AuditEvent, ...] = ()
    decided_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seen: SeenBar | None = None
    compute_ms: float | None = None  # the decision step alone: features, signals, order
    run_id: str | None = None
    trip: str | None = None  # trip the strategy's kill switch for this reason, first

    def __post_init__(self) -> None:
        _utc("bar_ts", self.bar_ts)
        _utc("decided_at", self.decided_at)
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")
        trades = self.action in SIDES
        if trades != (self.order is not None) or (trades and self.order.side != self.action):
            raise ValueError(f"action {self.action!r} does not match order {self.order!r}")
        filled = self.order is not None and self.order.status == "filled"
        if filled != (self.fill is not None):
            raise ValueError("a fill goes with a filled order, and a filled order needs one")
        if self.trip is not None and self.order is not None:
            raise ValueError("a decision that trips the kill switch cannot place an order")

    @property
    def key(self) -> str:
        return decision_key(self.strategy, self.symbol, self.timeframe, self.bar_ts)

    @property
    def client_order_id(self) -> str | None:
        return client_order_id(self.key, self.order.side) if self.order else None

    def audit_payload(self) -> dict[str, Any]:
        order = (
            asdict(self.order) | {"client_order_id": self.client_order_id} if self.order else None
        )
        return {
            "key": self.key,
            "action": self.action,
            "entry_signal": self.entry_signal,
            "exit_signal": self.exit_signal,
            "note": self.note,
            "order": order,
            "fill": asdict(self.fill) if self.fill else None,
            "position": asdict(self.position) if self.position else None,
            "balance": asdict(self.balance),
            "seen": asdict(self.seen) if self.seen else None,
        }


# --- tables ---------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out on both backends.

    PostgreSQL keeps timestamptz; SQLite keeps naive UTC text with microseconds, which sorts
    as time does. Naive datetimes are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _utc("timestamp", value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Money is float64 (Double): the execution engine computes in float64 and the ledger must
# hold exactly the figures it produced, not a decimal rounding of them.
Money = Double

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    # Fixed constraint names: Alembic scripts (and SQLite batch moves) refer to them by name.
    metadata = MetaData(naming_convention=NAMING)


class StrategyConfigRow(Base):
    __tablename__ = "strategy_configs"
    __table_args__ = (UniqueConstraint("name", "config_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String)
    config_hash: Mapped[str] = mapped_column(String(64))
    config_json: Mapped[str] = mapped_column(Text)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)


class DecisionRow(Base):
    __tablename__ = "decisions"
    __table_args__ = (
        CheckConstraint("action IN ('none', 'buy', 'sell', 'blocked')", name="action"),
        Index(None, "strategy", "bar_ts"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    strategy: Mapped[str] = mapped_column(String)
    symbol: Mapped[str] = mapped_column(String)
    timeframe: Mapped[str] = mapped_column(String)
    bar_ts: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime)
    entry_signal: Mapped[bool] = mapped_column(Boolean)
    exit_signal: Mapped[bool] = mapped_column(Boolean)
    action: Mapped[str] = mapped_column(String)
    note: Mapped[str | None] = mapped_column(Text)
    # 0002: the bar as seen, the open filled at, compute time and run (None before 0002).
    bar_open: Mapped[float | None] = mapped_column(Money)
    bar_high: Mapped[float | None] = mapped_column(Money)
    bar_low: Mapped[float | None] = mapped_column(Money)
    bar_close: Mapped[float | None] = mapped_column(Money)
    bar_volume: Mapped[float | None] = mapped_column(Money)
    bar_untradable: Mapped[bool | None] = mapped_column(Boolean)
    fill_open: Mapped[float | None] = mapped_column(Money)
    compute_ms: Mapped[float | None] = mapped_column(Double)
    run_id: Mapped[str | None] = mapped_column(String)


class OrderRow(Base):
    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint("side IN ('buy', 'sell')", name="side"),
        CheckConstraint("status IN ('filled', 'rejected')", name="status"),
        Index(None, "strategy"),
        Index(None, "decision_key"),  # 0004: a window of decisions' orders (drift)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision_key: Mapped[str] = mapped_column(Text, ForeignKey("decisions.key"))
    client_order_id: Mapped[str] = mapped_column(String, unique=True)
    strategy: Mapped[str] = mapped_column(String)
    symbol: Mapped[str] = mapped_column(String)
    side: Mapped[str] = mapped_column(String)
    amount: Mapped[float] = mapped_column(Money)
    price: Mapped[float] = mapped_column(Money)
    status: Mapped[str] = mapped_column(String)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class FillRow(Base):
    __tablename__ = "fills"
    __table_args__ = (Index(None, "bar_ts"),)  # 0004: the newest fills (drift's replay start)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer, ForeignKey("orders.id"), unique=True)
    price: Mapped[float] = mapped_column(Money)
    amount: Mapped[float] = mapped_column(Money)
    fee: Mapped[float] = mapped_column(Money)
    filled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    bar_ts: Mapped[datetime] = mapped_column(UTCDateTime)


class PositionRow(Base):
    __tablename__ = "positions"

    strategy: Mapped[str] = mapped_column(String, primary_key=True)
    symbol: Mapped[str] = mapped_column(String, primary_key=True)
    amount: Mapped[float] = mapped_column(Money)
    entry_price: Mapped[float] = mapped_column(Money)
    entry_fee: Mapped[float] = mapped_column(Money)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    refused_exit: Mapped[str | None] = mapped_column(String)


class BalanceRow(Base):
    __tablename__ = "balances"

    strategy: Mapped[str] = mapped_column(String, primary_key=True)
    cash: Mapped[float] = mapped_column(Money)
    realised_pnl: Mapped[float] = mapped_column(Money)
    fees: Mapped[float] = mapped_column(Money)
    peak_equity: Mapped[float] = mapped_column(Money)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class KillSwitchRow(Base):
    __tablename__ = "kill_switch"

    scope: Mapped[str] = mapped_column(String, primary_key=True)  # a strategy, or "*"
    tripped: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    changed_by: Mapped[str] = mapped_column(String)


class AuditEventRow(Base):
    __tablename__ = "audit_events"
    # 0004: a strategy's newest decision events (the per-bar verification's window).
    __table_args__ = (Index(None, "strategy", "kind", "seq"),)

    # Assigned by the writer holding the lock, never by the database: gaps mean deletions.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String)
    strategy: Mapped[str | None] = mapped_column(String)
    payload: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ChainHeadRow(Base):
    """One row: the last audit event's seq and hash (seq 0 and GENESIS_HASH when empty)."""

    __tablename__ = "chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class CheckpointRow(Base):
    """One row (0004): the seq and hash of the newest audit event a verification found the
    chain intact up to. Not a state table: whatever it says, a per-bar verification
    recomputes that event's hash and re-verifies the strategy's own events (see
    Ledger.verify_for_trading), and the full verification ignores it."""

    __tablename__ = "audit_checkpoint"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    verified_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DecisionTotalsRow(Base):
    """Per strategy (0004): the session counts, kept by each decision write in its own
    transaction so a bar's metadata reads one row, not the history. Derived, not bound by
    the chain: the full verification recounts them from the rows it verified."""

    __tablename__ = "decision_totals"

    strategy: Mapped[str] = mapped_column(String, primary_key=True)
    decisions: Mapped[int] = mapped_column(Integer)
    orders: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[int] = mapped_column(Integer)
    fills: Mapped[int] = mapped_column(Integer)
    blocked: Mapped[int] = mapped_column(Integer)
    skipped_entries: Mapped[int] = mapped_column(Integer)


TOTALS = ("decisions", "orders", "rejected", "fills", "blocked", "skipped_entries")


# Every table whose rows the audit chain vouches for (the chain's own tables vouch for
# themselves); the dry-run reads positions, balances and the kill switch from here.
STATE_TABLES = (
    StrategyConfigRow.__table__,
    DecisionRow.__table__,
    OrderRow.__table__,
    FillRow.__table__,
    PositionRow.__table__,
    BalanceRow.__table__,
    KillSwitchRow.__table__,
)


def _bind(conn: Connection, model: type[Base], **key: Any) -> list[Any]:
    """The binding of one state row as it now stands in the transaction: [table, key,
    digest], digest None when the row is gone."""
    table = model.__table__
    row = (
        conn.execute(select(table).where(*(table.c[name] == value for name, value in key.items())))
        .mappings()
        .first()
    )
    return [table.name, key, row_digest(table.name, row) if row is not None else None]


def state_rows(
    conn: Connection, table: Any, batch_size: int = 10_000
) -> Iterator[tuple[dict, str]]:
    """(primary key, digest) of every row of a state table, in primary-key order."""
    keys = [column.name for column in table.primary_key]
    # On the statement: Connection.execution_options would stick to the caller's connection.
    rows = conn.execute(
        select(table).order_by(*table.primary_key).execution_options(yield_per=batch_size)
    )
    for row in rows.mappings():
        yield {name: row[name] for name in keys}, row_digest(table.name, row)


def _row_name(table: str, key: Mapping[str, Any]) -> str:
    return f"{table} row " + ", ".join(f"{name}={value}" for name, value in key.items())


# --- frames the UI, demo and drift checks read ----------------------------------------------

_TS = pl.Datetime("us", "UTC")
KEYS = ("strategy", "symbol")

ORDERS = pl.Schema(
    {
        "id": pl.Int64,
        "decision_key": pl.String,
        "client_order_id": pl.String,
        "strategy": pl.String,
        "symbol": pl.String,
        "side": pl.String,
        "amount": pl.Float64,
        "price": pl.Float64,
        "status": pl.String,
        "reason": pl.String,
        "created_at": _TS,
    }
)
FILLS = pl.Schema(
    {
        "order_id": pl.Int64,
        "client_order_id": pl.String,
        "strategy": pl.String,
        "symbol": pl.String,
        "side": pl.String,
        "price": pl.Float64,
        "amount": pl.Float64,
        "fee": pl.Float64,
        "filled_at": _TS,
        "bar_ts": _TS,
    }
)
POSITIONS = pl.Schema(
    {
        "strategy": pl.String,
        "symbol": pl.String,
        "amount": pl.Float64,
        "entry_price": pl.Float64,
        "entry_fee": pl.Float64,
        "opened_at": _TS,
        "refused_exit": pl.String,
    }
)
BALANCES = pl.Schema(
    {
        "strategy": pl.String,
        "cash": pl.Float64,
        "realised_pnl": pl.Float64,
        "fees": pl.Float64,
        "peak_equity": pl.Float64,
        "updated_at": _TS,
    }
)
DECISIONS = pl.Schema(
    {
        "key": pl.String,
        "strategy": pl.String,
        "symbol": pl.String,
        "timeframe": pl.String,
        "bar_ts": _TS,
        "decided_at": _TS,
        "entry_signal": pl.Boolean,
        "exit_signal": pl.Boolean,
        "action": pl.String,
        "note": pl.String,
        "bar_open": pl.Float64,
        "bar_high": pl.Float64,
        "bar_low": pl.Float64,
        "bar_close": pl.Float64,
        "bar_volume": pl.Float64,
        "bar_untradable": pl.Boolean,
        "fill_open": pl.Float64,
        "compute_ms": pl.Float64,
        "run_id": pl.String,
    }
)
KILL_SWITCH = pl.Schema(
    {
        "scope": pl.String,
        "tripped": pl.Boolean,
        "reason": pl.String,
        "changed_at": _TS,
        "changed_by": pl.String,
    }
)

AUDIT = pl.Schema(
    {
        "seq": pl.Int64,
        "ts": _TS,
        "kind": pl.String,
        "strategy": pl.String,
        "payload": pl.String,
        "hash": pl.String,
    }
)


# --- migrations -----------------------------------------------------------------------------


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head_revision() -> str:
    """The schema revision this code writes."""
    head = _scripts().get_current_head()
    assert head is not None, f"no Alembic revisions under {MIGRATIONS}"
    return head


def _known(revision: str) -> bool:
    return any(script.revision == revision for script in _scripts().walk_revisions())


def _current_revision(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _alembic_config(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


# --- SQLite connection setup (the documented pysqlite transaction recipe) ----------------


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, emits BEGIN, so SELECTs and DDL are transactional
    # and writers can ask for IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock at BEGIN, so writers queue on busy_timeout; a deferred
    # transaction upgrading to write mid-way gets SQLITE_BUSY, which no timeout retries.
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# --- the ledger -----------------------------------------------------------------------------


class Ledger:
    """The dry-run's durable state in one SQL database (see the module docstring)."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = parsed.render_as_string(hide_password=True)  # what messages show
        self._sqlite = parsed.get_backend_name() == "sqlite"
        if self._sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # pre-ping: a long-lived sensor process outlives server-side idle timeouts.
        self._engine: Engine = create_engine(parsed, pool_pre_ping=not self._sqlite)
        if self._sqlite:
            event.listen(self._engine, "connect", _sqlite_connect)
            event.listen(self._engine, "begin", _sqlite_begin)
        self._schema_checked = False
        self.last_verification: Verification | None = None

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    # --- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to this code's head revision (a no-op when it is there already)."""
        head = head_revision()
        with self._transaction(check_schema=False) as conn:
            current = _current_revision(conn)
            if current is not None and not _known(current):
                raise LedgerError(self._too_new(current, head))
            if current != head:
                logger.info("migrating ledger %s from %s to %s", self.url, current, head)
                command.upgrade(_alembic_config(conn), "head")
        self._schema_checked = True

    def schema_revision(self) -> str | None:
        """The revision the database is at (None: never migrated)."""
        try:
            with self._engine.connect() as conn:
                return _current_revision(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the schema revision of {self.url}: {exc}") from exc

    def _too_new(self, current: str, head: str) -> str:
        return (
            f"ledger {self.url} is at schema revision {current}, newer than this code's "
            f"head {head}: upgrade candlestack before opening it"
        )

    def _check_schema(self) -> None:
        if self._schema_checked:
            return
        current, head = self.schema_revision(), head_revision()
        if current is None:
            raise LedgerError(f"ledger {self.url} has no schema: call Ledger.migrate() first")
        if not _known(current):
            raise LedgerError(self._too_new(current, head))
        if current != head:
            raise LedgerError(
                f"ledger {self.url} is at schema revision {current}, older than this code's "
                f"head {head}: call Ledger.migrate()"
            )
        self._schema_checked = True

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, check_schema: bool = True) -> Iterator[Connection]:
        """A write transaction holding the ledger's write lock until it commits or rolls back;
        database errors become LedgerError naming the ledger."""
        if check_schema:
            self._check_schema()
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{_WRITE_OPTION: True})
                with conn.begin():
                    if not self._sqlite:
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK}
                        )
                    yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url}: {exc}") from exc

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        self._check_schema()
        try:
            with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url}: {exc}") from exc

    # --- writes ---------------------------------------------------------------------------

    def record_decision(self, decision: DecisionRecord) -> bool:
        """Write one executed bar; False (and nothing written) when its key is already there."""
        key = decision.key
        with self._transaction() as conn:
            if self._decision_exists(conn, key):
                return False
            return self._write_decision(conn, decision)

    def execute(
        self,
        strategy: str,
        symbol: str,
        timeframe: str,
        bar_ts: datetime,
        decide: Callable[[LedgerState], DecisionRecord],
    ) -> DecisionRecord | None:
        """Decide one bar on the state read under the write lock and write the decision in the
        same transaction: a concurrent run of the same strategy can neither read a state
        about to change nor execute the bar twice. None when the bar was already decided."""
        key = decision_key(strategy, symbol, timeframe, bar_ts)
        with self._transaction() as conn:
            if self._decision_exists(conn, key):
                return None
            state = LedgerState(
                position=self._position(conn, strategy, symbol),
                balance=self._balance(conn, strategy),
                tripped=self._tripped_reason(conn, strategy),
                last_bar_ts=self._last_decided(conn, strategy, symbol, timeframe),
            )
            decision = decide(state)
            if decision.key != key:
                raise LedgerError(f"asked to decide {key}, got a decision for {decision.key}")
            if decision.trip is not None:
                self._switch_in(conn, strategy, True, decision.trip, "dry-run")
            if not self._write_decision(conn, decision):
                return None
        return decision

    def _write_decision(self, conn: Connection, decision: DecisionRecord) -> bool:
        """Write a decision: order, fill, position, balance and audit events. False (nothing
        written) when a writer that bypassed the lock stored the same key first."""
        self._refuse_if_tripped(conn, decision)
        try:
            with conn.begin_nested():
                result = conn.execute(insert(DecisionRow).values(**self._decision_values(decision)))
        except IntegrityError:
            # The callers' pre-check ran under the write lock, so only a writer bypassing the
            # lock gets here; the UNIQUE key keeps the bar executed once even then. The
            # savepoint keeps the transaction usable for the second look.
            if self._decision_exists(conn, decision.key):
                return False
            raise
        state = [_bind(conn, DecisionRow, id=result.inserted_primary_key[0])]
        if decision.order is not None:
            order_id = self._insert_order(conn, decision)
            state.append(_bind(conn, OrderRow, id=order_id))
            if decision.fill is not None:
                fill_id = self._insert_fill(conn, order_id, decision.fill)
                state.append(_bind(conn, FillRow, id=fill_id))
        self._save_position(conn, decision)
        self._save_balance(conn, decision)
        self._count(conn, decision)
        state += self._trading_state(conn, decision.strategy, decision.symbol)
        events = [(AUDIT_DECISION, decision.strategy, decision.audit_payload())]
        events += [(e.kind, decision.strategy, e.payload) for e in decision.events]
        append_events(conn, events, state)
        return True

    @staticmethod
    def _trading_state(conn: Connection, strategy: str, symbol: str) -> list[list[Any]]:
        """The bindings of the rows the next bar of `strategy` reads (its position, balance
        and the kill switches that stop it): each decision binds them again, unchanged or
        not, so their newest bindings are never older than the strategy's last decision."""
        return [
            _bind(conn, PositionRow, strategy=strategy, symbol=symbol),
            _bind(conn, BalanceRow, strategy=strategy),
            _bind(conn, KillSwitchRow, scope=strategy),
            _bind(conn, KillSwitchRow, scope=GLOBAL_SCOPE),
        ]

    @staticmethod
    def _count(conn: Connection, decision: DecisionRecord) -> None:
        """Add the decision to its strategy's running totals (decision_totals)."""
        order = decision.order
        added = {
            "decisions": 1,
            "orders": int(order is not None),
            "rejected": int(order is not None and order.status == "rejected"),
            "fills": int(order is not None and order.status == "filled"),
            "blocked": int(decision.action == "blocked"),
            "skipped_entries": int((decision.note or "").startswith(ENTRY_SKIPPED_PREFIX)),
        }
        where = DecisionTotalsRow.strategy == decision.strategy
        columns = {name: getattr(DecisionTotalsRow, name) + n for name, n in added.items()}
        if conn.execute(update(DecisionTotalsRow).where(where).values(**columns)).rowcount == 0:
            conn.execute(insert(DecisionTotalsRow).values(strategy=decision.strategy, **added))

    @staticmethod
    def _decision_exists(conn: Connection, key: str) -> bool:
        return (
            conn.execute(select(DecisionRow.id).where(DecisionRow.key == key)).first() is not None
        )

    def _refuse_if_tripped(self, conn: Connection, decision: DecisionRecord) -> None:
        # Checked under the write lock, so a trip committed a moment ago still stops the order.
        if decision.order is None:
            return
        reason = self._tripped_reason(conn, decision.strategy)
        if reason is not None:
            raise LedgerError(
                f"kill switch tripped for {decision.strategy} ({reason}): "
                f"refusing the order of {decision.key}"
            )

    @staticmethod
    def _decision_values(decision: DecisionRecord) -> dict[str, Any]:
        return {
            "key": decision.key,
            "strategy": decision.strategy,
            "symbol": decision.symbol,
            "timeframe": decision.timeframe,
            "bar_ts": decision.bar_ts,
            "decided_at": decision.decided_at,
            "entry_signal": decision.entry_signal,
            "exit_signal": decision.exit_signal,
            "action": decision.action,
            "note": decision.note,
            "compute_ms": decision.compute_ms,
            "run_id": decision.run_id,
            **_seen_values(decision.seen),
        }

    @staticmethod
    def _insert_order(conn: Connection, decision: DecisionRecord) -> int:
        order = decision.order
        assert order is not None
        result = conn.execute(
            insert(OrderRow).values(
                decision_key=decision.key,
                client_order_id=decision.client_order_id,
                strategy=decision.strategy,
                symbol=decision.symbol,
                side=order.side,
                amount=order.amount,
                price=order.price,
                status=order.status,
                reason=order.reason,
                created_at=decision.decided_at,
            )
        )
        return result.inserted_primary_key[0]

    @staticmethod
    def _insert_fill(conn: Connection, order_id: int, fill: FillRecord) -> int:
        result = conn.execute(insert(FillRow).values(order_id=order_id, **asdict(fill)))
        return result.inserted_primary_key[0]

    @staticmethod
    def _save_position(conn: Connection, decision: DecisionRecord) -> None:
        where = (PositionRow.strategy == decision.strategy, PositionRow.symbol == decision.symbol)
        if decision.position is None:
            conn.execute(delete(PositionRow).where(*where))
            return
        values = asdict(decision.position)
        # Update-then-insert is a safe upsert here: the write lock admits one writer.
        if conn.execute(update(PositionRow).where(*where).values(**values)).rowcount == 0:
            conn.execute(
                insert(PositionRow).values(
                    strategy=decision.strategy, symbol=decision.symbol, **values
                )
            )

    @staticmethod
    def _save_balance(conn: Connection, decision: DecisionRecord) -> None:
        values = asdict(decision.balance) | {"updated_at": decision.decided_at}
        where = BalanceRow.strategy == decision.strategy
        if conn.execute(update(BalanceRow).where(where).values(**values)).rowcount == 0:
            conn.execute(insert(BalanceRow).values(strategy=decision.strategy, **values))

    def record_strategy_config(self, name: str, config: Mapping[str, Any]) -> str:
        """Remember a strategy's config (JSON-able), audited the first time; its hash."""
        config_json = canonical_json(config)
        config_hash = hashlib.sha256(config_json.encode()).hexdigest()
        with self._transaction() as conn:
            seen = conn.execute(
                select(StrategyConfigRow.id).where(
                    StrategyConfigRow.name == name, StrategyConfigRow.config_hash == config_hash
                )
            ).first()
            if seen is None:
                result = conn.execute(
                    insert(StrategyConfigRow).values(
                        name=name,
                        config_hash=config_hash,
                        config_json=config_json,
                        first_seen=datetime.now(UTC),
                    )
                )
                state = [_bind(conn, StrategyConfigRow, id=result.inserted_primary_key[0])]
                payload = {"name": name, "config_hash": config_hash}
                append_events(conn, [(AUDIT_STRATEGY_CONFIG, name, payload)], state)
        return config_hash

    # --- audit chain ----------------------------------------------------------------------

    def append_audit(self, kind: str, strategy: str | None, payload: Mapping[str, Any]) -> int:
        """Append one standalone audit event; its seq."""
        with self._transaction() as conn:
            return append_events(conn, [(kind, strategy, payload)])

    def audit_count(self) -> int:
        with self._reading() as conn:
            return conn.execute(select(func.count()).select_from(AuditEventRow)).scalar_one()

    def audit_head(self) -> tuple[int, str]:
        """(seq, hash) of the last audit event: publish it to anchor the chain outside."""
        with self._reading() as conn:
            seq, digest = conn.execute(
                select(ChainHeadRow.seq, ChainHeadRow.hash).where(ChainHeadRow.id == 1)
            ).one()
        return seq, digest

    def verify_audit_chain(self, batch_size: int = 10_000, checkpoint: bool = False) -> list[str]:
        """Every break in the audit chain, each naming its seq, then every state row that
        differs from what the chain bound, naming its table and row, then any session total
        that differs from a recount; empty when intact. With `checkpoint`, an intact chain
        moves the verified checkpoint to its head (verify_for_trading starts there)."""
        problems: list[str] = []
        bound = _StateBindings()
        with self._reading() as conn:
            if not self._sqlite:
                # One snapshot for the head and the events (SQLite's BEGIN gives one already).
                conn.execution_options(isolation_level="REPEATABLE READ")
            head = self._head(conn)
            rows = conn.execution_options(yield_per=batch_size).execute(
                _EVENTS.order_by(AuditEventRow.seq)
            )
            chain, events = _chain_problems(rows, 1, GENESIS_HASH, head, bound)
            problems += chain
            # In the same snapshot as the chain: a write committing meanwhile is in neither.
            for table in STATE_TABLES:
                problems += bound.compare(table.name, state_rows(conn, table, batch_size))
            problems += _totals_problems(conn)
        self.last_verification = Verification(problems, *head, full=True, events=events)
        if checkpoint and not problems:
            self._save_checkpoint(*head, forward_only=False)
        return problems

    def verify_or_trip(self, by: str) -> list[str]:
        """verify_audit_chain, tripping the kill switch on any problem (trip_on_problems)."""
        problems = self.verify_audit_chain()
        if problems:
            self.trip_on_problems(problems, by)
        return problems

    def verify_for_trading(self, strategy: str, symbol: str, by: str) -> Verification:
        """What the dry-run verifies before a bar of `strategy` on `symbol`, in work bounded by
        the events since the last verification, not by the ledger's history; trips every
        strategy on any problem (trip_on_problems).

        The window starts at the older of the verified checkpoint and the strategy's newest
        decision event, and runs to the chain head. Every event in it is hash-checked and
        linked, the checkpoint event must still carry the checkpoint's hash, and every state
        row bound in it (so the strategy's position, balance and kill switches, which each
        decision binds again, and the decisions, orders and fills written since) must be the
        row its newest binding describes. Anything the window cannot vouch for (no
        checkpoint, a checkpoint the chain does not hold, a row the next bar reads bound
        before the window) falls back to the full verify_audit_chain. An edit of a row bound
        only before the window (an old fill, an old decision) is not seen here: the full
        verification (the audit_chain check, every 15 minutes) finds it and trips.
        """
        verification = self._verify_window(strategy, symbol)
        if verification is None:
            self.verify_audit_chain(checkpoint=True)
            verification = self.last_verification
        elif not verification.problems:
            self._save_checkpoint(verification.head_seq, verification.head_hash)
        self.last_verification = verification
        if verification.problems:
            self.trip_on_problems(verification.problems, by)
        return verification

    def _verify_window(self, strategy: str, symbol: str) -> Verification | None:
        """verify_for_trading's bounded pass; None when only the full verification can tell."""
        with self._reading() as conn:
            if not self._sqlite:
                conn.execution_options(isolation_level="REPEATABLE READ")
            head = self._head(conn)
            saved = conn.execute(
                select(CheckpointRow.seq, CheckpointRow.hash).where(CheckpointRow.id == 1)
            ).first()
            last = conn.execute(
                select(func.max(AuditEventRow.seq)).where(
                    AuditEventRow.strategy == strategy, AuditEventRow.kind == AUDIT_DECISION
                )
            ).scalar_one_or_none()
            if saved is None or last is None or not 0 <= saved.seq <= head[0]:
                return None
            # Seq 0: verified when the chain was empty, so the window is the whole chain.
            start = min(saved.seq, last) or 1
            rows = conn.execute(
                _EVENTS.where(AuditEventRow.seq >= start).order_by(AuditEventRow.seq)
            ).all()
            if saved.seq == 0:
                anchored, prev_hash = saved.hash == GENESIS_HASH, GENESIS_HASH
            else:
                anchor = next((row for row in rows if row.seq == saved.seq), None)
                anchored = anchor is not None and anchor.hash == saved.hash
                # The link into `start` was checked when `start` was verified (it is at or
                # before the checkpoint); its own hash is recomputed with all the others.
                prev_hash = rows[0].prev_hash if rows else GENESIS_HASH
            if not rows or rows[0].seq != start or not anchored:
                return None
            bound = _StateBindings()
            problems, events = _chain_problems(rows, start, prev_hash, head, bound)
            reads = (
                (PositionRow.__tablename__, {"strategy": strategy, "symbol": symbol}),
                (BalanceRow.__tablename__, {"strategy": strategy}),
                (KillSwitchRow.__tablename__, {"scope": strategy}),
                (KillSwitchRow.__tablename__, {"scope": GLOBAL_SCOPE}),
            )
            if not all(bound.binds(table, key) for table, key in reads):
                return None
            rows_checked = 0
            for table in STATE_TABLES:
                keys = bound.keys(table.name)
                rows_checked += len(keys)
                problems += bound.compare(table.name, bound_rows(conn, table, keys))
        return Verification(problems, *head, full=False, events=events, rows=rows_checked)

    @staticmethod
    def _head(conn: Connection) -> tuple[int, str]:
        seq, digest = conn.execute(
            select(ChainHeadRow.seq, ChainHeadRow.hash).where(ChainHeadRow.id == 1)
        ).one()
        return seq, digest

    def save_checkpoint(self, seq: int, digest: str) -> None:
        """Record that a full verification found the chain intact up to (seq, digest), the
        head it read (Verification.head_seq, head_hash): the dry-run's per-bar verification
        starts there."""
        self._save_checkpoint(seq, digest, forward_only=False)

    def _save_checkpoint(self, seq: int, digest: str, forward_only: bool = True) -> None:
        """Set the verified checkpoint to (seq, digest): only forward after a window (a
        concurrent verification may have gone further), anywhere after a full pass."""
        values = {"seq": seq, "hash": digest, "verified_at": datetime.now(UTC)}
        where = [CheckpointRow.id == 1]
        if forward_only:
            where.append(CheckpointRow.seq <= seq)
        with self._transaction() as conn:
            moved = conn.execute(update(CheckpointRow).where(*where).values(**values)).rowcount
            if not moved and conn.execute(select(CheckpointRow.id)).first() is None:
                conn.execute(insert(CheckpointRow).values(id=1, **values))

    def trip_on_problems(self, problems: Sequence[str], by: str) -> None:
        """Trip every strategy ("*"), naming the first problem: no order is placed on a ledger
        the chain does not vouch for. An edited row stays a problem until it is restored."""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        self.trip(GLOBAL_SCOPE, f"ledger verification failed: {problems[0]}{more}", by)

    # --- kill switch ----------------------------------------------------------------------

    def trip(self, scope: str, reason: str, by: str) -> bool:
        """Trip the kill switch of a strategy, or of all ("*"); False if already tripped."""
        return self._switch(scope, True, reason, by)

    def reset(self, scope: str, reason: str, by: str) -> bool:
        """Reset one scope (resetting "*" leaves strategy trips alone); False if not tripped."""
        return self._switch(scope, False, reason, by)

    def _switch(self, scope: str, trip: bool, reason: str, by: str) -> bool:
        with self._transaction() as conn:
            changed = self._switch_in(conn, scope, trip, reason, by)
        if changed:
            log = logger.warning if trip else logger.info
            log("kill switch %s %s by %s: %s", scope, "tripped" if trip else "reset", by, reason)
        return changed

    def _switch_in(self, conn: Connection, scope: str, trip: bool, reason: str, by: str) -> bool:
        """Change the switch inside the caller's write transaction, audited; False if it was
        in that state already."""
        if not scope or not reason or not by:
            raise ValueError("the kill switch needs a scope, a reason and who changed it")
        now = datetime.now(UTC)
        values = {"tripped": trip, "reason": reason, "changed_at": now, "changed_by": by}
        state = conn.execute(
            select(KillSwitchRow.tripped).where(KillSwitchRow.scope == scope)
        ).scalar_one_or_none()
        if bool(state) == trip:
            return False
        if state is None:
            conn.execute(insert(KillSwitchRow).values(scope=scope, **values))
        else:
            conn.execute(update(KillSwitchRow).where(KillSwitchRow.scope == scope).values(**values))
        kind = AUDIT_KILL_SWITCH_TRIP if trip else AUDIT_KILL_SWITCH_RESET
        strategy = None if scope == GLOBAL_SCOPE else scope
        payload = {"scope": scope, "reason": reason, "by": by}
        append_events(conn, [(kind, strategy, payload)], [_bind(conn, KillSwitchRow, scope=scope)])
        return True

    def tripped(self, strategy: str) -> str | None:
        """Why `strategy` may not trade (its own trip first, then "*"); None when it may."""
        with self._reading() as conn:
            return self._tripped_reason(conn, strategy)

    @staticmethod
    def _tripped_reason(conn: Connection, strategy: str) -> str | None:
        reasons = dict(
            conn.execute(
                select(KillSwitchRow.scope, KillSwitchRow.reason).where(
                    KillSwitchRow.scope.in_((strategy, GLOBAL_SCOPE)), KillSwitchRow.tripped
                )
            ).all()
        )
        return reasons.get(strategy) or reasons.get(GLOBAL_SCOPE)

    # --- reads ----------------------------------------------------------------------------

    def position(self, strategy: str, symbol: str) -> Position | None:
        with self._reading() as conn:
            return self._position(conn, strategy, symbol)

    def balance(self, strategy: str) -> Balance | None:
        with self._reading() as conn:
            return self._balance(conn, strategy)

    @staticmethod
    def _position(conn: Connection, strategy: str, symbol: str) -> Position | None:
        row = conn.execute(
            select(*(getattr(PositionRow, name) for name in POSITIONS if name not in KEYS)).where(
                PositionRow.strategy == strategy, PositionRow.symbol == symbol
            )
        ).first()
        return Position(*row) if row else None

    @staticmethod
    def _balance(conn: Connection, strategy: str) -> Balance | None:
        row = conn.execute(
            select(
                BalanceRow.cash, BalanceRow.realised_pnl, BalanceRow.fees, BalanceRow.peak_equity
            ).where(BalanceRow.strategy == strategy)
        ).first()
        return Balance(*row) if row else None

    def last_decided(self, strategy: str, symbol: str, timeframe: str) -> datetime | None:
        """Open time of the newest bar decided for the strategy on this symbol and timeframe."""
        with self._reading() as conn:
            return self._last_decided(conn, strategy, symbol, timeframe)

    @staticmethod
    def _last_decided(
        conn: Connection, strategy: str, symbol: str, timeframe: str
    ) -> datetime | None:
        value = conn.execute(
            select(func.max(DecisionRow.bar_ts)).where(
                DecisionRow.strategy == strategy,
                DecisionRow.symbol == symbol,
                DecisionRow.timeframe == timeframe,
            )
        ).scalar_one_or_none()
        # An aggregate skips the column's type on SQLite: naive UTC text comes back.
        return UTCDateTime().process_result_value(value, conn.dialect) if value else None

    def recent_errors(self, strategy: str, since: datetime) -> int:
        """How many errors the strategy's runs recorded since `since` (the burst trigger)."""
        with self._reading() as conn:
            return conn.execute(
                select(func.count())
                .select_from(AuditEventRow)
                .where(
                    AuditEventRow.kind == AUDIT_ERROR,
                    AuditEventRow.strategy == strategy,
                    AuditEventRow.ts >= since,
                )
            ).scalar_one()

    def orders(self, strategy: str | None = None, since: datetime | None = None) -> pl.DataFrame:
        """Orders (of `strategy`; of its decisions on bars opening at or after `since`)."""
        query = select(*(getattr(OrderRow, name) for name in ORDERS)).order_by(OrderRow.id)
        if strategy is not None:
            query = query.where(OrderRow.strategy == strategy)
        if since is not None:
            query = query.join(DecisionRow, DecisionRow.key == OrderRow.decision_key).where(
                DecisionRow.bar_ts >= since
            )
        return self._frame(query, ORDERS)

    def last_fills(self, strategy: str, until: datetime, last: int = 2) -> list[dict[str, Any]]:
        """The strategy's `last` newest fills on bars opening at or before `until`, newest
        first: side, fill bar, the decided bar and its decision key (an indexed read of the
        newest fills)."""
        query = (
            select(
                OrderRow.side,
                FillRow.bar_ts,
                DecisionRow.bar_ts.label("decision_bar_ts"),
                OrderRow.decision_key,
            )
            .select_from(FillRow)
            .join(OrderRow, OrderRow.id == FillRow.order_id)
            .join(DecisionRow, DecisionRow.key == OrderRow.decision_key)
            .where(OrderRow.strategy == strategy, FillRow.bar_ts <= until)
            .order_by(FillRow.bar_ts.desc(), FillRow.id.desc())
            .limit(last)
        )
        with self._reading() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def cash_after(self, strategy: str, key: str, bar_ts: datetime) -> float | None:
        """The strategy's cash after its decision `key` on the bar opening at `bar_ts`, as
        that decision's audit event recorded it. The event is found by its place among the
        strategy's decision events, counted from the newest (the decisions on later bars):
        an indexed read bounded by those. None when the event found there is another bar's
        (decisions written out of bar order)."""
        with self._reading() as conn:
            newer = conn.execute(
                select(func.count())
                .select_from(DecisionRow)
                .where(DecisionRow.strategy == strategy, DecisionRow.bar_ts > bar_ts)
            ).scalar_one()
            payload = conn.execute(
                select(AuditEventRow.payload)
                .where(AuditEventRow.strategy == strategy, AuditEventRow.kind == AUDIT_DECISION)
                .order_by(AuditEventRow.seq.desc())
                .offset(newer)
                .limit(1)
            ).scalar_one_or_none()
        try:
            body = json.loads(payload) if payload is not None else {}
            return float(body["balance"]["cash"]) if body.get("key") == key else None
        except (ValueError, KeyError, TypeError):
            return None

    def fills(self, strategy: str | None = None, after: datetime | None = None) -> pl.DataFrame:
        """Fills in order (of `strategy`; only on bars opening after `after`)."""
        query = (
            select(
                FillRow.order_id,
                OrderRow.client_order_id,
                OrderRow.strategy,
                OrderRow.symbol,
                OrderRow.side,
                FillRow.price,
                FillRow.amount,
                FillRow.fee,
                FillRow.filled_at,
                FillRow.bar_ts,
            )
            .join(OrderRow, OrderRow.id == FillRow.order_id)
            .order_by(FillRow.id)
        )
        if strategy is not None:
            query = query.where(OrderRow.strategy == strategy)
        if after is not None:
            query = query.where(FillRow.bar_ts > after)
        return self._frame(query, FILLS)

    def positions(self) -> pl.DataFrame:
        columns = (getattr(PositionRow, name) for name in POSITIONS)
        return self._frame(
            select(*columns).order_by(PositionRow.strategy, PositionRow.symbol), POSITIONS
        )

    def balances(self) -> pl.DataFrame:
        columns = (getattr(BalanceRow, name) for name in BALANCES)
        return self._frame(select(*columns).order_by(BalanceRow.strategy), BALANCES)

    def session_totals(self, strategy: str) -> dict[str, int]:
        """The strategy's session counts (decision_totals: one row, whatever the history):
        decisions, orders, rejected, fills, blocked, skipped_entries."""
        with self._reading() as conn:
            row = conn.execute(
                select(*(getattr(DecisionTotalsRow, name) for name in TOTALS)).where(
                    DecisionTotalsRow.strategy == strategy
                )
            ).first()
        return dict(zip(TOTALS, row or (0,) * len(TOTALS), strict=True))

    def newest_decisions(self, strategy: str, last: int, timed: bool = False) -> pl.DataFrame:
        """The strategy's `last` newest decisions (only those with a compute time, when
        `timed`), oldest first: an indexed read of at most `last` rows."""
        query = select(*(getattr(DecisionRow, name) for name in DECISIONS)).where(
            DecisionRow.strategy == strategy
        )
        if timed:
            query = query.where(DecisionRow.compute_ms.is_not(None))
        query = query.order_by(
            DecisionRow.bar_ts.desc(), DecisionRow.symbol.desc(), DecisionRow.timeframe.desc()
        ).limit(last)
        return self._frame(query, DECISIONS).reverse()

    def first_decided(self, strategy: str) -> datetime | None:
        """Open time of the strategy's first decided bar (an indexed read)."""
        with self._reading() as conn:
            value = conn.execute(
                select(func.min(DecisionRow.bar_ts)).where(DecisionRow.strategy == strategy)
            ).scalar_one_or_none()
            return UTCDateTime().process_result_value(value, conn.dialect) if value else None

    def decisions(self, strategy: str, since: datetime | None = None) -> pl.DataFrame:
        """A strategy's decisions on bars opening at or after `since`, oldest first."""
        query = (
            select(*(getattr(DecisionRow, name) for name in DECISIONS))
            .where(DecisionRow.strategy == strategy)
            .order_by(DecisionRow.bar_ts, DecisionRow.symbol, DecisionRow.timeframe)
        )
        if since is not None:
            query = query.where(DecisionRow.bar_ts >= since)
        return self._frame(query, DECISIONS)

    def audit_events(
        self, last: int | None = None, after: int | None = None, kinds: Sequence[str] = ()
    ) -> pl.DataFrame:
        """The audit log in order (only the `last` events, those after seq `after`, or those
        of `kinds`, when given)."""
        query = select(*(getattr(AuditEventRow, name) for name in AUDIT))
        if after is not None:
            query = query.where(AuditEventRow.seq > after)
        if kinds:
            query = query.where(AuditEventRow.kind.in_(kinds))
        if last is not None:
            newest = query.order_by(AuditEventRow.seq.desc()).limit(last).subquery()
            query = select(*(newest.c[name] for name in AUDIT)).order_by(newest.c.seq)
            return self._frame(query, AUDIT)
        return self._frame(query.order_by(AuditEventRow.seq), AUDIT)

    def kill_switch_states(self) -> pl.DataFrame:
        columns = (getattr(KillSwitchRow, name) for name in KILL_SWITCH)
        return self._frame(select(*columns).order_by(KillSwitchRow.scope), KILL_SWITCH)

    def _frame(self, query: Select[Any], schema: pl.Schema) -> pl.DataFrame:
        with self._reading() as conn:
            rows = [tuple(row) for row in conn.execute(query)]
        return pl.DataFrame(rows, schema=schema, orient="row")


def append_events(
    conn: Connection,
    events: Sequence[tuple[str, str | None, Mapping[str, Any]]],
    state: Sequence[list[Any]] = (),
) -> int:
    """Chain `events` after the head, the last one binding the state rows the transaction
    wrote (`_bind`); the caller holds the write lock. The last seq."""
    seq, prev_hash = conn.execute(
        select(ChainHeadRow.seq, ChainHeadRow.hash).where(ChainHeadRow.id == 1)
    ).one()
    if state:
        *events, (kind, strategy, payload) = events
        events.append((kind, strategy, {**payload, STATE_KEY: list(state)}))
    rows = chained_rows(seq, prev_hash, [(datetime.now(UTC), *event) for event in events])
    conn.execute(insert(AuditEventRow), rows)
    head = rows[-1]
    conn.execute(
        update(ChainHeadRow).where(ChainHeadRow.id == 1).values(seq=head["seq"], hash=head["hash"])
    )
    return head["seq"]


def chained_rows(
    seq: int,
    prev_hash: str,
    events: Iterable[tuple[datetime, str, str | None, Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """audit_events rows of `events` (ts, kind, strategy, payload), chained after the event
    `seq` whose hash is `prev_hash`."""
    rows = []
    for ts, kind, strategy, payload in events:
        seq += 1
        body = canonical_json(payload)
        digest = chain_hash(prev_hash, seq, iso_utc(ts), kind, strategy, body)
        rows.append(
            {
                "seq": seq,
                "ts": ts,
                "kind": kind,
                "strategy": strategy,
                "payload": body,
                "prev_hash": prev_hash,
                "hash": digest,
            }
        )
        prev_hash = digest
    return rows


def state_matches_chain(conn: Connection, tables: Sequence[Any]) -> bool:
    """Whether every row of `tables` is the one the audit chain last bound (no row unbound,
    edited or missing); the chain's own links are verify_audit_chain's business."""
    bound = _StateBindings()
    events = conn.execute(
        select(AuditEventRow.seq, AuditEventRow.kind, AuditEventRow.payload)
        .order_by(AuditEventRow.seq)
        .execution_options(yield_per=10_000)
    )
    for seq, kind, payload in events:
        bound.add(seq, kind, payload)
    return not any(bound.compare(table.name, state_rows(conn, table)) for table in tables)


class _StateBindings:
    """What the audit chain says each state row holds: the latest digest bound to it."""

    def __init__(self) -> None:
        # table -> primary key items -> (digest, seq, key)
        self._digests: dict[str, dict[tuple, tuple[str | None, int, dict]]] = {}
        self._bound_since: int | None = None  # the first event binding state

    def add(self, seq: int, kind: str, payload: str) -> list[str]:
        """Take in one event's bindings; the problems it shows."""
        if f'"{STATE_KEY}":' not in payload:  # most events bind nothing: skip the parse
            return []
        try:
            bindings = json.loads(payload).get(STATE_KEY) or []
        except (ValueError, AttributeError):
            return []  # unreadable: the chain's hash check names the seq already
        problems = []
        if kind == AUDIT_STATE_BASELINE and self._bound_since is not None:
            problems.append(
                f"seq {seq}: a state baseline after the state bound at seq {self._bound_since} "
                "(the ledger's state was re-baselined)"
            )
        if self._bound_since is None:
            self._bound_since = seq
        for table, key, digest in bindings:
            self._digests.setdefault(table, {})[tuple(sorted(key.items()))] = (digest, seq, key)
        return problems

    def binds(self, table: str, key: Mapping[str, Any]) -> bool:
        return tuple(sorted(key.items())) in self._digests.get(table, {})

    def keys(self, table: str) -> list[dict]:
        """The primary keys of the rows of `table` bound so far."""
        return [key for _, _, key in self._digests.get(table, {}).values()]

    def compare(self, table: str, rows: Iterator[tuple[dict, str]]) -> list[str]:
        """The rows of `table` against their bindings (consumed: call once per table)."""
        problems = []
        digests = self._digests.pop(table, {})
        for key, digest in rows:
            bound = digests.pop(tuple(sorted(key.items())), None)
            if bound is None:
                problems.append(
                    f"{_row_name(table, key)}: bound by no audit event (written outside the ledger)"
                )
            elif bound[0] is None:
                problems.append(
                    f"{_row_name(table, key)}: deleted at seq {bound[1]}, yet present "
                    "(written outside the ledger)"
                )
            elif bound[0] != digest:
                problems.append(
                    f"{_row_name(table, key)}: edited outside the ledger (differs from the "
                    f"state audited at seq {bound[1]})"
                )
        for digest, seq, key in digests.values():
            if digest is not None:
                problems.append(
                    f"{_row_name(table, key)}: deleted outside the ledger (audited at seq {seq})"
                )
        return problems


_EVENTS = select(
    AuditEventRow.seq,
    AuditEventRow.ts,
    AuditEventRow.kind,
    AuditEventRow.strategy,
    AuditEventRow.payload,
    AuditEventRow.prev_hash,
    AuditEventRow.hash,
)


def _chain_problems(
    rows: Any, expected: int, prev_hash: str, head: tuple[int, str], bound: _StateBindings
) -> tuple[list[str], int]:
    """The breaks in `rows` (audit events in seq order, the first expected at `expected`
    after `prev_hash`) up to the chain head, their bindings taken into `bound`; and how
    many events were read."""
    head_seq, head_hash = head
    problems: list[str] = []
    count = 0
    for seq, ts, kind, strategy, payload, row_prev, row_hash in rows:
        count += 1
        if seq < expected:
            problems.append(f"seq {seq}: out of range (seqs start at 1)")
        elif seq > expected:
            problems.append(_missing(expected, seq - 1, "deleted"))
        elif row_prev != prev_hash:
            problems.append(
                f"seq {seq}: prev_hash does not match the hash of seq {seq - 1} "
                "(an event was rewritten, replaced or reordered)"
            )
        if chain_hash(row_prev, seq, iso_utc(ts), kind, strategy, payload) != row_hash:
            problems.append(f"seq {seq}: hash mismatch (ts, kind, strategy or payload edited)")
        if seq > head_seq:
            problems.append(f"seq {seq}: beyond the chain head (seq {head_seq})")
        problems += bound.add(seq, kind, payload)
        expected, prev_hash = max(expected, seq + 1), row_hash
    last = expected - 1
    if last < head_seq:
        problems.append(_missing(expected, head_seq, f"deleted; the chain head is seq {head_seq}"))
    elif last == head_seq and prev_hash != head_hash:
        problems.append(f"seq {head_seq}: hash differs from the chain head's")
    return problems, count


def bound_rows(
    conn: Connection, table: Any, keys: Sequence[Mapping[str, Any]], batch: int = 500
) -> Iterator[tuple[dict, str]]:
    """(primary key, digest) of the rows of `table` with these primary keys (those there)."""
    names = [column.name for column in table.primary_key]
    if len(names) == 1:
        (name,) = names
        values = [key[name] for key in keys]
        chunks = [table.c[name].in_(values[k : k + batch]) for k in range(0, len(values), batch)]
    else:
        chunks = [and_(*(table.c[n] == key[n] for n in names)) for key in keys]
    for condition in chunks:
        for row in conn.execute(select(table).where(condition)).mappings():
            yield {name: row[name] for name in names}, row_digest(table.name, row)


def _totals_problems(conn: Connection) -> list[str]:
    """decision_totals against a recount of the decisions and orders (the full pass only)."""
    counted: dict[str, dict[str, int]] = {}

    def count(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    skipped = func.substr(DecisionRow.note, 1, len(ENTRY_SKIPPED_PREFIX)) == ENTRY_SKIPPED_PREFIX
    for strategy, n, blocked, skipped_entries in conn.execute(
        select(
            DecisionRow.strategy,
            func.count(),
            count(DecisionRow.action == "blocked"),
            count(skipped),
        ).group_by(DecisionRow.strategy)
    ):
        counted[strategy] = dict.fromkeys(TOTALS, 0) | {
            "decisions": n,
            "blocked": blocked,
            "skipped_entries": skipped_entries,
        }
    for strategy, n, rejected, fills in conn.execute(
        select(
            OrderRow.strategy,
            func.count(),
            count(OrderRow.status == "rejected"),
            count(OrderRow.status == "filled"),
        ).group_by(OrderRow.strategy)
    ):
        counted.setdefault(strategy, dict.fromkeys(TOTALS, 0)).update(
            orders=n, rejected=rejected, fills=fills
        )
    kept = {
        row[0]: dict(zip(TOTALS, row[1:], strict=True))
        for row in conn.execute(
            select(DecisionTotalsRow.strategy, *(getattr(DecisionTotalsRow, n) for n in TOTALS))
        )
    }
    problems = []
    for strategy in sorted(counted.keys() | kept.keys()):
        have, want = kept.get(strategy), counted.get(strategy)
        if have != want:
            problems.append(
                f"decision_totals row strategy={strategy}: {have} differs from the recount "
                f"{want} (edited outside the ledger)"
            )
    return problems


def _seen_values(seen: SeenBar | None) -> dict[str, Any]:
    names = ("open", "high", "low", "close", "volume", "untradable")
    values = {f"bar_{name}": getattr(seen, name) if seen else None for name in names}
    return values | {"fill_open": seen.fill_open if seen else None}


def _missing(first: int, last: int, why: str) -> str:
    span = f"seq {first}" if first == last else f"seq {first}..{last}"
    return f"{span}: missing ({why})"
