"""Back up, verify and restore the dry-run ledger, the one state the exchange cannot rebuild:

    python -m candlestack.ledger_backup backup  --to FILE [--url URL]
    python -m candlestack.ledger_backup verify  FILE
    python -m candlestack.ledger_backup restore --from FILE [--url URL] [--force]

The ledger is CANDLESTACK_LEDGER_URL's unless --url names another. A backup is one SQLite
file holding the ledger's tables and its Alembic version, whatever the backend: the ledger's
own SQLite format, so it opens as a Ledger, restores into SQLite or PostgreSQL, and needs no
pg_dump matching the server's version. It is taken online, while the dry-run writes:
- SQLite: sqlite3's backup API in one step, a read snapshot that writers do not wait for
  (WAL);
- PostgreSQL: every ledger table (only those: the database may hold Dagster's storage too)
  read in one REPEATABLE READ snapshot, into a file made by the migrations at the ledger's
  revision.
The file is written beside its target, checked, fsynced and renamed over it. A backup is
checked as a restore would use it: a scratch copy migrated to this code's schema, its
integrity checked and its audit chain verified (`Ledger.verify_audit_chain`). A chain that
does not verify is refused, and nothing is written or restored.

restore refuses a ledger that holds anything, unless --force. SQLite: the restored file is
made beside the ledger and renamed over it. PostgreSQL: one transaction under the ledger's
write lock drops the ledger's tables, recreates them by the migrations and loads the rows,
so writers wait and then see the whole restored ledger, or the old one if it fails. Stop
the dry-run (daemon, sensors) before restoring a SQLite ledger: a process that still holds
the old file open would go on writing into it.

Exit status: 0 done; 1 the audit chain does not verify (each problem is printed); 2 any
other error (missing file, not a ledger backup, unreachable database, a ledger not empty).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from alembic import command
from psycopg import sql
from sqlalchemy import Connection, Integer, create_engine, delete, func, insert, inspect, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from candlestack.config import Settings
from candlestack.errors import BackupError, BrokenChainError, CandlestackError, LedgerError
from candlestack.ledger import (
    PG_WRITE_LOCK,
    VERSION_TABLE,
    Base,
    ChainHeadRow,
    Ledger,
    alembic_config,
    current_revision,
    known_revision,
)

BATCH_ROWS = 10_000
MB = 1_000_000


@dataclass(frozen=True)
class Summary:
    """A backup or a restored ledger, checked."""

    path: Path  # the backup file
    bytes: int
    revision: str  # the schema revision the backup was taken at
    events: int  # audit events
    head: tuple[int, str]  # the chain head: seq and hash
    seconds: float = 0.0  # the whole command

    def describe(self) -> str:
        seq, digest = self.head
        return (
            f"{self.path} ({self.bytes / MB:.2f} MB, schema {self.revision}): {self.events} "
            f"audit events, chain head seq {seq} {digest} ({self.seconds:.2f} s)"
        )


def backup(url: str, to: Path) -> Summary:
    """Write a consistent, verified backup of the ledger at `url` to `to` (replaced whole)."""
    started = time.perf_counter()
    shown = _shown(url)
    if _is_sqlite(url) and to.resolve() == _sqlite_path(url).resolve():
        raise BackupError(f"{to} is the ledger itself: back it up to another file")
    with _partial(to, ".partial") as partial:
        if _is_sqlite(url):
            _copy_sqlite_file(_sqlite_path(url), partial)
        else:
            _copy_snapshot(url, partial)
        summary = _checked(partial, shown)
        _replace(partial, to)
    return replace(summary, path=to, seconds=time.perf_counter() - started)


def verify(path: Path) -> Summary:
    """What the backup at `path` holds, checked as a restore would use it (it is only read)."""
    started = time.perf_counter()
    return replace(_checked(path, path), seconds=time.perf_counter() - started)


def restore(path: Path, url: str, force: bool = False) -> Summary:
    """Restore the backup at `path` into the ledger at `url` and migrate it to this code's
    schema. A ledger that holds anything is refused unless `force`."""
    started = time.perf_counter()
    shown = _shown(url)
    if _is_sqlite(url):
        target = _sqlite_path(url)
        with _partial(target, ".restoring") as staged:
            summary = _checked(path, path, staged)
            if target.exists():
                if not force:
                    _refuse_if_held(f"sqlite:///{target}", shown)
                shutil.copymode(target, staged)
            # A stale write-ahead log would be replayed onto the restored file: it goes first.
            for suffix in ("-wal", "-shm"):
                Path(f"{target}{suffix}").unlink(missing_ok=True)
            _replace(staged, target)
    else:
        with tempfile.TemporaryDirectory(prefix="candlestack-restore-") as scratch:
            staged = Path(scratch) / "ledger.sqlite"
            summary = _checked(path, path, staged)
            _load_postgres(staged, url, shown, force)
    ledger = Ledger(url)
    try:
        ledger.migrate()
        problems = ledger.verify_audit_chain()
        if problems:
            raise BrokenChainError(f"restored ledger {shown}", problems)
        head, events = ledger.audit_head(), ledger.audit_count()
    finally:
        ledger.close()
    seconds = time.perf_counter() - started
    return replace(summary, events=events, head=head, seconds=seconds)


# --- checking a backup ----------------------------------------------------------------------


def _checked(path: Path, what: object, staged: Path | None = None) -> Summary:
    """Copy the backup at `path` to `staged` (a scratch file when None), migrate the copy to
    this code's head and verify it; BrokenChainError naming `what` when its chain breaks."""
    if not path.is_file():
        raise BackupError(f"no ledger backup at {path}: not a file")
    if staged is None:
        with tempfile.TemporaryDirectory(prefix="candlestack-verify-") as scratch:
            return _checked(path, what, Path(scratch) / "ledger.sqlite")
    try:
        with (
            closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as source,
            closing(sqlite3.connect(staged)) as copy,
        ):
            source.backup(copy)
            damage = [row[0] for row in copy.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a ledger backup (a SQLite file): {exc}") from exc
    if damage != ["ok"]:
        raise BackupError(f"{path} is damaged: {'; '.join(damage[:3])}")
    ledger = Ledger(f"sqlite:///{staged}")
    try:
        revision = ledger.schema_revision()
        if revision is None:
            raise BackupError(f"{path} is not a ledger backup: it has no {VERSION_TABLE} table")
        ledger.migrate()  # an older backup is checked (and restored) at this code's schema
        problems = ledger.verify_audit_chain()
        if problems:
            raise BrokenChainError(what, problems)
        head, events = ledger.audit_head(), ledger.audit_count()
    except BackupError:
        raise
    except LedgerError as exc:  # it names the scratch copy: name the backup instead
        raise BackupError(str(exc).replace(ledger.url, str(path))) from exc
    finally:
        ledger.close()
    return Summary(path, path.stat().st_size, revision, events, head)


# --- copying --------------------------------------------------------------------------------


def _copy_sqlite_file(source: Path, to: Path) -> None:
    if not source.is_file():
        raise BackupError(f"no ledger at {source}: not a file")
    try:
        # mode=rw: never create the ledger file when it is missing.
        with (
            closing(sqlite3.connect(f"{source.resolve().as_uri()}?mode=rw", uri=True)) as db,
            closing(sqlite3.connect(to)) as copy,
        ):
            db.backup(copy)  # one step: one read snapshot; WAL writers do not wait for it
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"cannot back up the ledger {source}: {exc}") from exc


