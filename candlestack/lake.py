"""The Parquet lake: hive-partitioned files, atomic and idempotent writes.

One file per exchange/timeframe/symbol/UTC day, in a local folder or under an
s3://bucket/prefix (the same layout and code: paths are pathlib.Path locally and
UPath on the object store). Each candle file carries its partition report and gap
table in the Parquet footer (key-value metadata), so the figures can never disagree
with the data they describe: both land in one atomic write (a rename, or one PUT).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.arrow import ArrowFSWrapper
from upath import UPath

from candlestack.errors import ConfigError, LakeError
from candlestack.schema import GAPS, PARTITION_REPORT, TS

FILE_NAME = "data.parquet"
REPORT_KEY = b"candlestack.report"
GAPS_KEY = b"candlestack.gaps"
STALE_TEMP_SECONDS = 3600
S3_SCHEME = "s3://"

# A file of the lake: a local file, or an object under s3:// (UPath on S3Store).
LakePath = Path | UPath


@dataclass(frozen=True)
class S3Settings:
    """How the s3:// lake is reached, from the standard AWS environment. Without keys the
    AWS default chain applies (profile, IAM role)."""

    endpoint: str | None
    region: str | None
    access_key: str | None
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)

    @classmethod
    def from_env(cls) -> S3Settings:
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") and v}
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if bool(key) != bool(secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key else "AWS_ACCESS_KEY_ID"
            raise ConfigError(
                f"{missing} is not set but its pair is: set both for an s3:// lake, or "
                "neither to use the AWS default credential chain"
            )
        return cls(
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key=key,
            secret_key=secret,
            session_token=env.get("AWS_SESSION_TOKEN"),
        )


class S3Store(ArrowFSWrapper):
    """pyarrow's S3 client behind fsspec's interface (for UPath and DuckDB), and the same
    endpoint and credentials spelled for polars' own reader."""

    cachable = False  # one per settings and bucket, kept by s3_store

    def __init__(self, settings: S3Settings) -> None:
        super().__init__(
            pafs.S3FileSystem(
                access_key=settings.access_key,
                secret_key=settings.secret_key,
                session_token=settings.session_token,
                region=settings.region,
                endpoint_override=settings.endpoint,
                # Objects under the part size (10 MB) go as one PutObject, not as a
                # three-request multipart upload.
                allow_delayed_open=True,
            )
        )
        options = {
            "aws_endpoint_url": settings.endpoint,
            "aws_region": settings.region,
            "aws_access_key_id": settings.access_key,
            "aws_secret_access_key": settings.secret_key,
            "aws_session_token": settings.session_token,
        }
        self.polars_options = {k: v for k, v in options.items() if v}

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        """One recursive listing (a request per 1,000 keys) instead of fsspec's one per
        folder: globbing a year of day files stays a few requests."""
        path = self._strip_protocol(path).rstrip("/")
        selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        entries = {}
        for info in self.fs.get_file_info(selector):
            depth = info.path[len(path) :].count("/")
            is_dir = info.type == pafs.FileType.Directory
            if (maxdepth is None or depth <= maxdepth) and (withdirs or not is_dir):
                entries[info.path] = self._make_entry(info)
        names = sorted(entries)
        return {name: entries[name] for name in names} if detail else names


@functools.cache
def s3_store(settings: S3Settings, bucket: str) -> S3Store:
    """The store of a bucket, checked once per process: a wrong bucket or endpoint fails
    here, named, rather than as an empty lake."""
    store = S3Store(settings)
    where = settings.endpoint or "AWS"
    try:
        info = store.fs.get_file_info(bucket)
    except OSError as exc:
        raise LakeError(
            f"cannot reach the lake's bucket {bucket!r} at {where} (check AWS_ENDPOINT_URL and "
            f"the credentials, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {exc}"
        ) from exc
    if info.type == pafs.FileType.NotFound:
        raise LakeError(f"the lake's bucket {bucket!r} does not exist at {where}: create it")
    return store


def s3_root(url: str) -> UPath:
    """The UPath of an s3://bucket/prefix lake, on the store the AWS environment names."""
    root = UPath(url.rstrip("/"))
    bucket = url.removeprefix(S3_SCHEME).split("/")[0]
    # UPath would build s3fs for s3:// (not installed: its aiobotocore pins an older botocore
    # than boto3's); give it pyarrow's client instead. Every path derived from the root
    # (joins, parents, glob results) inherits it.
    root._fs_cached = s3_store(S3Settings.from_env(), bucket)
    return root


def _polars_source(paths: LakePath | Sequence[LakePath]) -> tuple[object, dict | None]:
    """What polars is given: local paths as they are; objects as s3:// URLs with the
    store's settings."""
    if isinstance(paths, Path):
        return paths, None
    if isinstance(paths, UPath):
        return str(paths), paths.fs.polars_options
    options = paths[0].fs.polars_options if paths and isinstance(paths[0], UPath) else None
    return [str(p) for p in paths], options


def scan_parquet(paths: Sequence[LakePath], **kwargs) -> pl.LazyFrame:
    """polars' scan of lake files, local or on the object store."""
    source, options = _polars_source(paths)
    return pl.scan_parquet(source, storage_options=options, **kwargs)


