"""The ledger's reads: the state the dry-run decides on, and the frames the UI, demo and
drift checks read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import polars as pl
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from candlestack.ledger.database import LedgerDatabase
from candlestack.ledger.records import AUDIT_DECISION, AUDIT_ERROR, Balance, Position
from candlestack.ledger.tables import (
    AUDIT,
    BALANCES,
    DECISIONS,
    FILL_COLUMNS,
    FILLS,
    KEYS,
    KILL_SWITCH,
    ORDERS,
    POSITIONS,
    TOTALS,
    AuditEventRow,
    BalanceRow,
    DecisionRow,
    DecisionTotalsRow,
    FillRow,
    KillSwitchRow,
    OrderRow,
    PositionRow,
    UTCDateTime,
)


class LedgerQueries(LedgerDatabase):
    """The ledger's read queries."""

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
            select(*FILL_COLUMNS)
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
