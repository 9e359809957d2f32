"""What the dry-run saw and how long it took: the decided bar's prices, the fill bar's open,
the decision's compute time and run id; and a position's refused exit, retried next bar.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

All columns are nullable: decisions written at 0001 keep NULL there, and the drift check
treats a NULL seen bar as "not recorded" rather than guessing it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Double()
DECISION_COLUMNS = (
    sa.Column("bar_open", MONEY, nullable=True),
    sa.Column("bar_high", MONEY, nullable=True),
    sa.Column("bar_low", MONEY, nullable=True),
    sa.Column("bar_close", MONEY, nullable=True),
    sa.Column("bar_volume", MONEY, nullable=True),
    sa.Column("bar_untradable", sa.Boolean(), nullable=True),
    sa.Column("fill_open", MONEY, nullable=True),
    sa.Column("compute_ms", sa.Double(), nullable=True),
    sa.Column("run_id", sa.String(), nullable=True),
)


def upgrade() -> None:
    for column in DECISION_COLUMNS:
        op.add_column("decisions", column)
    op.add_column("positions", sa.Column("refused_exit", sa.String(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops columns by copying the table.
    with op.batch_alter_table("positions") as batch:
        batch.drop_column("refused_exit")
    with op.batch_alter_table("decisions") as batch:
        for column in reversed(DECISION_COLUMNS):
            batch.drop_column(column.name)