def read_parquet(paths: LakePath | Sequence[LakePath], **kwargs) -> pl.DataFrame:
    """polars' read of one or more lake files, local or on the object store."""
    source, options = _polars_source(paths)
    return pl.read_parquet(source, storage_options=options, **kwargs)


@dataclass(frozen=True)
class WriteResult:
    path: LakePath
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
    for column in schema:
        if pa.types.is_timestamp(column.type) or pa.types.is_integer(column.type):
            encodings[column.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_floating(column.type):
            encodings[column.name] = "BYTE_STREAM_SPLIT"
    return encodings


def _remove_stale_temps(path: Path) -> None:
    """Temp files a crash left behind; young ones may belong to a writer still running."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()


def _write_table(table: pa.Table, sink) -> None:
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=False,
        column_encoding=_encodings(table.schema),
        write_statistics=True,
    )


def _put_object(path: UPath, table: pa.Table) -> int:
    """An object store has no rename, but a single PUT is atomic: readers get the previous
    object or the new one, never part of one (an upload cut short stores nothing). So the
    file is encoded in memory first (a failure there sends nothing) and sent in one request
    straight to its final key: no temp object to leave behind or clean up."""
    sink = pa.BufferOutputStream()
    _write_table(table, sink)
    data = sink.getvalue()
    try:
        # Sent when the stream closes: one PutObject (day files are far under the 10 MB
        # part size); a larger file goes as a multipart upload, atomic on completion too.
        with path.fs.fs.open_output_stream(path.path) as out:
            out.write(data)
    except OSError as exc:
        raise LakeError(f"cannot write {path}: {exc}") from exc
    return data.size


def write_parquet_atomic(path: LakePath, table: pa.Table, key_value: dict[bytes, bytes]) -> int:
    """Write `table` (with `key_value` in its footer) to `path` atomically; returns its size.

    Locally through a temp file in the same folder, fsync, then rename over `path`. A crash
    at any point leaves either the previous file or the new one, never a torn file; readers
    glob *.parquet, so a leftover temp file is invisible to them. On S3, one PUT.
    """
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **key_value})
    if isinstance(path, UPath):
        return _put_object(path, table)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as sink:
            _write_table(table, sink)
            sink.flush()
            os.fsync(sink.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


class Lake:
    """Paths and I/O of one lake root: a local folder, or an s3://bucket/prefix."""

    def __init__(self, root: LakePath | str) -> None:
        text = str(root)
        self.root: LakePath = s3_root(text) if text.startswith(S3_SCHEME) else Path(root)

    @property
    def filesystem(self) -> S3Store | None:
        """The object store's fsspec filesystem (DuckDB needs it registered to read the
        lake); None for a local folder."""
        return self.root.fs if isinstance(self.root, UPath) else None

    @property
    def location(self) -> str:
        """The root as DuckDB and polars address it: an absolute folder, or the s3:// URL."""
        return str(self.root) if isinstance(self.root, UPath) else str(self.root.resolve())

    def candles_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> LakePath:
        return self._partition_path("ohlcv", exchange, timeframe, symbol_key, day)

    def markets_path(self, exchange: str, day: date) -> LakePath:
        return (
            self.root / "markets" / f"exchange={exchange}" / f"date={day.isoformat()}" / FILE_NAME
        )

    def _symbol_folder(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str
    ) -> LakePath:
        return (
            self.root
            / dataset
            / f"exchange={exchange}"
            / f"timeframe={timeframe}"
            / f"symbol={symbol_key}"
        )

    def _partition_path(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str, day: date
    ) -> LakePath:
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return folder / f"date={day.isoformat()}" / FILE_NAME

    def day_files(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str
    ) -> dict[date, LakePath]:
        """Every stored day of one dataset ("ohlcv", "bars", "features"), exchange, timeframe
        and symbol: day -> file, in day order."""
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return {
            date.fromisoformat(path.parent.name.removeprefix("date=")): path
            for path in sorted(folder.glob(f"date=*/{FILE_NAME}"))
        }

    def bars_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> LakePath:
        return self._partition_path("bars", exchange, timeframe, symbol_key, day)

    def features_path(self, exchange: str, timeframe: str, symbol_key: str, day: date) -> LakePath:
        return self._partition_path("features", exchange, timeframe, symbol_key, day)

    def write_partition(
        self,
        path: LakePath,
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

    def read(self, path: LakePath) -> pl.DataFrame | None:
        if not path.exists():
            return None
        try:
            return read_parquet(path)
        except Exception as exc:
            raise LakeError(f"cannot read {path}: {exc}") from exc

    def _footer(self, path: LakePath) -> dict[bytes, bytes]:
        try:
            if isinstance(path, UPath):
                metadata = pq.read_schema(path.path, filesystem=path.fs.fs).metadata or {}
            else:
                metadata = pq.read_schema(path).metadata or {}
        except Exception as exc:
            raise LakeError(f"cannot read the footer of {path}: {exc}") from exc
        return {k: v for k, v in metadata.items() if k in (REPORT_KEY, GAPS_KEY)}

    def read_report(self, path: LakePath) -> tuple[dict, pl.DataFrame] | None:
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
    ) -> Iterator[tuple[str, date, LakePath]]:
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
