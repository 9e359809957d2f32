"""The audit chain vouches for the state: bind the rows a ledger already holds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

From 0003 on, every write binds the digests of the state rows it touched into its audit
event. The rows written before have no binding, so one `state_baseline` event binds them as
they stand at the upgrade (none when the rows match the chain already: an empty ledger, or
one taken down and up again with nothing written between; a baseline after bound state is
reported by verify_audit_chain, since 0002 code wrote rows the chain does not vouch for).
Tables are reflected, not taken from candlestack.ledger's models, so the step reads the
schema it runs on; the digest is the chain's format (candlestack.ledger.row_digest), shared
with every later write.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from candlestack.ledger import (
    AUDIT_STATE_BASELINE,
    STATE_TABLES,
    append_events,
    state_matches_chain,
    state_rows,
)

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    conn = op.get_bind()
    metadata = sa.MetaData()
    tables = [sa.Table(t.name, metadata, autoload_with=conn) for t in STATE_TABLES]
    if state_matches_chain(conn, tables):
        return  # nothing written, or a downgrade and upgrade with no write between
    bindings = []
    for table in tables:
        bindings += [[table.name, key, digest] for key, digest in state_rows(conn, table)]
    append_events(conn, [(AUDIT_STATE_BASELINE, None, {"rows": len(bindings)})], bindings)


def downgrade() -> None:
    # The baseline event stays: the audit chain is append-only, and 0002 code ignores it.
    pass
