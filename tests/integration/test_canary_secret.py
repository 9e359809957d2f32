"""Canary credentials, configured for the ccxt source and the ledger, never get stored,
printed or shown in the UI.

The whole demo (`python -m pipelines.demo`: ingest, bars, features, markets, backtests,
catalog, dry-run) runs in a subprocess against the loopback FakeBinance with canaries as
CANDLESTACK_API_KEY and CANDLESTACK_API_SECRET, as the password of the PostgreSQL ledger in
CANDLESTACK_LEDGER_URL, and in CANDLESTACK_CCXT_OPTIONS as the password of the HTTP proxy
every exchange request goes through and as a header value. Then every byte it left behind is
searched: everything under the isolated DAGSTER_HOME (run and event-log SQLite), the lake,
the catalog, the ledger's tables, the reports, its stdout and stderr, and the answers of a
real dagster-webserver's GraphQL (the Resources pages and the launchpad's default config),
for the canaries as is and as base64, URL-encoded, JSON-escaped or hex. Parquet and DuckDB
compress their pages and Dagster zlib-compresses its run snapshots inside SQLite, so decoded
values and metadata are searched as well as raw bytes. A positive control plants the canary
in each kind of file, so a search that cannot find it fails; a credential passed as plain
resource config instead of dg.EnvVar is caught (in the zlib-compressed job snapshot and in
the UI's configured values).
"""

import base64
import binascii
import hashlib
import hmac
import http.client
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from contextlib import closing, suppress
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import dagster as dg
import duckdb
import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from candlestack.config import Settings
from resources.sources import source_resource
from tests.conftest import REPLAY_FILES, isolated_env
from tests.integration.fake_binance import FakeBinance
from tests.integration.services import POSTGRES, throwaway_database

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SAPI_PREFIX = "/sapi/v1"
# ccxt's binance asks this signed endpoint for currencies in load_markets when it has keys.
CURRENCIES_PATH = f"{SAPI_PREFIX}/capital/config/getall"
# The last whole day of the shared Binance CSVs (2021-04-20 20:42 .. 2021-05-20 20:40); the
# demo's 7 days end on it and skip the 2021-04-25 maintenance gap.
LAST_FULL_DAY = date(2021, 5, 19)
# What the demo, the alerts and the webserver must leave behind under tmp_path
# (tests/conftest.py isolated_env, the receiver's folder of alert bodies, the webserver's
# output); everything there is searched. The ledger is in PostgreSQL, searched on its own.
STORES = ("dagster_home", "lake", "catalog.duckdb", "reports", "alerts", "webserver.log")
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
# A header the ccxt options add to every request (an API gateway's token, say).
TOKEN_HEADER = "X-Api-Token"
PROXY_USER = "candlestack"
HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "transfer-encoding"}
# workspace.yaml's location, and the repository a module-level `defs` becomes.
REPOSITORY = {"repositoryLocationName": "candlestack", "repositoryName": "__repository__"}
# The Deployment -> Resources list, then each resource's page as the UI asks for it
# (dagster-webserver's ResourceRootQuery with its ResourceDetailsFragment).
RESOURCES_QUERY = """
query ($repo: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $repo) {
    __typename
    ... on ResourceDetailsList { results { name configuredValues { key value type } } }
    ... on PythonError { message }
  }
  repositoryOrError(repositorySelector: $repo) { ... on Repository { jobs { name } } }
}
"""
RESOURCE_QUERY = """
query ResourceRootQuery($resourceSelector: ResourceSelector!) {
  topLevelResourceDetailsOrError(resourceSelector: $resourceSelector) {
    __typename
    ... on ResourceDetails {
      id name description
      configFields { name description configTypeKey isRequired defaultValueAsJson }
      configuredValues { key value type }
      nestedResources { name type resource { id name resourceType description } }
      parentResources { name resource { id name resourceType description } }
      assetKeysUsing { path }
      schedulesUsing sensorsUsing
      jobsOpsUsing { jobName opHandleIDs }
      resourceType
    }
    ... on PythonError { message }
  }
}
"""
# The launchpad's scaffold of a job's config: resources' defaults are in it.
LAUNCHPAD_QUERY = """
query ($selector: PipelineSelector!) {
  runConfigSchemaOrError(selector: $selector) {
    __typename
    ... on RunConfigSchema { rootDefaultYaml }
    ... on PythonError { message }
  }
}
"""


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


