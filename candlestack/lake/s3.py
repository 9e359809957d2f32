"""The lake on an object store: pyarrow's S3 client behind fsspec's interface (for UPath
and DuckDB), configured from the standard AWS environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
from fsspec.implementations.arrow import ArrowFSWrapper
from upath import UPath

from candlestack.errors import ConfigError, LakeError
from candlestack.lake.files import LakePath

S3_SCHEME = "s3://"


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
