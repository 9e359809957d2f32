"""Move a lake from one Parquet file per symbol-day to one per symbol-month, in place:

    python -m candlestack.migrate [LAKE_ROOT]

LAKE_ROOT defaults to the configured lake (CANDLESTACK_LAKE); a local folder only. Run it
with the pipeline stopped. Nothing is fetched again: the rows, report and gap table of
every legacy day file (`ohlcv|bars|features/exchange=X/timeframe=T/symbol=S/
date=YYYY-MM-DD/data.parquet`) go into its month file (`.../month=YYYY-MM/data.parquet`).

Three phases, so a surprise costs nothing:
1. survey: every file under ohlcv/, bars/ and features/ is accounted for and every day
   file is read and checked against its own footer before anything is written; anything
   unexpected refuses the whole migration (LakeError), the lake untouched;
2. convert: one write per month file, each read back at once and checked day by day
   against the day files' content hashes;
3. delete the day files, only once every month has been verified.
A run cut short anywhere resumes: a month file that already holds a day with that day
file's content hash is left as it is, and a second run finds nothing to do.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from candlestack.config import load_settings
from candlestack.errors import CandlestackError, LakeError
from candlestack.lake import (
    FILE_NAME,
    GAP_TABLE,
    GAPS_KEY,
    REPORT_KEY,
    S3_SCHEME,
    DayData,
    Lake,
    StoredMonth,
    content_hash,
    month_of,
)

DATASETS = ("ohlcv", "bars", "features")
# Exact spellings only: date.fromisoformat alone would also take 20210401 or 2021-W13-4.
DAY_NAME = re.compile(r"date=(\d{4}-\d{2}-\d{2})")
MONTH_NAME = re.compile(r"month=(\d{4})-(\d{2})")
# What write_parquet_atomic leaves behind when a write is cut short.
TEMP_NAME = re.compile(rf"\.{re.escape(FILE_NAME)}\..+\.tmp")


@dataclass(frozen=True)
class DayFile:
    """One legacy day file, as the survey found it."""

    path: Path
    day: date
    report: dict  # its footer report without the content hash (write_month adds it back)
    content_hash: str  # from the footer, and checked against the rows
    rows: int
    schema: pl.Schema
    gaps: pl.DataFrame | None


@dataclass(frozen=True)
class MonthPlan:
    """The day files that go into one month file."""

    dataset: str
    exchange: str
    timeframe: str
    symbol: str
    month: date
    days: dict[date, DayFile]
    # Days the month file already holds with the day file's content hash: an earlier run
    # wrote them (or the pipeline did, identically); they are not written again.
    held: frozenset[date]

    @property
    def pending(self) -> dict[date, DayFile]:
        return {d: f for d, f in self.days.items() if d not in self.held}


@dataclass(frozen=True)
class Survey:
    months: list[MonthPlan]
    # date= folders holding no day file (empty, or only temp files of a cut-short write):
    # a run cut short between deleting a day file and its folder leaves one.
    leftovers: list[Path]


@dataclass(frozen=True)
class MigrationResult:
    root: Path
    day_files: dict[str, int]  # dataset -> day files converted (and deleted)
    month_files: dict[str, int]  # dataset -> month files they went into
    already_held: dict[str, int]  # dataset -> days a month file held from an earlier run

    @property
    def converted(self) -> int:
        return sum(self.day_files.values())

    def summary(self) -> str:
        if not self.converted:
            return f"{self.root}: no day files, nothing to migrate"
        lines = [f"{self.root}:"]
        for dataset in DATASETS:
            days, months = self.day_files.get(dataset, 0), self.month_files.get(dataset, 0)
            if not days:
                lines.append(f"  {dataset}: no day files")
                continue
            line = f"  {dataset}: {days} day files converted into {months} month files"
            if self.already_held.get(dataset):
                line += f" ({self.already_held[dataset]} days were already in them)"
            lines.append(line)
        lines.append("verified: every day's content hash unchanged")
        return "\n".join(lines)


def _refuse(path: Path, why: str) -> LakeError:
    return LakeError(f"{path}: {why}")


def _value(folder: Path, key: str) -> str:
    """The value of a `key=value` folder, refusing anything else at that level."""
    if not folder.is_dir():
        raise _refuse(folder, f"expected only {key}=... folders here")
    name, _, value = folder.name.partition("=")
    if name != key or not value:
        raise _refuse(folder, f"unknown folder: expected {key}=...")
    return value


def _is_temp(path: Path) -> bool:
    return path.is_file() and TEMP_NAME.fullmatch(path.name) is not None


def _data_file(folder: Path) -> Path | None:
    """The data file of a date= or month= folder (None when there is none); refuses
    anything in it but that file and temp files."""
    found = None
    for entry in sorted(folder.iterdir()):
        if entry.name == FILE_NAME and entry.is_file():
            found = entry
        elif not _is_temp(entry):
            kind = folder.name.partition("=")[0]
            raise _refuse(entry, f"unexpected: a {kind}= folder holds only {FILE_NAME}")
    return found


def _day_of(folder: Path) -> date:
    match = DAY_NAME.fullmatch(folder.name)
    try:
        if match is None:
            raise ValueError
        return date.fromisoformat(match[1])
    except ValueError:
        raise _refuse(folder, "not a date=YYYY-MM-DD folder (or no such day)") from None


def _month_of_folder(folder: Path) -> date:
    match = MONTH_NAME.fullmatch(folder.name)
    if match is None or not 1 <= int(match[2]) <= 12:
        raise _refuse(folder, "not a month=YYYY-MM folder (or no such month)")
    return date(int(match[1]), int(match[2]), 1)


def _read_day_file(lake: Lake, path: Path, day: date) -> tuple[DayFile, pl.DataFrame]:
    """A day file's rows and footer, refusing one whose footer does not describe its rows:
    its content hash is what the migration proves unchanged, so it must hold now."""
    try:
        footer = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise _refuse(path, f"unreadable Parquet footer ({exc})") from exc
    if REPORT_KEY not in footer:
        raise _refuse(path, f"no {REPORT_KEY.decode()} in its footer")
    try:
        report = json.loads(footer[REPORT_KEY])
    except ValueError as exc:
        raise _refuse(path, f"its {REPORT_KEY.decode()} is not JSON ({exc})") from exc
    if not isinstance(report, dict):
        raise _refuse(path, f"its {REPORT_KEY.decode()} is not a JSON object")
    digest = report.pop("content_hash", None)
    if not isinstance(digest, str):
        raise _refuse(path, "its footer report has no content_hash")
    # A month file's footer keys each day's report by "date": one here would clash.
    if "date" in report:
        raise _refuse(path, "its footer report has a 'date' key, which month files reserve")
    gaps = None
    if GAPS_KEY in footer:
        try:
            gaps = pl.read_json(footer[GAPS_KEY], schema=GAP_TABLE)
        except Exception as exc:
            raise _refuse(path, f"its {GAPS_KEY.decode()} is not a gap table ({exc})") from exc
        # Month files tell each day's gaps apart by the day of gap_start.
        starts = gaps["gap_start"]
        if starts.null_count() or not (starts.dt.date() == day).all():
            raise _refuse(path, f"its gap table has gaps starting outside {day}")
    try:
        frame = lake.read(path)
    except LakeError as exc:
        raise _refuse(path, f"unreadable ({exc})") from exc
    ts = frame.schema.get("ts")
    if not isinstance(ts, pl.Datetime) or ts.time_zone != "UTC":
        raise _refuse(path, f"no UTC 'ts' column (found {ts})")
    # A month file finds a day's rows by the UTC day of ts, in ts order.
    if frame["ts"].null_count() or not (frame["ts"].dt.date() == day).all():
        raise _refuse(path, f"holds rows (or null ts) outside {day}")
    if not frame["ts"].is_sorted():
        raise _refuse(path, "its rows are not in ts order")
    actual = content_hash(frame)
    if actual != digest:
        raise _refuse(path, f"its rows hash to {actual}, its footer says {digest}")
    day_file = DayFile(path, day, report, digest, frame.height, frame.schema, gaps)
    return day_file, frame


def _plan_month(
    lake: Lake, key: tuple[str, str, str, str], month: date, days: dict[date, DayFile]
) -> MonthPlan:
    """What one month file gets, refusing what write_month could not merge as it is."""
    first = days[min(days)]
    for day_file in days.values():
        if day_file.schema != first.schema:
            raise _refuse(
                day_file.path,
                f"its columns differ from {first.path}'s; one month file holds one schema "
                "(rebuild those days first)",
            )
    stored = lake.read_month(*key, month)
    held = set()
    if stored is not None:
        if stored.frame.schema != first.schema:
            raise _refuse(first.path, f"its columns differ from the month file {stored.path}'s")
        for day, day_file in days.items():
            if day not in stored.reports:
                continue
            stored_hash = stored.reports[day].get("content_hash")
            # Two versions of a day and nothing says which is right: a person decides.
            if stored_hash != day_file.content_hash:
                raise _refuse(
                    day_file.path,
                    f"the month file {stored.path} already holds {day} with content hash "
                    f"{stored_hash}, this day file has {day_file.content_hash}: remove the "
                    "stale one",
                )
            held.add(day)
    return MonthPlan(*key, month, days, frozenset(held))


def survey(root: Path | str) -> Survey:
    """Every legacy day file of the lake at `root`, grouped by month file, with nothing
    written; LakeError naming the path at fault if anything is not understood."""
    root = _local_root(root)
    try:
        return _survey(root)
    except LakeError as exc:
        raise LakeError(f"cannot migrate: {exc}; nothing was changed") from exc


def _survey(root: Path) -> Survey:
    lake = Lake(root)
    by_month: dict[tuple[tuple[str, str, str, str], date], dict[date, DayFile]] = {}
    leftovers: list[Path] = []
    for dataset in DATASETS:
        base = root / dataset
        if not base.exists():
            continue
        if not base.is_dir():
            raise _refuse(base, "not a folder")
        for exchange_dir in sorted(base.iterdir()):
            exchange = _value(exchange_dir, "exchange")
            for timeframe_dir in sorted(exchange_dir.iterdir()):
                timeframe = _value(timeframe_dir, "timeframe")
                for symbol_dir in sorted(timeframe_dir.iterdir()):
                    symbol = _value(symbol_dir, "symbol")
                    key = (dataset, exchange, timeframe, symbol)
                    for folder in sorted(symbol_dir.iterdir()):
                        if not folder.is_dir():
                            raise _refuse(folder, "unexpected file: expected date= or month=")
                        if folder.name.startswith("month="):
                            _month_of_folder(folder)
                            _data_file(folder)
                            continue
                        if not folder.name.startswith("date="):
                            raise _refuse(folder, "unknown folder: expected date= or month=")
                        day = _day_of(folder)
                        path = _data_file(folder)
                        if path is None:
                            leftovers.append(folder)
                            continue
                        day_file, _ = _read_day_file(lake, path, day)
                        by_month.setdefault((key, month_of(day)), {})[day] = day_file
    months = [_plan_month(lake, key, month, days) for (key, month), days in by_month.items()]
    return Survey(months, leftovers)


def _verify(plan: MonthPlan, stored: StoredMonth | None) -> None:
    """Each day as the month file holds it is the day file's, bit for bit."""
    for day, day_file in plan.days.items():
        if stored is None:
            raise LakeError(f"{day_file.path}: its month file was not written; day files kept")
        rows = stored.day(day)
        actual = content_hash(rows)
        reported = stored.reports.get(day, {}).get("content_hash")
        if actual != day_file.content_hash or reported != day_file.content_hash:
            raise LakeError(
                f"{day_file.path}: content hash {day_file.content_hash}, but {stored.path} holds "
                f"{day} as {actual} (its report says {reported}); day files kept"
            )
        if rows.height != day_file.rows:
            raise LakeError(
                f"{day_file.path}: {day_file.rows} rows, but {stored.path} holds {rows.height} "
                f"for {day}; day files kept"
            )
        if day in plan.held:
            continue  # stored before this run: its report may be the pipeline's, not ours
        report = {k: v for k, v in stored.reports[day].items() if k != "content_hash"}
        if report != day_file.report:
            raise LakeError(f"{day_file.path}: {stored.path} holds another report for {day}")
        empty = pl.DataFrame(schema=GAP_TABLE)
        kept = stored.gaps if stored.gaps is not None else empty
        kept = kept.filter(pl.col("gap_start").dt.date() == day).sort("gap_start")
        expected = (day_file.gaps if day_file.gaps is not None else empty).sort("gap_start")
        if not kept.equals(expected):
            raise LakeError(f"{day_file.path}: {stored.path} holds other gaps for {day}")


