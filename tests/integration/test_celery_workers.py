"""A backfill on Celery workers that share nothing but the broker (the real RabbitMQ), the
results (the real Redis), the instance (a real PostgreSQL database) and the lake (moto's S3
on loopback): two `dagster-celery worker` processes execute every step of the runs a real
dagster-daemon launches, with real ccxt from the loopback Binance, and the lake they leave
is the one an in-process run leaves, object for object and byte for byte.

The loopback Binance serves BTC and ETH from their recordings and SOL from BTC's (only two
recordings cover April-May 2021): 2 months x 3 symbols."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import dagster as dg
import pytest
import yaml
from kombu import Connection

from assets.tags import WORKER_TAG
from candlestack.config import Settings
from tests.conftest import REPLAY_FILES, isolated_env
from tests.integration.daemon import BIN, ROOT, running_daemon
from tests.integration.fake_binance import FakeBinance
from tests.integration.services import (
    S3_CREDENTIALS,
    CeleryWorkers,
    moto_s3,
    restart_rabbitmq,
    throwaway_database,
)

BUCKET = "candles"
SYMBOLS = "BTC/USDT,ETH/USDT,SOL/USDT"
PARTITIONS = [
    f"{month}|{symbol}"
    for month in ("2021-04-01", "2021-05-01")
    for symbol in ("BTC-USDT", "ETH-USDT", "SOL-USDT")
]
RANGE = {
    "dagster/asset_partition_range_start": PARTITIONS[0],
    "dagster/asset_partition_range_end": PARTITIONS[-1],
}
POOL = "exchange-binance"
TIMEOUT_S = 420
EXECUTING = "in celery worker"  # dagster-celery's engine event as a worker takes a step


@pytest.fixture(scope="module")
def binance(shared_data) -> Iterator[FakeBinance]:
    markets = {
        "BTCUSDT": REPLAY_FILES["BTC/USDT"],
        "ETHUSDT": REPLAY_FILES["ETH/USDT"],
        "SOLUSDT": REPLAY_FILES["BTC/USDT"],
    }
    # Slow answers: a step lasts long enough to be killed, and ingest steps would overlap.
    with FakeBinance(markets, delay=0.2) as server:
        yield server


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3() as url:
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url


def s3_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_CREDENTIALS["AWS_REGION"],
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def lake_objects(endpoint: str, prefix: str) -> dict[str, str]:
    """Every object under the lake's prefix: its key below the prefix -> its MD5 (ETag)."""
    pages = s3_client(endpoint).get_paginator("list_objects_v2")
    return {
        o["Key"].removeprefix(f"{prefix}/"): o["ETag"]
        for page in pages.paginate(Bucket=BUCKET, Prefix=f"{prefix}/")
        for o in page.get("Contents", [])
    }


