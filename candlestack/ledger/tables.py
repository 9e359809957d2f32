"""The ledger's SQLAlchemy tables, and the polars schemas of the frames read from them
(derived from the tables, so the two cannot drift apart)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import polars as pl
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from candlestack.ledger.records import require_utc

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
        value = require_utc("timestamp", value)
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


# --- frames the UI, demo and drift checks read ----------------------------------------------

KEYS = ("strategy", "symbol")

# Most specific first: Text is a String, UTCDateTime decorates a DateTime.
_POLARS_TYPES: tuple[tuple[type, pl.DataType], ...] = (
    (UTCDateTime, pl.Datetime("us", "UTC")),
    (Boolean, pl.Boolean),
    (Integer, pl.Int64),
    (Double, pl.Float64),
    (String, pl.String),
)


def polars_schema(columns: Iterable[Column[Any]]) -> pl.Schema:
    """The polars schema of a frame of these columns, in order, typed as the ledger stores
    them (a column type without a polars dtype here is refused)."""
    dtypes = {}
    for column in columns:
        dtype = next((d for kind, d in _POLARS_TYPES if isinstance(column.type, kind)), None)
        if dtype is None:
            raise TypeError(f"no polars dtype for {column.table.name}.{column.name}: {column.type}")
        dtypes[column.name] = dtype
    return pl.Schema(dtypes)


def _columns(model: type[Base], *omit: str) -> list[Column[Any]]:
    return [column for column in model.__table__.columns if column.name not in omit]


_fills, _orders = FillRow.__table__.c, OrderRow.__table__.c
# A fill with its order's identity: the columns of Ledger.fills(), in order.
FILL_COLUMNS = (
    _fills.order_id,
    _orders.client_order_id,
    _orders.strategy,
    _orders.symbol,
    _orders.side,
    _fills.price,
    _fills.amount,
    _fills.fee,
    _fills.filled_at,
    _fills.bar_ts,
)

ORDERS = polars_schema(_columns(OrderRow))
FILLS = polars_schema(FILL_COLUMNS)
POSITIONS = polars_schema(_columns(PositionRow))
BALANCES = polars_schema(_columns(BalanceRow))
DECISIONS = polars_schema(_columns(DecisionRow, "id"))
KILL_SWITCH = polars_schema(_columns(KillSwitchRow))
AUDIT = polars_schema(_columns(AuditEventRow, "prev_hash"))