def _convert(lake: Lake, plan: MonthPlan) -> None:
    pending = plan.pending
    key = (plan.dataset, plan.exchange, plan.timeframe, plan.symbol)
    if pending:
        days = {}
        for day, day_file in pending.items():
            try:
                # Read again rather than held since the survey: a lake's rows need not fit
                # in memory. The same checks prove the file unchanged since.
                _, frame = _read_day_file(lake, day_file.path, day)
            except LakeError as exc:
                raise LakeError(
                    f"{exc} (changed since the survey: is a writer running?); day files kept"
                ) from exc
            days[day] = DayData(frame, day_file.report, day_file.gaps)
        # All the month's days at once: one write of the month file, not one per day.
        lake.write_month(*key, plan.month, days)
    _verify(plan, lake.read_month(*key, plan.month))


def _remove_day_folder(folder: Path) -> None:
    # Temp files beside a day file are parts of a legacy write cut short: nothing reads
    # them, and they would keep the date= folder alive.
    for entry in folder.iterdir():
        if _is_temp(entry):
            entry.unlink(missing_ok=True)
    folder.rmdir()


def _local_root(root: Path | str) -> Path:
    if str(root).startswith(S3_SCHEME):
        raise LakeError(f"cannot migrate {root}: only a local lake folder can be migrated")
    root = Path(root)
    if not root.exists():
        raise LakeError(f"cannot migrate {root}: no such folder")
    if not root.is_dir():
        raise LakeError(f"cannot migrate {root}: not a folder")
    return root