def _copy_snapshot(url: str, to: Path) -> None:
    """Every ledger table of the PostgreSQL ledger at `url`, read in one snapshot, into a
    SQLite file made by the migrations at the ledger's revision."""
    shown = _shown(url)
    with _naming(shown), _engine(url) as source, _engine(f"sqlite:///{to}") as copy:
        with source.connect() as db, copy.begin() as out:
            db = db.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with db.begin():
                revision = current_revision(db)
                if revision is None:
                    raise BackupError(f"no ledger at {shown}: it has no {VERSION_TABLE} table")
                if not known_revision(revision):
                    raise BackupError(
                        f"ledger {shown} is at schema revision {revision}, newer than this "
                        "code's: back it up with the candlestack that wrote it"
                    )
                command.upgrade(alembic_config(out), revision)
                _copy_rows(db, out)
        with copy.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=DELETE")


def _load_postgres(staged: Path, url: str, shown: str, force: bool) -> None:
    """Replace the PostgreSQL ledger's tables by the staged ledger's, in one transaction."""
    with (
        _naming(shown),
        _engine(f"sqlite:///{staged}") as source,
        _engine(url) as target,
        source.connect() as db,
        target.begin() as out,
    ):
        out.execute(select(func.pg_advisory_xact_lock(PG_WRITE_LOCK)))  # writers wait
        if not force:
            _refuse_held(_holdings(out), shown)
        Base.metadata.drop_all(out)
        out.exec_driver_sql(f"DROP TABLE IF EXISTS {VERSION_TABLE}")
        command.upgrade(alembic_config(out), "head")
        _copy_rows(db, out)
        for table in Base.metadata.sorted_tables:
            for column in table.primary_key.columns:
                if isinstance(column.type, Integer):  # serial ids go on after the rows
                    sequence = func.pg_get_serial_sequence(table.name, column.name)
                    out.execute(select(func.setval(sequence, func.max(column))))


