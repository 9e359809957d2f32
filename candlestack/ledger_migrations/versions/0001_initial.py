"""The initial ledger: decisions, orders, fills, positions, balances, kill switch, audit chain.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written out in full rather than importing candlestack.ledger's models: a migration is frozen
at the schema it created, whatever the models become.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Timestamps: timestamptz on PostgreSQL, naive UTC text on SQLite (the ledger's UTCDateTime).
TS = sa.DateTime(timezone=True)
# Money: float64, exactly what the execution engine computed.
MONEY = sa.Double()
HASH = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "strategy_configs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("config_hash", HASH, nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        sa.Column("first_seen", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_strategy_configs"),
        sa.UniqueConstraint("name", "config_hash", name="uq_strategy_configs_name_config_hash"),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("symbol", sa.String(), nullable=False),
        sa.Column("timeframe", sa.String(), nullable=False),
        sa.Column("bar_ts", TS, nullable=False),
        sa.Column("decided_at", TS, nullable=False),
        sa.Column("entry_signal", sa.Boolean(), nullable=False),
        sa.Column("exit_signal", sa.Boolean(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
        sa.UniqueConstraint("key", name="uq_decisions_key"),
        sa.CheckConstraint(
            "action IN ('none', 'buy', 'sell', 'blocked')", name="ck_decisions_action"
        ),
    )
    op.create_index("ix_decisions_strategy_bar_ts", "decisions", ["strategy", "bar_ts"])
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("decision_key", sa.Text(), nullable=False),
        sa.Column("client_order_id", sa.String(), nullable=False),
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("symbol", sa.String(), nullable=False),
        sa.Column("side", sa.String(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("price", MONEY, nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
        sa.ForeignKeyConstraint(
            ["decision_key"], ["decisions.key"], name="fk_orders_decision_key_decisions"
        ),
        sa.UniqueConstraint("client_order_id", name="uq_orders_client_order_id"),
        sa.CheckConstraint("side IN ('buy', 'sell')", name="ck_orders_side"),
        sa.CheckConstraint("status IN ('filled', 'rejected')", name="ck_orders_status"),
    )
    op.create_index("ix_orders_strategy", "orders", ["strategy"])
    op.create_table(
        "fills",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("price", MONEY, nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("fee", MONEY, nullable=False),
        sa.Column("filled_at", TS, nullable=False),
        sa.Column("bar_ts", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fills"),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name="fk_fills_order_id_orders"),
        sa.UniqueConstraint("order_id", name="uq_fills_order_id"),
    )
    op.create_table(
        "positions",
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("symbol", sa.String(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("entry_price", MONEY, nullable=False),
        sa.Column("entry_fee", MONEY, nullable=False),
        sa.Column("opened_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("strategy", "symbol", name="pk_positions"),
    )
    op.create_table(
        "balances",
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("cash", MONEY, nullable=False),
        sa.Column("realised_pnl", MONEY, nullable=False),
        sa.Column("fees", MONEY, nullable=False),
        sa.Column("peak_equity", MONEY, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("strategy", name="pk_balances"),
    )
    op.create_table(
        "kill_switch",
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("tripped", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("changed_at", TS, nullable=False),
        sa.Column("changed_by", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("scope", name="pk_kill_switch"),
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ts", TS, nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("strategy", sa.String(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prev_hash", HASH, nullable=False),
        sa.Column("hash", HASH, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
    )
    chain_head = op.create_table(
        "chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", HASH, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chain_head"),
        sa.CheckConstraint("id = 1", name="ck_chain_head_single_row"),
    )
    # The empty chain: the first event's prev_hash is 64 zeros.
    op.bulk_insert(chain_head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    for table in (
        "chain_head",
        "audit_events",
        "kill_switch",
        "balances",
        "positions",
        "fills",
        "orders",
        "decisions",
        "strategy_configs",
    ):
        op.drop_table(table)