def postgres_texts(database: str) -> list[bytes]:
    """Every value of every table in the database's schemas (the ledger's tables)."""
    texts = []
    with psycopg.connect(f"{POSTGRES}/{database}") as con:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE "
            "table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            rows = con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            texts.append(json.dumps(rows, default=str).encode())
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
def database():
    with throwaway_database("canary") as name:
        yield name


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


class ForwardProxy(ThreadingHTTPServer):
    """Loopback HTTP forward proxy, as a paid one behind credentials: it records each
    request's Proxy-Authorization and TOKEN_HEADER, then forwards it to its target."""

    daemon_threads = True

    def __init__(self) -> None:
        seen = []

        class Handler(BaseHTTPRequestHandler):
            def forward(self) -> None:
                seen.append((self.headers["Proxy-Authorization"], self.headers[TOKEN_HEADER]))
                target = urlsplit(self.path)  # a proxy is asked for the absolute URL
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "proxy-authorization"
                }
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    path = target.path + (f"?{target.query}" if target.query else "")
                    upstream.request(self.command, path, body or None, headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.seen = seen
        threading.Thread(target=self.serve_forever, daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, **variables) -> bytes:
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.read()


def ui_answers(url: str, server: subprocess.Popen, log: Path) -> dict[str, bytes]:
    """The webserver's GraphQL answers, once its code location has loaded: the resources
    list, each resource's page and each job's launchpad scaffold."""
    deadline = time.monotonic() + 180
    while True:
        try:
            listing = graphql(url, RESOURCES_QUERY, repo=REPOSITORY)
            if b'"ResourceDetailsList"' in listing:
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"dagster-webserver lists no resources:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    data = json.loads(listing)["data"]
    answers = {"graphql resources": listing}
    for resource in data["allTopLevelResourceDetailsOrError"]["results"]:
        selector = {**REPOSITORY, "resourceName": resource["name"]}
        answers[f"graphql resource {resource['name']}"] = graphql(
            url, RESOURCE_QUERY, resourceSelector=selector
        )
    for job in data["repositoryOrError"]["jobs"]:
        selector = {
            "pipelineName": job["name"],
            "repositoryName": REPOSITORY["repositoryName"],
            "repositoryLocationName": REPOSITORY["repositoryLocationName"],
        }
        answers[f"graphql launchpad {job['name']}"] = graphql(
            url, LAUNCHPAD_QUERY, selector=selector
        )
    return answers


def configured_values(answers: dict[str, bytes]) -> dict[tuple[str, str], tuple[str, str]]:
    """(resource, field) -> (value, type) as the Resources list shows them."""
    listing = json.loads(answers["graphql resources"])["data"]
    return {
        (resource["name"], value["key"]): (value["value"], value["type"])
        for resource in listing["allTopLevelResourceDetailsOrError"]["results"]
        for value in resource["configuredValues"]
    }


def test_search_finds_a_planted_canary(tmp_path, database):
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
    with psycopg.connect(f"{POSTGRES}/{database}") as con:
        con.execute("CREATE TABLE audit (seq int, payload text)")
        con.execute("INSERT INTO audit SELECT i, 'row ' || i FROM generate_series(1, 1000) i")
        con.execute("INSERT INTO audit VALUES (0, %s)", [json.dumps({"note": canary})])
    found = search(
        [tmp_path / "dagster_home", tmp_path / "lake", catalog],
        {"stdout": quote(canary).encode(), "ledger": b"\n".join(postgres_texts(database))},
        [canary],
    )
    places = {f.rsplit(": ", 1)[0] for f in found}
    assert {"stdout", "ledger", str(plain), f"{column} (decoded)"} <= places
    assert {f"{metadata} (decoded)", f"{catalog} (decoded)", f"{runs} (decoded)"} <= places
    assert str(runs) not in places  # compressed: only the decoded search sees it
    assert any(f.endswith("base64+2") for f in found if f.startswith(str(plain)))
    assert search([tmp_path / "lake"], {}, [_canary("other")]) == []


def test_canary_secret_never_stored_or_printed(tmp_path, fake_exchange, database, monkeypatch):
    key, secret, hook = _canary("key"), _canary("secret"), _canary("webhook")
    ledger_password, proxy_password, token = _canary("ledger"), _canary("proxy"), _canary("header")
    canaries = [key, secret, hook, ledger_password, proxy_password, token]
    today = datetime.now(UTC).date()
    receiver = AlertReceiver(tmp_path / "alerts")
    proxy = ForwardProxy()
    # Before the shared candles begin (30 days before their last), in the partitions: its
    # month is ingested after the demo, once refused by the exchange and once for real.
    empty_day = today - timedelta(days=40)
    url = f"http://127.0.0.1:{fake_exchange.port}"
    options = fake_exchange.ccxt_config()
    options["urls"]["api"]["sapi"] = url + SAPI_PREFIX
    proxy_address = f"127.0.0.1:{proxy.server_port}"
    proxy_url = f"http://{PROXY_USER}:{quote(proxy_password, safe='')}@{proxy_address}"
    options |= {"enableRateLimit": False, "httpProxy": proxy_url, "headers": {TOKEN_HEADER: token}}
    ledger_url = (
        f"postgresql+psycopg://postgres:{quote(ledger_password, safe='')}@127.0.0.1:5432/{database}"
    )
    env = isolated_env(
        tmp_path,
        source="ccxt",
        symbols="BTC/USDT,ETH/USDT",
        start_date=empty_day.isoformat(),
        ccxt_options=json.dumps(options),
        api_key=key,
        api_secret=secret,
        ledger_url=ledger_url,
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
    # The UI as an operator opens it, started while the alerts are raised.
    port = str(free_port())
    log = tmp_path / "webserver.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [BIN / "dagster-webserver", "-h", "127.0.0.1", "-p", port, "-w", "workspace.yaml"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        fake_exchange.inject("500", 1, body=KEY_REFUSED)
        alerts = subprocess.run(
            [sys.executable, "-c", RAISE_ALERTS, empty_day.isoformat()],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=600,
        )
        assert alerts.returncode == 0, alerts.stderr.decode()[-3000:]
        answers = ui_answers(f"http://127.0.0.1:{port}", server, log)
    finally:
        # This server's process group only: other dagster processes may share the machine.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert fake_exchange.pending_faults == [], "the refused key never reached the client"
    receiver.shutdown()
    proxy.shutdown()
    kinds = sorted(alert["kind"] for alert in receiver.received)
    assert kinds == ["check_failure", "kill_switch", "run_failure"], receiver.received
    by_kind = {alert["kind"]: alert for alert in receiver.received}
    assert "AuthenticationError" in by_kind["run_failure"]["message"]
    assert by_kind["check_failure"]["where"]["check"] == "gaps"
    ledger = postgres_texts(database)
    assert any(b"btc_ma_cross" in text for text in ledger), "the demo wrote no ledger there"
    output = {
        "demo stdout": demo.stdout,
        "demo stderr": demo.stderr,
        "alerts stdout": alerts.stdout,
        "alerts stderr": alerts.stderr,
        **answers,
        "ledger": b"\n".join(ledger),
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
    # Every exchange request went through the proxy with its credentials and the header.
    credentials = base64.b64encode(f"{PROXY_USER}:{proxy_password}".encode()).decode()
    assert len(proxy.seen) == len(fake_exchange.requests)
    assert set(proxy.seen) == {(f"Basic {credentials}", token)}
    # The same settings in-process: the client the resource opens holds the canaries.
    for name in ("CANDLESTACK_API_KEY", "CANDLESTACK_API_SECRET", "CANDLESTACK_CCXT_OPTIONS"):
        monkeypatch.setenv(name, env[name])
    resource = source_resource(Settings.from_env(env))
    with dg.build_resources({"source": resource}) as built:
        client = built.source.open().client
    assert (client.apiKey, client.secret) == (key, secret)
    assert (client.httpProxy, client.headers) == (proxy_url, {TOKEN_HEADER: token})

    # The UI answered with every resource: the webhook's variable proves it read them.
    values = configured_values(answers)
    assert values[("alerts", "webhook_url")] == ("CANDLESTACK_ALERT_WEBHOOK_URL", "ENV_VAR")
    assert {"source", "lake", "ledger", "alerts"} <= {name for name, _ in values}
    missing = [name for name in STORES if not (tmp_path / name).exists()]
    assert missing == [], "the demo wrote elsewhere: the search would miss it"
    assert list((tmp_path / "lake").rglob("*.parquet")), "the demo wrote no lake"
    written = [p for p in tmp_path.iterdir() if p.name != EXCHANGE_FOLDER]
    assert search(written, output, canaries) == []
    # What the UI shows instead: the variables' names.
    assert values[("ledger", "url")] == ("CANDLESTACK_LEDGER_URL", "ENV_VAR")
    assert values[("source", "options_json")] == ("CANDLESTACK_CCXT_OPTIONS", "ENV_VAR")
    assert values[("source", "api_key")] == ("CANDLESTACK_API_KEY", "ENV_VAR")
