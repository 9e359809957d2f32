"""The lake on an object store: the same code on s3://bucket/prefix as on a local folder,
against moto's S3 server on loopback (real HTTP, real pyarrow, polars and DuckDB clients)."""

from __future__ import annotations

import socket
import socketserver
import threading
from datetime import date, timedelta
from pathlib import Path

import boto3
import dagster as dg
import polars as pl
import pytest
from moto.server import ThreadedMotoServer
from polars.testing import assert_frame_equal

import candlestack.lake as lake_module
import candlestack.lake.files as lake_files
from assets.market_data import candles_1m, catalog
from candlestack.backtest_store import run_backtest, run_sweep
from candlestack.bars import BarBuilder
from candlestack.catalog import build_catalog, connect
from candlestack.checks import sanity_failures
from candlestack.errors import ConfigError, LakeError
from candlestack.feature_store import FeatureBuilder, load_feature_set
from candlestack.ingest import Ingestor
from candlestack.lake import DayData, Lake
from candlestack.sources.replay import ReplaySource
from candlestack.sources.synthetic import SyntheticSource
from candlestack.strategies.config import StrategyConfig
from candlestack.verify import verify
from resources import LakeResource, ReplaySourceResource
from tests.conftest import EXCHANGE_INFO, REPLAY_FILES, flip_data_bytes

SYMBOLS = ("BTC/USDT", "ETH/USDT")
DAYS = [date(2024, 1, 1) + timedelta(days=i) for i in range(3)]
MONTH = date(2024, 1, 1)  # the one month file each symbol's DAYS are stored in
NOW_S = 1_710_000_000  # March 2024: every ingested day is closed
BUCKET = "candles"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret"}
STRATEGY = StrategyConfig.model_validate(
    {
        "name": "btc_cross",
        "strategy": "ma_cross",
        "symbol": "BTC/USDT",
        "timeframe": "15m",
        "order_value": 1000,
        "capital": 10000,
        "params": {"fast": 3, "slow": 12, "average": "ema"},
    }
)