def deployment_env(tmp_path: Path, binance: FakeBinance, endpoint: str, prefix: str) -> dict:
    """Settings for runs and workers alike: ccxt against the loopback Binance, the lake on
    s3://candles/PREFIX, the instance's run queue and pools as shipped."""
    env = isolated_env(
        tmp_path,
        source="ccxt",
        symbols=SYMBOLS,
        start_date="2021-04-28",
        ccxt_options=json.dumps(binance.ccxt_config()),
        lake=f"s3://{BUCKET}/{prefix}",
    )
    return {**env, **S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture(scope="module")
def in_process_lake(binance, endpoint, tmp_path_factory) -> dict[str, str]:
    """The reference: the same range as one in-process run (its own SQLite instance)."""
    env = deployment_env(tmp_path_factory.mktemp("in_process"), binance, endpoint, "in-process")
    done = subprocess.run(
        [BIN / "dagster", "job", "execute", "-m", "pipelines.definitions",
         "-j", "ingest_and_build", "--tags", json.dumps(RANGE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    objects = lake_objects(endpoint, "in-process")
    assert len([k for k in objects if k.startswith("ohlcv/")]) == len(PARTITIONS)
    return objects


def delete_queue(name: str) -> None:
    """The test's queue off the broker (durable queues outlive their workers)."""
    with Connection(Settings().celery_broker) as broker:
        broker.default_channel.queue_delete(name)


class Deployment:
    """A Celery deployment on a throwaway PostgreSQL database: its environment, instance,
    workers and the daemon that launches the backfill's runs."""

    def __init__(self, env: dict, workers: CeleryWorkers, prefix: str) -> None:
        self.env = env
        self.workers = workers
        self.prefix = prefix
        self.instance = dg.DagsterInstance.get()

    def backfill(self, job: str) -> None:
        """One run per symbol-month, queued at once as `dagster job backfill` queues them."""
        done = subprocess.run(
            [BIN / "dagster", "job", "backfill", "-j", job, "-w", "workspace.yaml",
             "--partitions", ",".join(PARTITIONS), "--noprompt"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    def runs(self) -> list[dg.DagsterRun]:
        return self.instance.get_runs()

    def wait_for_runs(self) -> list[dg.DagsterRun]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            runs = self.runs()
            if len(runs) == len(PARTITIONS) and all(r.is_finished for r in runs):
                return runs
            time.sleep(2)
        logs = {name: self.workers.log(name)[-2000:] for name in self.workers.processes}
        pytest.fail(f"runs not finished: {[r.status for r in self.runs()]}\n{logs}")

    def failures(self) -> str:
        """The errors the failed runs logged: to read when a test finds one."""
        errors = [
            f"{entry.step_key}: {entry.message}\n{entry.dagster_event.event_specific_data.error}"
            for run in self.runs()
            if run.status == dg.DagsterRunStatus.FAILURE
            for entry in self.instance.all_logs(run.run_id)
            if getattr(
                entry.dagster_event and entry.dagster_event.event_specific_data, "error", None
            )
        ]
        return "\n\n".join(errors)

    def assert_all_succeeded(self, runs: list[dg.DagsterRun]) -> None:
        statuses = [r.status for r in runs]
        assert statuses == [dg.DagsterRunStatus.SUCCESS] * len(PARTITIONS), self.failures()

    def executions(self, run_id: str) -> list[tuple[str, str, float]]:
        """(step, worker, when) for each time a worker took a step of the run."""
        taken = []
        for entry in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            if EXECUTING in entry.message:
                metadata = entry.dagster_event.event_specific_data.metadata
                taken.append((entry.step_key, metadata["Celery worker"].value, entry.timestamp))
        return taken

    def successes(self, run_id: str) -> dict[str, float]:
        """Each step that succeeded in the run: when."""
        entries = self.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        return {entry.step_key: entry.timestamp for entry in entries}


@pytest.fixture
def deployment(tmp_path, binance, endpoint, monkeypatch) -> Iterator[Deployment]:
    """A daemon, the exchange pool capped at one slot, and no worker yet."""
    prefix = f"celery-{uuid.uuid4().hex[:8]}"
    env = deployment_env(tmp_path, binance, endpoint, prefix)
    with throwaway_database() as database:
        shipped = yaml.safe_load((ROOT / "deploy" / "postgres" / "dagster.yaml").read_text())
        shipped["concurrency"]["pools"]["default_limit"] = 1
        Path(env["DAGSTER_HOME"], "dagster.yaml").write_text(yaml.safe_dump(shipped))
        env.update(
            DAGSTER_PG_URL=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}",
            CANDLESTACK_EXECUTOR="celery",
            # A queue of this test's own: no other worker on the broker takes its steps.
            CANDLESTACK_CELERY_QUEUE=f"test-{uuid.uuid4().hex[:8]}",
        )
        for name in ("DAGSTER_HOME", "DAGSTER_PG_URL"):
            monkeypatch.setenv(name, env[name])
        workers = CeleryWorkers(env, tmp_path / "workers")
        try:
            with running_daemon(env):
                yield Deployment(env, workers, prefix)
        finally:
            workers.stop()
            delete_queue(env["CANDLESTACK_CELERY_QUEUE"])


def test_a_backfill_fans_out_over_two_workers_and_equals_the_in_process_run(
    deployment, binance, endpoint, in_process_lake
):
    deployment.workers.start("worker1")
    deployment.workers.start("worker2")
    binance.reset_max_in_flight()
    deployment.backfill("ingest_and_build")
    runs = deployment.wait_for_runs()
    deployment.assert_all_succeeded(runs)
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(PARTITIONS)

    intervals = []
    for run in runs:
        executions = deployment.executions(run.run_id)
        succeeded = deployment.successes(run.run_id)
        # Every step of every run was executed by a worker, once.
        assert sorted(step for step, _, _ in executions) == sorted(succeeded)
        assert len(succeeded) > 8  # candles, seven timeframes of bars, features
        intervals += [(w, at, succeeded[step]) for step, w, at in executions]
    workers = {worker for worker, _, _ in intervals}
    assert workers == {f"worker1@{socket.gethostname()}", f"worker2@{socket.gethostname()}"}
    # The two workers ran steps at the same time...
    assert any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in intervals for b in intervals)
    # ...and yet the exchange never had two requests at once: the pool holds across workers.
    assert binance.max_in_flight == 1
    assert deployment.instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1

    assert lake_objects(endpoint, deployment.prefix) == in_process_lake


def first_step_taken(deployment: Deployment) -> tuple[str, str, str]:
    """(run id, step, worker) of the first step a worker takes."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for run in deployment.runs():
            for step, worker, _ in deployment.executions(run.run_id):
                return run.run_id, step, worker
        time.sleep(0.2)
    pytest.fail("no worker took a step")


def test_a_worker_killed_mid_step_has_the_step_run_again_by_the_other(
    deployment, binance, endpoint, in_process_lake
):
    deployment.workers.start("worker1")
    deployment.workers.start("worker2")
    binance.delay = 1.0  # a step fetching for several seconds: time to kill it mid-way
    try:
        deployment.backfill("ingest_candles")
        run_id, step, victim = first_step_taken(deployment)
        fetched = len(binance.requests)
        while len(binance.requests) == fetched:  # the step is fetching from the exchange
            time.sleep(0.1)
        killed_at = time.time()
        deployment.workers.kill(victim.split("@")[0])
    finally:
        binance.delay = 0.2
    runs = deployment.wait_for_runs()

    deployment.assert_all_succeeded(runs)
    takers = [worker for taken, worker, _ in deployment.executions(run_id) if taken == step]
    survivor = ({"worker1", "worker2"} - {victim.split("@")[0]}).pop()
    assert takers == [victim, f"{survivor}@{socket.gethostname()}"]
    assert deployment.successes(run_id)[step] > killed_at
    # Nothing half-written: exactly the candle files of a clean run, byte for byte.
    candles = {k: v for k, v in in_process_lake.items() if k.startswith("ohlcv/")}
    assert lake_objects(endpoint, deployment.prefix) == candles


def test_a_broker_restart_mid_backfill_delays_it_and_loses_nothing(
    deployment, endpoint, in_process_lake
):
    deployment.workers.start("worker1")
    deployment.workers.start("worker2")
    deployment.backfill("ingest_and_build")
    # Some steps done, most to come: the broker goes down with runs in flight.
    while not any(deployment.successes(r.run_id) for r in deployment.runs()):
        time.sleep(0.2)
    restart_rabbitmq(down_seconds=10)
    runs = deployment.wait_for_runs()

    deployment.assert_all_succeeded(runs)
    for name in ("worker1", "worker2"):
        assert "Connection to broker lost" in deployment.workers.log(name)
    assert lake_objects(endpoint, deployment.prefix) == in_process_lake


def test_a_worker_that_cannot_reach_the_object_store_fails_its_step_naming_the_endpoint(
    deployment,
):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
    deployment.workers.start("cut-off", AWS_ENDPOINT_URL=nowhere)
    done = subprocess.run(
        [BIN / "dagster", "asset", "materialize", "-m", "pipelines.definitions",
         "--select", "candles_1m", "--partition", PARTITIONS[0]],
        cwd=ROOT, env=deployment.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    (run,) = deployment.runs()
    assert run.status == dg.DagsterRunStatus.FAILURE
    (failure,) = deployment.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    error = failure.dagster_event.step_failure_data.error.to_string()
    assert f"cannot reach the lake's bucket '{BUCKET}' at {nowhere}" in error
    assert [worker for _, worker, _ in deployment.executions(run.run_id)] == [
        f"cut-off@{socket.gethostname()}"
    ]


def test_a_killed_run_process_is_failed_and_its_pool_slot_freed(deployment):
    """The run's process, not a worker, is killed: its step waits in the queue (no worker
    runs) with the exchange's slot claimed, and `python -m pipelines.stuck_runs` finds the
    run's recorded process gone."""
    run_process = subprocess.Popen(
        [BIN / "dagster", "asset", "materialize", "-m", "pipelines.definitions",
         "--select", "candles_1m", "--partition", PARTITIONS[0]],
        cwd=ROOT, env=deployment.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    storage = deployment.instance.event_log_storage
    deadline = time.monotonic() + TIMEOUT_S
    while not storage.get_concurrency_info(POOL).claimed_slots:
        assert time.monotonic() < deadline, "the step never claimed the exchange's slot"
        time.sleep(0.2)
    (run,) = deployment.runs()
    assert run.tags[WORKER_TAG].split(":")[:2] == [socket.gethostname(), str(run_process.pid)]
    os.killpg(run_process.pid, signal.SIGKILL)
    run_process.wait(timeout=30)

    done = subprocess.run(
        [BIN / "python", "-m", "pipelines.stuck_runs"],
        cwd=ROOT, env=deployment.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert deployment.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert not storage.get_concurrency_info(POOL).claimed_slots
