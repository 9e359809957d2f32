"""What the audit chain says each state row holds, and the state rows compared with it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.engine import Connection

from candlestack.ledger.records import (
    AUDIT_STATE_BASELINE,
    ENTRY_SKIPPED_PREFIX,
    STATE_KEY,
    row_digest,
)
from candlestack.ledger.tables import (
    TOTALS,
    AuditEventRow,
    DecisionRow,
    DecisionTotalsRow,
    OrderRow,
)


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


def state_matches_chain(conn: Connection, tables: Sequence[Any]) -> bool:
    """Whether every row of `tables` is the one the audit chain last bound (no row unbound,
    edited or missing); the chain's own links are verify_audit_chain's business."""
    bound = StateBindings()
    events = conn.execute(
        select(AuditEventRow.seq, AuditEventRow.kind, AuditEventRow.payload)
        .order_by(AuditEventRow.seq)
        .execution_options(yield_per=10_000)
    )
    for seq, kind, payload in events:
        bound.add(seq, kind, payload)
    return not any(bound.compare(table.name, state_rows(conn, table)) for table in tables)


class StateBindings:
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


def totals_problems(conn: Connection) -> list[str]:
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
