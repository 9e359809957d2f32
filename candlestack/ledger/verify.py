"""The audit chain's entry points on the ledger: appending, the head, and verification (full,
or bounded to the events since the last verified checkpoint)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from candlestack.ledger.audit import EVENTS, append_events, chain_problems
from candlestack.ledger.bindings import StateBindings, bound_rows, state_rows, totals_problems
from candlestack.ledger.records import AUDIT_DECISION, GENESIS_HASH, GLOBAL_SCOPE, Verification
from candlestack.ledger.switch import KillSwitch
from candlestack.ledger.tables import (
    STATE_TABLES,
    AuditEventRow,
    BalanceRow,
    ChainHeadRow,
    CheckpointRow,
    KillSwitchRow,
    PositionRow,
)


class AuditChain(KillSwitch):
    """The audit log of the ledger and its verification (a failed one trips the kill switch)."""

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
        bound = StateBindings()
        with self._reading() as conn:
            if not self._sqlite:
                # One snapshot for the head and the events (SQLite's BEGIN gives one already).
                conn.execution_options(isolation_level="REPEATABLE READ")
            head = self._head(conn)
            rows = conn.execution_options(yield_per=batch_size).execute(
                EVENTS.order_by(AuditEventRow.seq)
            )
            chain, events = chain_problems(rows, 1, GENESIS_HASH, head, bound)
            problems += chain
            # In the same snapshot as the chain: a write committing meanwhile is in neither.
            for table in STATE_TABLES:
                problems += bound.compare(table.name, state_rows(conn, table, batch_size))
            problems += totals_problems(conn)
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
                EVENTS.where(AuditEventRow.seq >= start).order_by(AuditEventRow.seq)
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
            bound = StateBindings()
            problems, events = chain_problems(rows, start, prev_hash, head, bound)
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
