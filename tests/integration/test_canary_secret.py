"""A canary API key and secret, configured for the ccxt source, never get stored or printed.

The whole demo (`python -m pipelines.demo`: ingest, bars, features, markets, backtests,
catalog, dry-run) runs in a subprocess against the loopback FakeBinance with the canary as
CANDLESTACK_API_KEY and CANDLESTACK_API_SECRET. Then every byte it left behind is searched:
everything under the isolated DAGSTER_HOME (run and event-log SQLite), the lake, the
catalog, the ledger, the reports, and its stdout and stderr, for the canary as is and as
base64, URL-encoded, JSON-escaped or hex. Parquet and DuckDB compress their pages and Dagster
zlib-compresses its run snapshots inside SQLite, so decoded values and metadata are searched
as well as raw bytes. A positive control plants the canary in each kind of file, so a search
that cannot find it fails; a key passed as plain resource config instead of dg.EnvVar is
caught (in the zlib-compressed job snapshot).
"""

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import sqlite3
import subprocess
import sys
import threading
import zlib
from contextlib import closing, suppress
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlencode

import dagster as dg
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from candlestack.config import Settings
from resources.sources import source_resource
from tests.conftest import REPLAY_FILES, isolated_env
from tests.integration.fake_binance import FakeBinance

ROOT = Path(__file__).resolve().parents[2]
SAPI_PREFIX = "/sapi/v1"
# ccxt's binance asks this signed endpoint for currencies in load_markets when it has keys.
CURRENCIES_PATH = f"{SAPI_PREFIX}/capital/config/getall"
# The last whole day of the shared Binance CSVs (2021-04-20 20:42 .. 2021-05-20 20:40); the
# demo's 7 days end on it and skip the 2021-04-25 maintenance gap.
LAST_FULL_DAY = date(2021, 5, 19)
# What the demo and the alerts must leave behind under tmp_path (tests/conftest.py
# isolated_env, and the receiver's folder of alert bodies); everything there is searched.
STORES = ("dagster_home", "lake", "catalog.duckdb", "ledger.sqlite", "reports", "alerts")
# After the demo, in its environment: a run that fails (the exchange refuses the API key on
# its first candle request, a fault the test queues), the same month again (days before the
# exchange has any candle fail the gaps check, not the run) and a kill-switch trip, each
# alerted by the alert sensors as the daemon would tick them (the first tick starts at the
# newest event).
RAISE_ALERTS = """
import subprocess, sys
import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG,
)
from assets.partitions import candle_range
from pipelines.alerts import alert_sensors
from pipelines.definitions import defs

instance = dg.DagsterInstance.get()
resources = {"alerts": defs.resources["alerts"], "ledger": defs.resources["ledger"]}

def tick(sensor, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return sensor(context).cursor

cursors = [tick(sensor, None) for sensor in alert_sensors]
keys = candle_range(sys.argv[1], sys.argv[1])
tags = {ASSET_PARTITION_RANGE_START_TAG: keys.start, ASSET_PARTITION_RANGE_END_TAG: keys.end}
ingest = defs.resolve_job_def("ingest_candles")
failed = ingest.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
assert not failed.success
empty = ingest.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
assert empty.success
gaps = next(e for e in empty.get_asset_check_evaluations() if e.check_name == "gaps")
assert not gaps.passed
subprocess.run(
    [sys.executable, "-m", "candlestack.kill_switch", "trip", "--scope", "*", "--reason", "canary"],
    check=True,
)
for sensor, cursor in zip(alert_sensors, cursors):
    tick(sensor, cursor)
"""
EXCHANGE_FOLDER = "fake_exchange"
# Binance refusing a key (-2015): ccxt's AuthenticationError, which is never retried.
KEY_REFUSED = '{"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}'
DAY_MS = 86_400_000
SQLITE_HEADER = b"SQLite format 3\0"


class SignedFakeBinance(FakeBinance):
    """FakeBinance that also answers the signed currencies call (with no currencies), so ccxt
    signs a request with the canary secret and the test can check the signature."""

    def _respond(self, path, query, fault):
        if path == CURRENCIES_PATH:
            return 200, b"[]"
        return super()._respond(path, query, fault)


def _canary(kind: str) -> str:
    # "+/=" so URL-encoding and JSON escaping give other bytes than the raw form.
    return f"canary-{kind}-{secrets.token_hex(8)}+/="


