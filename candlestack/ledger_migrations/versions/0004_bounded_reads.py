"""A bar's reads stay bounded as the ledger grows: running session totals, a verified
checkpoint of the audit chain, and the indexes the per-bar and drift queries use.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

- `decision_totals`: per strategy, the counts a dry-run step shows (decisions, orders,
  rejected, fills, blocked, skipped entries), kept by every decision write in its own
  transaction; filled here from the rows already there. The full verification recounts them.
- `audit_checkpoint`: the seq and hash of the newest audit event a verification found
  intact; the dry-run's per-bar verification starts there (Ledger.verify_for_trading).
  None here: the first verification after the upgrade is a full one.
- indexes: audit events by (strategy, kind, seq), fills by bar, orders by decision.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
COUNTS = ("decisions", "orders", "rejected", "fills", "blocked", "skipped_entries")
# What the dry-run writes as the note of an entry its data policy skipped (session_summary).
ENTRY_SKIPPED = "entry skipped"
INDEXES = (
    ("ix_audit_events_strategy_kind_seq", "audit_events", ["strategy", "kind", "seq"]),
    ("ix_fills_bar_ts", "fills", ["bar_ts"]),
    ("ix_orders_decision_key", "orders", ["decision_key"]),
)


def upgrade() -> None:
    conn = op.get_bind()
    # Idempotent: a ledger whose version row was set back (a restore, a repair) runs it again.
    existing = sa.inspect(conn)
    tables = set(existing.get_table_names())
    if "decision_totals" not in tables:
        op.create_table(
            "decision_totals",
            sa.Column("strategy", sa.String(), nullable=False),
            *(sa.Column(name, sa.Integer(), nullable=False) for name in COUNTS),
            sa.PrimaryKeyConstraint("strategy", name="pk_decision_totals"),
        )
    if "audit_checkpoint" not in tables:
        op.create_table(
            "audit_checkpoint",
            sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
            sa.Column("seq", sa.Integer(), nullable=False),
            sa.Column("hash", sa.String(64), nullable=False),
            sa.Column("verified_at", TS, nullable=False),
            sa.PrimaryKeyConstraint("id", name="pk_audit_checkpoint"),
            sa.CheckConstraint("id = 1", name="ck_audit_checkpoint_single_row"),
        )
    for name, table, columns in INDEXES:
        if name not in {index["name"] for index in existing.get_indexes(table)}:
            op.create_index(name, table, columns)
    _fill_totals(conn)


def _fill_totals(conn: sa.Connection) -> None:
    metadata = sa.MetaData()
    totals = sa.Table("decision_totals", metadata, autoload_with=conn)
    decisions = sa.Table("decisions", metadata, autoload_with=conn)
    orders = sa.Table("orders", metadata, autoload_with=conn)
    rows: dict[str, dict[str, int]] = {}

    def count(condition) -> sa.ColumnElement:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    skipped = sa.func.substr(decisions.c.note, 1, len(ENTRY_SKIPPED)) == ENTRY_SKIPPED
    for strategy, n, blocked, skipped_entries in conn.execute(
        sa.select(
            decisions.c.strategy,
            sa.func.count(),
            count(decisions.c.action == "blocked"),
            count(skipped),
        ).group_by(decisions.c.strategy)
    ):
        rows[strategy] = dict.fromkeys(COUNTS, 0) | {
            "decisions": n,
            "blocked": blocked,
            "skipped_entries": skipped_entries,
        }
    for strategy, n, rejected, fills in conn.execute(
        sa.select(
            orders.c.strategy,
            sa.func.count(),
            count(orders.c.status == "rejected"),
            count(orders.c.status == "filled"),
        ).group_by(orders.c.strategy)
    ):
        row = rows.setdefault(strategy, dict.fromkeys(COUNTS, 0))
        row |= {"orders": n, "rejected": rejected, "fills": fills}
    conn.execute(sa.delete(totals))
    if rows:
        conn.execute(
            sa.insert(totals),
            [{"strategy": strategy, **row} for strategy, row in sorted(rows.items())],
        )


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table)
    op.drop_table("audit_checkpoint")
    op.drop_table("decision_totals")
