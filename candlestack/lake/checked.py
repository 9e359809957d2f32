"""Reading lake files as written or not at all: every read checks the file, and a damaged
one is moved aside (quarantined), never deleted, so its partition reads as not stored."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime

import polars as pl

from candlestack.errors import DamagedFileError, LakeError
from candlestack.lake.files import (
    CHECKSUM_KEY,
    FOOTER_KEYS,
    LakePath,
    StoredMonth,
    decode,
    file_identity,
    hash_mismatch,
    mismatched_days,
    month_footer_of,
    move_file,
    read_bytes,
    read_footer,
)
from candlestack.lake.layout import FILES, LakeLayout

QUARANTINE_FOLDER = "_quarantine"

log = logging.getLogger("candlestack.lake")


class CheckedLake(LakeLayout):
    """A lake whose reads check what they read, and move damaged files aside."""

    def _month_footer(
        self, path: LakePath
    ) -> tuple[dict[date, dict], pl.DataFrame | None, pl.DataFrame | None] | None:
        """A month file's reports and gaps from its footer alone (cheap: the end of the
        file); None when not stored or its footer is damaged (then moved aside)."""
        return self._healed(path, self._load_footer)

    @staticmethod
    def _load_footer(
        path: LakePath,
    ) -> tuple[dict[date, dict], pl.DataFrame | None, pl.DataFrame | None] | None:
        footer = read_footer(path)
        return None if footer is None else month_footer_of(path, *footer)

    @staticmethod
    def _load_month(
        path: LakePath, columns: Sequence[str] | None = None, rehash: bool = False
    ) -> StoredMonth | None:
        """A month file decoded whole (or its `columns`); raises DamagedFileError."""
        got = read_bytes(path)
        if got is None:
            return None
        frame, key_value = decode(path, got, columns)
        reports, gaps, revisions = month_footer_of(path, key_value, got.identity)
        if columns is None and (rehash or CHECKSUM_KEY not in key_value):
            # Written before page checksums: only its rows' hashes can tell they are intact.
            damaged = mismatched_days(frame, reports)
            if damaged:
                raise DamagedFileError(path, hash_mismatch(damaged), got.identity)
        footer = {k: v for k, v in key_value.items() if k in FOOTER_KEYS}
        return StoredMonth(path, frame, reports, gaps, revisions, footer)

    def _healed(self, path: LakePath, load, *args):
        """load(path, *args), or None when the file is damaged: it is moved aside, so its
        partition reads as not stored and is rebuilt by its next materialization."""
        try:
            return load(path, *args)
        except DamagedFileError as damage:
            self.quarantine(damage)
            return None

    def quarantine(self, damage: DamagedFileError) -> LakePath | None:
        """Move a damaged file aside, never deleting it, to
        `{root}/_quarantine/<its path under the root>.<UTC time>` (no glob of the lake sees
        it there), logging its path and why at ERROR. Returns where it went; None when the
        file is no longer the one judged (rewritten or moved meanwhile): it is left alone."""
        path = damage.path
        relative = str(path)[len(str(self.root)) :].lstrip("/")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.root / QUARANTINE_FOLDER / f"{relative}.{stamp}"
        try:
            if damage.identity is not None and file_identity(path) != damage.identity:
                log.warning("%s changed since it was found damaged: left in place", path)
                return None
            move_file(path, target)
        except FileNotFoundError:
            return None  # another reader or writer moved or replaced it meanwhile
        except OSError as exc:
            raise LakeError(f"cannot look at the damaged file {path}: {exc}") from exc
        log.error(
            "damaged lake file %s moved to %s (the next materialization of its partition "
            "rebuilds it): %s",
            path,
            target,
            damage.reason,
        )
        return target

    def quarantine_damaged(self, dataset: str, decode: bool = True) -> None:
        """Read every month file of a dataset as `read_month` does (or, without `decode`,
        only its footer), moving the damaged ones aside."""
        for path in sorted(self.root.glob(FILES[dataset])):
            self._healed(path, self._load_month if decode else self._load_footer)

    def check_file(self, path: LakePath) -> int:
        """Check a lake file whole: every page decoded, its checksum checked, and in a month
        file the footer's report parsed and every day's rows re-hashed against its
        content_hash. Raises DamagedFileError (or LakeError: unreadable, not ours); returns
        the bytes read."""
        got = read_bytes(path)
        if got is None:
            raise LakeError(f"{path} vanished while being checked")
        frame, key_value = decode(path, got)
        if path.parent.name.startswith("month="):
            reports, *_ = month_footer_of(path, key_value, got.identity)
            damaged = mismatched_days(frame, reports)
            if damaged:
                raise DamagedFileError(path, hash_mismatch(damaged), got.identity)
        return got.size

    def read(self, path: LakePath) -> pl.DataFrame | None:
        """Every row of a lake file, checked as it is decoded; None when not stored. A
        damaged file raises DamagedFileError naming it, and is left where it is (the month
        reads move it aside)."""
        got = read_bytes(path)
        return None if got is None else decode(path, got)[0]