def encodings(canary: str) -> dict[str, bytes]:
    """The canary as it could appear on disk: raw and in the usual encodings."""
    raw = canary.encode()
    forms = {
        "raw": raw,
        "url": quote(canary, safe="").encode(),
        "url_path": quote(canary).encode(),
        "json_escaped_slash": canary.replace("/", "\\/").encode(),
        "hex": binascii.hexlify(raw),
    }
    # Inside a longer base64 text the canary's encoding depends on its offset mod 3; the
    # characters that only it determines are the same whatever comes around it.
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        core = encoded[4 * -(-offset // 3) : 4 * ((offset + len(raw)) // 3)]
        forms[f"base64+{offset}"] = core
        forms[f"base64url+{offset}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    return forms


def _parquet_texts(path: Path) -> list[bytes]:
    """Decoded values and key-value metadata of a Parquet file."""
    file = pq.ParquetFile(path)
    meta = file.schema_arrow.metadata or {}
    texts = [k + b"=" + v for k, v in meta.items()]
    table = file.read()
    for column in table.columns:
        texts.append(json.dumps(column.to_pylist(), default=str).encode())
    return texts


def _duckdb_texts(path: Path) -> list[bytes]:
    """Every table's values (views only read the lake, searched on its own)."""
    texts = []
    with duckdb.connect(str(path), read_only=True) as con:
        names = con.sql("SELECT schema_name, table_name FROM duckdb_tables()").fetchall()
        for schema, table in names:
            rows = con.sql(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            texts.append(json.dumps(rows, default=str).encode())
    return texts


def _sqlite_texts(path: Path) -> list[bytes]:
    """Every value of every table, zlib blobs inflated (Dagster compresses its snapshots)."""
    texts = []
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        tables = con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        for (table,) in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        texts.append(value)
                        with suppress(zlib.error):
                            texts.append(zlib.decompress(value))
                    elif value is not None:
                        texts.append(str(value).encode())
    return texts


def search(roots: list[Path], texts: dict[str, bytes], canaries: list[str]) -> list[str]:
    """Where any form of any canary occurs: 'place: form'."""
    needles = [
        (f"{canary.split('-')[1]} {name}", form)
        for canary in canaries
        for name, form in encodings(canary).items()
    ]
    blobs = dict(texts)
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            blobs[str(path)] = path.read_bytes()
            if path.suffix == ".parquet":
                blobs[f"{path} (decoded)"] = b"\n".join(_parquet_texts(path))
            elif path.suffix == ".duckdb":
                blobs[f"{path} (decoded)"] = b"\n".join(_duckdb_texts(path))
            elif blobs[str(path)].startswith(SQLITE_HEADER):
                blobs[f"{path} (decoded)"] = b"\n".join(_sqlite_texts(path))
    return [f"{place}: {name}" for place, blob in blobs.items() for name, n in needles if n in blob]


def _shifted_csv(source: Path, target: Path, shift_ms: int) -> Path:
    frame = pl.read_csv(source).with_columns(pl.col("ts_ms") + shift_ms)
    frame.write_csv(target)
    return target


@pytest.fixture
def fake_exchange(tmp_path, shared_data):
    """The shared BTC and ETH candles moved by whole days so that their last full day is
    today: the demo backfills the last 7 days and keeps today open, as in production."""
    shift_ms = (datetime.now(UTC).date() - LAST_FULL_DAY).days * DAY_MS
    folder = tmp_path / EXCHANGE_FOLDER
    folder.mkdir()
    markets = {
        symbol.replace("/", ""): _shifted_csv(path, folder / path.name, shift_ms)
        for symbol, path in REPLAY_FILES.items()
    }
    with SignedFakeBinance(markets) as server:
        yield server


class AlertReceiver(ThreadingHTTPServer):
    """Loopback webhook: each POSTed body is written to its own file in `folder`."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                (folder / f"{len(received)}.json").write_bytes(body)
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.received = received
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_search_finds_a_planted_canary(tmp_path):
    """Positive control: the canary planted once in each kind of file is found there."""
    canary = _canary("key")
    plain = tmp_path / "dagster_home" / "compute.log"
    plain.parent.mkdir()
    plain.write_text(f"header {base64.b64encode(b'xy' + canary.encode()).decode()} footer")
    column = tmp_path / "lake" / "column.parquet"
    column.parent.mkdir()
    values = pa.table({"note": [f"row {i}" for i in range(1000)] + [canary]})
    pq.write_table(values, column, compression="zstd")
    metadata = tmp_path / "lake" / "metadata.parquet"
    pq.write_table(
        pa.table({"x": [1]}).replace_schema_metadata({"report": json.dumps({"k": canary})}),
        metadata,
        compression="zstd",
    )
    catalog = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(catalog)) as con:
        con.sql("CREATE TABLE t AS SELECT 'row ' || i AS v FROM range(100000) r(i)")
        con.execute("INSERT INTO t VALUES (?)", [canary])
    runs = tmp_path / "dagster_home" / "runs.db"
    with closing(sqlite3.connect(runs)) as con, con:
        con.execute("CREATE TABLE snapshots (body BLOB)")
        con.execute("INSERT INTO snapshots VALUES (?)", [zlib.compress(canary.encode())])
    found = search(
        [tmp_path / "dagster_home", tmp_path / "lake", catalog],
        {"stdout": quote(canary).encode()},
        [canary],
    )
    places = {f.rsplit(": ", 1)[0] for f in found}
    assert {"stdout", str(plain), f"{column} (decoded)", f"{metadata} (decoded)"} <= places
    assert {f"{catalog} (decoded)", f"{runs} (decoded)"} <= places
    assert str(runs) not in places  # compressed: only the decoded search sees it
    assert any(f.endswith("base64+2") for f in found if f.startswith(str(plain)))
    assert search([tmp_path / "lake"], {}, [_canary("other")]) == []


def test_canary_secret_never_stored_or_printed(tmp_path, fake_exchange, monkeypatch):
    key, secret, hook = _canary("key"), _canary("secret"), _canary("webhook")
    today = datetime.now(UTC).date()
    receiver = AlertReceiver(tmp_path / "alerts")
    # Before the shared candles begin (30 days before their last), in the partitions: its
    # month is ingested after the demo, once refused by the exchange and once for real.
    empty_day = today - timedelta(days=40)
    url = f"http://127.0.0.1:{fake_exchange.port}"
    options = fake_exchange.ccxt_config()
    options["urls"]["api"]["sapi"] = url + SAPI_PREFIX
    env = isolated_env(
        tmp_path,
        source="ccxt",
        symbols="BTC/USDT,ETH/USDT",
        start_date=empty_day.isoformat(),
        ccxt_options=json.dumps({**options, "enableRateLimit": False}),
        api_key=key,
        api_secret=secret,
        # A webhook URL is a credential too (Slack's carry a token): it must stay out of
        # what is stored and of the alerts themselves.
        alert_webhook_url=f"http://127.0.0.1:{receiver.server_port}/hook/{hook}",
    )

    demo = subprocess.run(
        [sys.executable, "-m", "pipelines.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr.decode()[-3000:]
    fake_exchange.inject("500", 1, body=KEY_REFUSED)
    alerts = subprocess.run(
        [sys.executable, "-c", RAISE_ALERTS, empty_day.isoformat()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert alerts.returncode == 0, alerts.stderr.decode()[-3000:]
    assert fake_exchange.pending_faults == [], "the refused key never reached the client"
    receiver.shutdown()
    kinds = sorted(alert["kind"] for alert in receiver.received)
    assert kinds == ["check_failure", "kill_switch", "run_failure"], receiver.received
    by_kind = {alert["kind"]: alert for alert in receiver.received}
    assert "AuthenticationError" in by_kind["run_failure"]["message"]
    assert by_kind["check_failure"]["where"]["check"] == "gaps"
    output = {
        "demo stdout": demo.stdout,
        "demo stderr": demo.stderr,
        "alerts stdout": alerts.stdout,
        "alerts stderr": alerts.stderr,
    }
    assert b"ccxt source, 2 symbols" in demo.stdout
    assert fake_exchange.errors == []

    # ccxt had both: without keys it never calls the signed endpoint, and the signature is
    # the canary secret's HMAC of the query, as Binance checks it.
    signed = fake_exchange.requests_to(CURRENCIES_PATH)
    assert signed, "ccxt made no signed call: it did not get the key"
    for query in signed:
        payload = urlencode({k: v for k, v in query.items() if k != "signature"})
        expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        assert query["signature"] == expected
    assert any(q.get("symbol") == "ETHUSDT" for q in fake_exchange.requests_to("/api/v3/klines"))
    # The same settings in-process: the client the resource opens holds the canary key.
    for name in ("CANDLESTACK_API_KEY", "CANDLESTACK_API_SECRET"):
        monkeypatch.setenv(name, env[name])
    resource = source_resource(Settings.from_env(env))
    with dg.build_resources({"source": resource}) as built:
        client = built.source.open().client
    assert (client.apiKey, client.secret) == (key, secret)

    missing = [name for name in STORES if not (tmp_path / name).exists()]
    assert missing == [], "the demo wrote elsewhere: the search would miss it"
    assert list((tmp_path / "lake").rglob("*.parquet")), "the demo wrote no lake"
    written = [p for p in tmp_path.iterdir() if p.name != EXCHANGE_FOLDER]
    assert search(written, output, [key, secret, hook]) == []
