"""The Ledger and its write path; it inherits its reads (queries.py), verification and kill
switch (verify.py, switch.py) and connections (database.py).

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
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from candlestack.errors import LedgerError
from candlestack.ledger.audit import append_events, bind_row
from candlestack.ledger.queries import LedgerQueries
from candlestack.ledger.records import (
    AUDIT_DECISION,
    AUDIT_STRATEGY_CONFIG,
    ENTRY_SKIPPED_PREFIX,
    GLOBAL_SCOPE,
    DecisionRecord,
    FillRecord,
    LedgerState,
    SeenBar,
    canonical_json,
    decision_key,
)
from candlestack.ledger.tables import (
    BalanceRow,
    DecisionRow,
    DecisionTotalsRow,
    FillRow,
    KillSwitchRow,
    OrderRow,
    PositionRow,
    StrategyConfigRow,
)
from candlestack.ledger.verify import AuditChain


class Ledger(LedgerQueries, AuditChain):
    """The dry-run's durable state in one SQL database (see the module docstring)."""

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
        state = [bind_row(conn, DecisionRow, id=result.inserted_primary_key[0])]
        if decision.order is not None:
            order_id = self._insert_order(conn, decision)
            state.append(bind_row(conn, OrderRow, id=order_id))
            if decision.fill is not None:
                fill_id = self._insert_fill(conn, order_id, decision.fill)
                state.append(bind_row(conn, FillRow, id=fill_id))
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
            bind_row(conn, PositionRow, strategy=strategy, symbol=symbol),
            bind_row(conn, BalanceRow, strategy=strategy),
            bind_row(conn, KillSwitchRow, scope=strategy),
            bind_row(conn, KillSwitchRow, scope=GLOBAL_SCOPE),
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
                state = [bind_row(conn, StrategyConfigRow, id=result.inserted_primary_key[0])]
                payload = {"name": name, "config_hash": config_hash}
                append_events(conn, [(AUDIT_STRATEGY_CONFIG, name, payload)], state)
        return config_hash


def _seen_values(seen: SeenBar | None) -> dict[str, Any]:
    names = ("open", "high", "low", "close", "volume", "untradable")
    values = {f"bar_{name}": getattr(seen, name) if seen else None for name in names}
    return values | {"fill_open": seen.fill_open if seen else None}