def aws_env(mp: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS environment pointing at `endpoint`, and nothing from the caller's."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("AWS_REGION", "us-east-1")
    for name, value in CREDENTIALS.items():
        mp.setenv(name, value)


@pytest.fixture(scope="module")
def endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def env(endpoint, monkeypatch):
    aws_env(monkeypatch, endpoint)


def build_everything(lake: Lake) -> dict:
    """Ingest, bars, features, market rules and a backtest: the pipeline's pure steps."""
    source = SyntheticSource(seed=7, symbols=SYMBOLS, clock=lambda: NOW_S)
    ingestor = Ingestor(source, lake)
    candles = {s: ingestor.ingest(s, DAYS) for s in SYMBOLS}
    bars = BarBuilder(lake, "synthetic", imputed_max_share=0.01)
    built = [o for tf in ("15m", "1h", "4h") for o in bars.build(tf, "BTC-USDT", MONTH)]
    features = FeatureBuilder(lake, "synthetic", load_feature_set(None), 0.01)
    computed = features.build("15m", "BTC-USDT", MONTH)
    for day in DAYS:
        lake_module.write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    return {
        "candles": candles,
        "bars": built,
        "reconciled": [o.mismatch for o in built],
        "features": computed,
        "backtest": run_backtest(lake, "synthetic", STRATEGY),
        "sweep": run_sweep(lake, "synthetic", STRATEGY, {"fast": [3, 5]}, "sharpe", "fast"),
    }


@pytest.fixture(scope="module")
def lakes(endpoint, s3, tmp_path_factory):
    """The same work done once on a local folder and once on s3://candles/lake."""
    s3.create_bucket(Bucket=BUCKET)
    with pytest.MonkeyPatch.context() as mp:
        aws_env(mp, endpoint)
        local = Lake(tmp_path_factory.mktemp("local") / "lake")
        remote = Lake(f"s3://{BUCKET}/lake")
        yield {"local": (local, build_everything(local)), "s3": (remote, build_everything(remote))}


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# --- the same data and layout ----------------------------------------------------------


def test_the_lake_root_is_the_s3_url(lakes):
    remote, _ = lakes["s3"]
    assert remote.location == f"s3://{BUCKET}/lake"
    assert str(remote.month_path("ohlcv", "synthetic", "1m", "BTC-USDT", DAYS[1])) == (
        f"s3://{BUCKET}/lake/ohlcv/exchange=synthetic/timeframe=1m/symbol=BTC-USDT/"
        "month=2024-01/data.parquet"
    )


def test_ingested_days_read_back_equal_to_the_local_lake(lakes, env):
    (local, done_local), (remote, done_s3) = lakes["local"], lakes["s3"]
    for symbol in SYMBOLS:
        assert [o.day for o in done_s3["candles"][symbol]] == DAYS
        for a, b in zip(done_local["candles"][symbol], done_s3["candles"][symbol], strict=True):
            assert b.report == a.report
            assert b.report["rows"] == 1440
    months_read_back = []
    for key in ("BTC-USDT", "ETH-USDT"):
        local_months = local.month_files("ohlcv", "synthetic", "1m", key)
        remote_months = remote.month_files("ohlcv", "synthetic", "1m", key)
        assert list(remote_months) == list(local_months) == [MONTH]
        assert_frame_equal(remote.read(remote_months[MONTH]), local.read(local_months[MONTH]))
        for day in DAYS:
            report, gaps = local.read_day_report("synthetic", key, day)
            report_s3, gaps_s3 = remote.read_day_report("synthetic", key, day)
            assert report_s3 == report
            assert_frame_equal(gaps_s3, gaps)
        assert list(remote.day_reports("ohlcv", "synthetic", "1m", key)) == DAYS
        months_read_back.append((key, MONTH, remote_months[MONTH]))
    assert_frame_equal(remote.reports("synthetic"), local.reports("synthetic"))
    assert remote.reports("synthetic").height == len(SYMBOLS) * len(DAYS)
    assert sanity_failures(months_read_back).is_empty()


def test_the_bucket_holds_the_local_files_and_nothing_else(lakes, s3):
    """Same relative paths as the local folder, and no temp objects: writes go straight to
    their final key."""
    local, _ = lakes["local"]
    on_disk = sorted(str(p.relative_to(local.root)) for p in local.root.rglob("*") if p.is_file())
    assert keys(s3, BUCKET, "lake/") == [f"lake/{p}" for p in on_disk]


def test_bars_features_and_backtest_equal_the_local_ones(lakes, env):
    (_, done_local), (remote, done_s3) = lakes["local"], lakes["s3"]
    assert [o.content_hash for o in done_s3["bars"]] == [o.content_hash for o in done_local["bars"]]
    assert [(o.timeframe, o.day) for o in done_s3["bars"]] == [
        (tf, day) for tf in ("15m", "1h", "4h") for day in DAYS
    ]
    assert all(o.bars > 0 and o.skipped is None for o in done_s3["bars"])
    assert done_s3["reconciled"] == [None] * len(done_s3["bars"])
    assert [o.day for o in done_s3["features"]] == DAYS
    assert [o.content_hash for o in done_s3["features"]] == [
        o.content_hash for o in done_local["features"]
    ]
    local_run, s3_run = done_local["backtest"], done_s3["backtest"]
    assert s3_run.run_id == local_run.run_id
    assert s3_run.trades_hash == local_run.trades_hash
    # (NaN metrics, like the CAGR of a 3-day window, compare equal as frames)
    assert_frame_equal(
        pl.DataFrame([s3_run.result.metrics]), pl.DataFrame([local_run.result.metrics])
    )
    assert_frame_equal(s3_run.result.trades, local_run.result.trades)
    assert s3_run.result.metrics["trades"] > 0
    assert sorted(p.name for p in s3_run.folder.iterdir()) == [
        "equity.parquet",
        "metrics.parquet",
        "rejections.parquet",
        "trades.parquet",
    ]
    again = run_backtest(remote, "synthetic", STRATEGY)
    assert (again.run_id, again.written) == (s3_run.run_id, False)
    local_sweep, s3_sweep = done_local["sweep"], done_s3["sweep"]
    assert s3_sweep.written and s3_sweep.run_id == local_sweep.run_id
    assert_frame_equal(s3_sweep.results, local_sweep.results)
    assert s3_sweep.path.exists()


def test_catalog_views_count_the_same_rows_as_local(lakes, env, tmp_path):
    (local, _), (remote, _) = lakes["local"], lakes["s3"]
    local_counts = build_catalog(local, tmp_path / "local.duckdb")
    s3_counts = build_catalog(remote, tmp_path / "s3.duckdb")
    assert s3_counts == local_counts
    assert s3_counts["ohlcv"] == len(SYMBOLS) * len(DAYS) * 1440
    assert s3_counts["bars"] > 0 and s3_counts["features"] > 0 and s3_counts["trades"] > 0
    assert s3_counts["partitions"] == len(SYMBOLS) * len(DAYS)
    query = (
        "SELECT symbol, timeframe, count(*) n, round(sum(close), 6) s FROM bars "
        "GROUP BY ALL ORDER BY ALL"
    )
    # A reader of the catalog file opens it with the lake's store registered.
    with connect(tmp_path / "s3.duckdb", f"s3://{BUCKET}/lake") as con:
        on_s3 = con.sql(query).fetchall()
        (view,) = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'ohlcv'").fetchone()
    with connect(tmp_path / "local.duckdb", local) as con:
        assert con.sql(query).fetchall() == on_s3
    assert f"s3://{BUCKET}/lake/ohlcv/" in view


def test_a_month_without_usable_candles_deletes_its_bars_object(lakes, env, s3, tmp_path):
    """Bars stored for a day whose 1-minute candles are now all missing are removed; with
    no other day left in the month, so is the month's bars object."""
    remote, _ = lakes["s3"]
    day = date(2024, 2, 5)
    stale = remote.read_month("bars", "synthetic", "15m", "BTC-USDT", MONTH)
    remote.write_month(
        "bars", "synthetic", "15m", "BTC-USDT", day,
        {day: DayData(stale.day(DAYS[0]), {"note": "bars of a day whose candles are gone"})},
    )  # fmt: skip
    path = remote.month_path("bars", "synthetic", "15m", "BTC-USDT", day)
    assert path.exists()
    # The exchange has nothing for the day: it is stored with all its minutes missing.
    empty = tmp_path / "empty.csv"
    empty.write_text("ts_ms,open,high,low,close,volume\n")
    nothing = ReplaySource({"BTC/USDT": empty}, exchange="synthetic", clock=lambda: NOW_S)
    (candles,) = Ingestor(nothing, remote).ingest("BTC/USDT", [day])
    assert candles.report["rows"] == 0 and candles.report["missing"] == 1440

    (outcome,) = BarBuilder(remote, "synthetic", 0.01).build("15m", "BTC-USDT", day)

    assert outcome.day == day
    assert outcome.skipped.startswith("1m candles fail gaps: 1440 minutes still missing")
    assert not path.exists()
    assert path.path.split("/", 1)[1] not in keys(s3, BUCKET, "lake/bars/")
    assert list(remote.month_files("bars", "synthetic", "15m", "BTC-USDT")) == [MONTH]
    assert list(remote.day_reports("bars", "synthetic", "15m", "BTC-USDT")) == DAYS


# --- atomicity without rename ----------------------------------------------------------


@pytest.fixture
def versioned(endpoint, s3, env, request):
    """A fresh bucket with versioning on: every PUT that reached it leaves a version."""
    bucket = f"versioned-{request.node.name.replace('_', '-')[:40]}".lower()
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def one_day(lake: Lake) -> tuple:
    source = SyntheticSource(seed=7, symbols=SYMBOLS, clock=lambda: NOW_S)
    (outcome,) = Ingestor(source, lake).ingest("BTC/USDT", DAYS[:1])
    return (
        outcome.path,
        lake.read(outcome.path),
        *lake.read_day_report("synthetic", "BTC-USDT", DAYS[0]),
    )


def write_day(lake: Lake, candles: pl.DataFrame, report: dict, gaps: pl.DataFrame):
    """DAYS[0] of BTC-USDT replaced in its month file with these candles."""
    (written,) = lake.write_month(
        "ohlcv", "synthetic", "1m", "BTC-USDT", DAYS[0], {DAYS[0]: DayData(candles, report, gaps)}
    ).values()
    return written


def versions(s3, bucket: str) -> list[dict]:
    return s3.list_object_versions(Bucket=bucket).get("Versions", [])


def test_rewriting_the_same_content_sends_nothing(versioned, s3):
    lake = Lake(f"s3://{versioned}/lake")
    path, candles, report, gaps = one_day(lake)
    report.pop("content_hash")

    again = write_day(lake, candles, report, gaps)

    assert again.written is False
    assert len(versions(s3, versioned)) == 1
    changed = candles.with_columns(pl.col("volume") + 1.0)
    assert write_day(lake, changed, report, gaps).written is True
    assert len(versions(s3, versioned)) == 2
    assert_frame_equal(lake.read(path), changed)


class Boom(Exception):
    pass


def test_a_write_failing_while_encoding_leaves_the_previous_object(versioned, s3, monkeypatch):
    lake = Lake(f"s3://{versioned}/lake")
    path, candles, report, gaps = one_day(lake)
    before = s3.get_object(Bucket=versioned, Key=path.path.split("/", 1)[1])["Body"].read()

    def half_then_fail(table, sink, **kwargs):
        sink.write(b"PAR1 half a file")
        raise Boom("killed while encoding")

    monkeypatch.setattr(lake_files.pq, "write_table", half_then_fail)
    with pytest.raises(Boom):
        write_day(lake, candles.with_columns(pl.col("close") * 2), report, gaps)
    monkeypatch.undo()

    (version,) = versions(s3, versioned)  # nothing reached the server
    assert s3.get_object(Bucket=versioned, Key=version["Key"])["Body"].read() == before
    assert_frame_equal(lake.read(path), candles)


class CuttingProxy(socketserver.ThreadingTCPServer):
    """A TCP relay to the S3 server that cuts each connection once `limit` bytes of requests
    have passed: an upload that dies mid-body (a network cut, a killed process)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int], limit: int) -> None:
        self.upstream, self.limit, self.cuts = upstream, limit, 0
        super().__init__(("127.0.0.1", 0), self.Relay)

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            client, server = self.request, socket.create_connection(self.server.upstream)
            threading.Thread(target=self.pipe, args=(server, client, None), daemon=True).start()
            self.pipe(client, server, self.server.limit)

        def pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while chunk := source.recv(65536):
                    if limit is not None and sent + len(chunk) > limit:
                        sink.sendall(chunk[: limit - sent])
                        self.server.cuts += 1
                        break
                    sink.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            for end in (source, sink):
                end.close()


def test_an_upload_cut_mid_way_leaves_the_previous_object(versioned, s3, endpoint, monkeypatch):
    lake = Lake(f"s3://{versioned}/lake")
    path, candles, report, _ = one_day(lake)
    size = s3.head_object(Bucket=versioned, Key=path.path.split("/", 1)[1])["ContentLength"]
    host, port = endpoint.removeprefix("http://").split(":")
    proxy = CuttingProxy((host, int(port)), limit=size // 2)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        through_proxy = Lake(f"s3://{versioned}/lake")
        changed = candles.with_columns(pl.col("close") * 2)
        with pytest.raises(LakeError, match="cannot write s3://versioned-"):
            lake_module.write_parquet_atomic(
                through_proxy.month_path("ohlcv", "synthetic", "1m", "BTC-USDT", DAYS[0]),
                changed.to_arrow(),
                {},
            )
    finally:
        proxy.shutdown()
        proxy.server_close()

    assert proxy.cuts >= 1  # the new file's upload did start and was cut
    assert len(versions(s3, versioned)) == 1
    assert_frame_equal(lake.read(path), candles)
    assert lake.read_day_report("synthetic", "BTC-USDT", DAYS[0])[0] == report


def test_a_damaged_object_is_named_moved_aside_and_rebuilt_by_the_next_ingest(
    versioned, s3, tmp_path
):
    root = f"s3://{versioned}/lake"
    lake = Lake(root)
    source = SyntheticSource(seed=7, symbols=SYMBOLS, clock=lambda: NOW_S)
    (outcome, *_) = Ingestor(source, lake).ingest("BTC/USDT", DAYS)
    original = lake.read(outcome.path)
    key = outcome.path.path.removeprefix(f"{versioned}/")
    local = tmp_path / "data.parquet"
    local.write_bytes(s3.get_object(Bucket=versioned, Key=key)["Body"].read())
    flip_data_bytes(local)
    s3.put_object(Bucket=versioned, Key=key, Body=local.read_bytes())

    found = verify(root)
    assert list(found.bad) == [outcome.path]
    Ingestor(source, Lake(root)).ingest("BTC/USDT", DAYS)

    assert_frame_equal(lake.read(outcome.path), original)
    (moved,) = keys(s3, versioned, "lake/_quarantine/")
    assert moved.startswith(f"lake/_quarantine/{key.removeprefix('lake/')}.")
    assert s3.get_object(Bucket=versioned, Key=moved)["Body"].read() == local.read_bytes()
    assert verify(root).bad == {}


# --- clear errors -----------------------------------------------------------------------


def test_a_missing_bucket_is_named(env):
    with pytest.raises(LakeError, match="bucket 'no-such-bucket' does not exist at http://"):
        Lake("s3://no-such-bucket/lake")


def test_half_set_credentials_are_named(env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY is not set"):
        Lake(f"s3://{BUCKET}/lake")


def test_an_unreachable_endpoint_is_named(env, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(LakeError, match=f"cannot reach the lake's bucket 'unreached' at .*{port}"):
        Lake("s3://unreached/lake")


# --- through Dagster --------------------------------------------------------------------


def test_candles_and_catalog_materialize_on_s3(env, s3, tmp_path, shared_data):
    s3.create_bucket(Bucket="dagster-lake")
    resources = {
        "source": ReplaySourceResource(
            files={s: str(p) for s, p in REPLAY_FILES.items()}, markets_file=str(EXCHANGE_INFO)
        ),
        "lake": LakeResource(
            root="s3://dagster-lake/lake",
            catalog_path=str(tmp_path / "c.duckdb"),
            reports_path=str(tmp_path / "reports"),
        ),
    }
    # May 2021 of the recording: 19 whole days (05-01..05-19), none with a gap.
    result = dg.materialize([candles_1m], partition_key="2021-05-01|BTC-USDT", resources=resources)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"gaps": True, "ohlc_sanity": True, "revisions": True, "zero_volume": True}
    (materialization,) = result.asset_materializations_for_node("candles_1m")
    assert materialization.partition == "2021-05-01|BTC-USDT"
    assert materialization.metadata["days"].value == 19
    assert materialization.metadata["path"].value == (
        "s3://dagster-lake/lake/ohlcv/exchange=binance/timeframe=1m/symbol=BTC-USDT/"
        "month=2021-05/data.parquet"
    )

    dg.materialize([catalog], resources=resources, selection=[catalog])

    assert keys(s3, "dagster-lake") == [
        "lake/ohlcv/exchange=binance/timeframe=1m/symbol=BTC-USDT/month=2021-05/data.parquet"
    ]
    with connect(Path(tmp_path / "c.duckdb"), "s3://dagster-lake/lake") as con:
        assert con.execute("SELECT count(*) FROM ohlcv").fetchone()[0] == 19 * 1440
        assert con.execute("SELECT count(*) FROM partitions").fetchone()[0] == 19
