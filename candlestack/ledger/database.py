"""The ledger's connections: the engine, the schema check and the write transaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from candlestack.errors import LedgerError
from candlestack.ledger.migrations import (
    alembic_config,
    current_revision,
    head_revision,
    known_revision,
)
from candlestack.ledger.records import Verification

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///data/ledger.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Key of the PostgreSQL advisory lock every ledger writer holds for its transaction ("candle").
PG_WRITE_LOCK = 0x63616E646C65
# Execution option that makes the SQLite "begin" hook take the write lock up front.
_WRITE_OPTION = "candlestack_ledger_write"


# --- SQLite connection setup (the documented pysqlite transaction recipe) ----------------


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, emits BEGIN, so SELECTs and DDL are transactional
    # and writers can ask for IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock at BEGIN, so writers queue on busy_timeout; a deferred
    # transaction upgrading to write mid-way gets SQLITE_BUSY, which no timeout retries.
    immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class LedgerDatabase:
    """The engine of one ledger database, its schema check and its transactions."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = parsed.render_as_string(hide_password=True)  # what messages show
        self._sqlite = parsed.get_backend_name() == "sqlite"
        if self._sqlite and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # pre-ping: a long-lived sensor process outlives server-side idle timeouts.
        self._engine: Engine = create_engine(parsed, pool_pre_ping=not self._sqlite)
        if self._sqlite:
            event.listen(self._engine, "connect", _sqlite_connect)
            event.listen(self._engine, "begin", _sqlite_begin)
        self._schema_checked = False
        self.last_verification: Verification | None = None

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    # --- schema ---------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to this code's head revision (a no-op when it is there already)."""
        head = head_revision()
        with self._transaction(check_schema=False) as conn:
            current = current_revision(conn)
            if current is not None and not known_revision(current):
                raise LedgerError(self._too_new(current, head))
            if current != head:
                logger.info("migrating ledger %s from %s to %s", self.url, current, head)
                command.upgrade(alembic_config(conn), "head")
        self._schema_checked = True

    def schema_revision(self) -> str | None:
        """The revision the database is at (None: never migrated)."""
        try:
            with self._engine.connect() as conn:
                return current_revision(conn)
        except SQLAlchemyError as exc:
            raise LedgerError(f"cannot read the schema revision of {self.url}: {exc}") from exc

    def _too_new(self, current: str, head: str) -> str:
        return (
            f"ledger {self.url} is at schema revision {current}, newer than this code's "
            f"head {head}: upgrade candlestack before opening it"
        )

    def _check_schema(self) -> None:
        if self._schema_checked:
            return
        current, head = self.schema_revision(), head_revision()
        if current is None:
            raise LedgerError(f"ledger {self.url} has no schema: call Ledger.migrate() first")
        if not known_revision(current):
            raise LedgerError(self._too_new(current, head))
        if current != head:
            raise LedgerError(
                f"ledger {self.url} is at schema revision {current}, older than this code's "
                f"head {head}: call Ledger.migrate()"
            )
        self._schema_checked = True

    # --- transactions ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, check_schema: bool = True) -> Iterator[Connection]:
        """A write transaction holding the ledger's write lock until it commits or rolls back;
        database errors become LedgerError naming the ledger."""
        if check_schema:
            self._check_schema()
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{_WRITE_OPTION: True})
                with conn.begin():
                    if not self._sqlite:
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK}
                        )
                    yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url}: {exc}") from exc

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        self._check_schema()
        try:
            with self._engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise LedgerError(f"ledger {self.url}: {exc}") from exc
