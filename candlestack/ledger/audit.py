"""The hash-chained audit log: appending events after the chain head, and finding the
breaks in a run of events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from candlestack.ledger.bindings import StateBindings
from candlestack.ledger.records import STATE_KEY, canonical_json, chain_hash, iso_utc, row_digest
from candlestack.ledger.tables import AuditEventRow, Base, ChainHeadRow


def bind_row(conn: Connection, model: type[Base], **key: Any) -> list[Any]:
    """The binding of one state row as it now stands in the transaction: [table, key,
    digest], digest None when the row is gone."""
    table = model.__table__
    row = (
        conn.execute(select(table).where(*(table.c[name] == value for name, value in key.items())))
        .mappings()
        .first()
    )
    return [table.name, key, row_digest(table.name, row) if row is not None else None]


def append_events(
    conn: Connection,
    events: Sequence[tuple[str, str | None, Mapping[str, Any]]],
    state: Sequence[list[Any]] = (),
) -> int:
    """Chain `events` after the head, the last one binding the state rows the transaction
    wrote (`bind_row`); the caller holds the write lock. The last seq."""
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


EVENTS = select(
    AuditEventRow.seq,
    AuditEventRow.ts,
    AuditEventRow.kind,
    AuditEventRow.strategy,
    AuditEventRow.payload,
    AuditEventRow.prev_hash,
    AuditEventRow.hash,
)


def chain_problems(
    rows: Any, expected: int, prev_hash: str, head: tuple[int, str], bound: StateBindings
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


def _missing(first: int, last: int, why: str) -> str:
    span = f"seq {first}" if first == last else f"seq {first}..{last}"
    return f"{span}: missing ({why})"