def _copy_rows(source: Connection, target: Connection) -> None:
    """Copy every ledger table's rows, in foreign-key order, through the models' types (UTC
    timestamps on both backends); the tables and columns are those the target's revision
    has."""
    target.execute(delete(ChainHeadRow))  # the migrations seeded the genesis head
    tables = set(inspect(target).get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:  # added by a later revision than the target's
            continue
        present = {column["name"] for column in inspect(target).get_columns(table.name)}
        columns = [column for column in table.columns if column.name in present]
        rows = source.execution_options(yield_per=BATCH_ROWS).execute(select(*columns))
        if target.dialect.name == "postgresql":
            # COPY: several times faster than batched INSERTs, in the same transaction.
            names = sql.SQL(", ").join(sql.Identifier(column.name) for column in columns)
            statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table.name), names)
            with target.connection.driver_connection.cursor().copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            for part in rows.partitions():
                target.execute(insert(table), [dict(row._mapping) for row in part])


# --- the target -----------------------------------------------------------------------------


def _holdings(conn: Connection) -> dict[str, int]:
    """Rows per ledger table that has any (the chain head only once it has moved)."""
    present = set(inspect(conn).get_table_names())
    held = {}
    for table in Base.metadata.sorted_tables:
        if table.name not in present:
            continue
        query = select(func.count()).select_from(table)
        if table.name == ChainHeadRow.__tablename__:
            query = query.where(ChainHeadRow.seq > 0)
        if rows := conn.execute(query).scalar_one():
            held[table.name] = rows
    return held


def _refuse_held(held: dict[str, int], shown: str) -> None:
    if held:
        rows = ", ".join(f"{table} {n}" for table, n in held.items())
        raise BackupError(
            f"ledger {shown} is not empty (rows: {rows}): restoring would replace it; "
            "pass --force to overwrite it"
        )


def _refuse_if_held(url: str, shown: str) -> None:
    try:
        with _naming(shown), _engine(url) as engine, engine.connect() as conn:
            held = _holdings(conn)
    except BackupError as exc:
        raise BackupError(
            f"cannot tell whether {shown} holds a ledger ({exc}): pass --force to overwrite it"
        ) from exc
    _refuse_held(held, shown)


# --- plumbing -------------------------------------------------------------------------------


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"ledger {url} is in memory: there is no file to back up or restore")
    return Path(database)


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _naming(shown: str) -> Iterator[None]:
    """Database errors (a server down, a file unreadable) as errors naming the ledger."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise BackupError(f"ledger {shown}: {getattr(exc, 'orig', None) or exc}") from exc


@contextmanager
def _partial(target: Path, suffix: str) -> Iterator[Path]:
    """A scratch file name beside `target` (so the rename onto it is atomic); what is left of
    it afterwards (it was not renamed, or SQLite's journals) is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    name = f"{target.parent / f'.{target.name}.{uuid.uuid4().hex}'}{suffix}"
    try:
        yield Path(name)
    finally:
        for leftover in ("", "-journal", "-wal", "-shm"):
            Path(f"{name}{leftover}").unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(source: Path, target: Path) -> None:
    """Rename `source` over `target`, durably: its bytes, then the folder's new entry."""
    _fsync(source)
    os.replace(source, target)
    _fsync(target.parent)


# --- the command ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m candlestack.ledger_backup",
        description="Back up, verify and restore the dry-run ledger.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    url_help = "the ledger's SQLAlchemy URL (default: CANDLESTACK_LEDGER_URL)"
    taking = actions.add_parser("backup", help="write a verified online backup of the ledger")
    taking.add_argument("--to", type=Path, required=True, help="the backup file (replaced)")
    taking.add_argument("--url", help=url_help)
    checking = actions.add_parser("verify", help="check a backup: integrity and audit chain")
    checking.add_argument("file", type=Path)
    putting = actions.add_parser("restore", help="restore a backup into the ledger")
    putting.add_argument("--from", dest="file", type=Path, required=True, help="the backup file")
    putting.add_argument("--url", help=url_help)
    putting.add_argument(
        "--force", action="store_true", help="overwrite a ledger that is not empty"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "verify":
            print(f"verified {verify(args.file).describe()}")
        else:
            url = args.url or Settings.from_env().ledger_url
            if args.action == "backup":
                print(f"backed up {_shown(url)} to {backup(url, args.to).describe()}")
            else:
                summary = restore(args.file, url, args.force)
                print(f"restored into {_shown(url)} from {summary.describe()}")
    except BrokenChainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except CandlestackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
