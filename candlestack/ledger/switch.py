"""The kill switch: per strategy or global ("*"), each change audited."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from candlestack.ledger.audit import append_events, bind_row
from candlestack.ledger.database import LedgerDatabase
from candlestack.ledger.records import AUDIT_KILL_SWITCH_RESET, AUDIT_KILL_SWITCH_TRIP, GLOBAL_SCOPE
from candlestack.ledger.tables import KillSwitchRow

logger = logging.getLogger(__name__)


class KillSwitch(LedgerDatabase):
    """Tripping, resetting and reading the kill switch."""

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
        append_events(
            conn, [(kind, strategy, payload)], [bind_row(conn, KillSwitchRow, scope=scope)]
        )
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