def migrate(root: Path | str) -> MigrationResult:
    """Convert every legacy day file of the local lake at `root` into month files, verify
    them and delete the day files. LakeError if the lake is not understood (nothing
    changed) or a month file does not hold a day exactly (the day files kept)."""
    found = survey(root)
    lake = Lake(_local_root(root))
    for plan in found.months:
        _convert(lake, plan)
    # Only now that every month holds its days exactly do the day files go.
    try:
        for plan in found.months:
            for day_file in plan.days.values():
                day_file.path.unlink()
                _remove_day_folder(day_file.path.parent)
        for folder in found.leftovers:
            _remove_day_folder(folder)
    except OSError as exc:
        raise LakeError(
            f"every month is verified, but removing a day file failed: {exc}; run the "
            "migration again to finish"
        ) from exc
    day_files, month_files, held = Counter(), Counter(), Counter()
    for plan in found.months:
        day_files[plan.dataset] += len(plan.days)
        month_files[plan.dataset] += 1
        held[plan.dataset] += len(plan.held)
    return MigrationResult(lake.root, dict(day_files), dict(month_files), dict(held))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m candlestack.migrate",
        description="Convert a lake's day files into month files, verified, in place.",
    )
    parser.add_argument(
        "root", nargs="?", help="the lake folder (default: CANDLESTACK_LAKE, or data/lake)"
    )
    args = parser.parse_args(argv)
    try:
        root = args.root if args.root is not None else load_settings().lake
        print(migrate(root).summary())
    except CandlestackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
