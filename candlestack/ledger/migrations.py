"""Alembic plumbing: the ledger's migration scripts (candlestack/ledger_migrations/, shipped
with the package) and the revisions they hold."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

MIGRATIONS = Path(__file__).resolve().parent.parent / "ledger_migrations"
# Not "alembic_version": Dagster's PostgreSQL storage keeps its own Alembic table, and the
# ledger may share its database.
VERSION_TABLE = "ledger_alembic_version"


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head_revision() -> str:
    """The schema revision this code writes."""
    head = _scripts().get_current_head()
    assert head is not None, f"no Alembic revisions under {MIGRATIONS}"
    return head


def known_revision(revision: str) -> bool:
    """Whether this code has the migration script of `revision` (False: a newer ledger)."""
    return any(script.revision == revision for script in _scripts().walk_revisions())


def current_revision(conn: Connection) -> str | None:
    """The revision the database on `conn` is at (None: never migrated)."""
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def alembic_config(conn: Connection) -> Config:
    """An Alembic config running the ledger's scripts on `conn`, inside its transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config
