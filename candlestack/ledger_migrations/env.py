"""Alembic environment of the ledger: run only through candlestack.ledger.Ledger.migrate().

migrate() opens the transaction, takes the ledger's write lock and hands its connection over
in `config.attributes["connection"]`; Alembic runs inside that transaction, so two processes
migrating at once run the scripts once.
"""

from alembic import context

from candlestack.ledger import VERSION_TABLE, Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run ledger migrations with candlestack.ledger.Ledger(url).migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
