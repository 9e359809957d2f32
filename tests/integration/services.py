"""The machine's real services, for the tests that deploy on them: a throwaway PostgreSQL
database, moto's S3 server on loopback, `dagster-celery` worker processes and the RabbitMQ
broker's restart."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from moto.server import ThreadedMotoServer

from tests.integration.daemon import BIN, ROOT

POSTGRES = "postgresql://postgres@127.0.0.1:5432"  # trust auth: any password is accepted
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_REGION": "us-east-1",
}
WORKER_READY_S = 60


@contextmanager
def throwaway_database(prefix: str = "candlestack") -> Iterator[str]:
    """A new database on the real server (its name), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{POSTGRES}/test", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES} is unreachable (CI provides it): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a loopback port: its endpoint URL."""
    # Its request log (werkzeug's, a line per request) would bury a failure's own output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class CeleryWorkers:
    """`dagster-celery worker start` processes, each in its own process group (killing a
    worker kills the child process its step runs in), one step at a time. Logs go to
    `logs`/NAME.log."""

    def __init__(self, env: dict, logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, **env: str) -> None:
        """Start worker `name` (host name `name@<host>`) and wait until it consumes."""
        # dagster-celery starts `celery` from the PATH: the venv's.
        path = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        with open(self.logs / f"{name}.log", "w") as sink:
            self.processes[name] = subprocess.Popen(
                [BIN / "dagster-celery", "worker", "start", "-A", "pipelines.workers",
                 "-n", name, "--", "--without-mingle", "--without-gossip"],
                cwd=ROOT, env={**self.env, "PATH": path, **env}, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + WORKER_READY_S
        while f"{name}@" not in self.log(name) or " ready." not in self.log(name):
            if self.processes[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        """`kill -9` the worker and everything it started."""
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait(timeout=30)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def restart_rabbitmq(down_seconds: float) -> None:
    """Stop the broker's application (every connection drops, durable queues and persistent
    messages stay on disk), wait, and start it again."""
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    try:
        time.sleep(down_seconds)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
