"""Benchmark: scale.py's ingest, bars and features on Celery workers, beside in-process.

Run from the repository root, with RabbitMQ and Redis reachable (the defaults of
CANDLESTACK_CELERY_BROKER and _BACKEND) and, without --postgres, as root with PostgreSQL 15's
binaries (the bench starts a cluster of its own as user postgres):

    python bench/scale.py --executor celery [--workers 1 2] [--symbols 20] [--days 365]
                          [--per-run 20] [--concurrent 2] [--postgres SERVER]

A single run over the range gives Celery nothing to fan out (one step per asset), so here
the work of scale.py's ingest, bars and features stages is one daemon backfill of
candles_1m, the bars of every timeframe and the features (concurrent_backfill.py's), split
into runs of --per-run symbol-months (20: one month of every symbol per run), at most
--concurrent runs at a time, on PostgreSQL instance storage (a throwaway database on a
cluster the bench initialises and starts as user postgres, or on --postgres SERVER). The
same backfill runs first with CANDLESTACK_EXECUTOR=in_process (each run's steps in the run's
process), then with CANDLESTACK_EXECUTOR=celery and each --workers count: N `dagster-celery
worker start -A pipelines.workers -- --without-mingle --without-gossip` processes (one step
at a time, as pipelines/workers.py configures them; deaf to the broker's other workers),
each in a process group of its own, on a queue of their own (CANDLESTACK_CELERY_QUEUE,
unique to the invocation and the count), started and ready before the backfill is submitted
and stopped after it. The lake is a local folder: every worker runs on this machine.

Per configuration: wall time from submission to completion; CPU time (user + system) of
the daemon, its code server and run processes and the submission (this process is a
subreaper, so every descendant's CPU is counted once it has ended), of the workers (their
start-up apart), and, from submission to completion, the deltas of the machine's beam.smp
(RabbitMQ) and redis-server, read from /proc (their other clients count too), and of
PostgreSQL (the bench's own cluster; with --postgres, all postgres processes); steps
executed (from the instance) and by which process; and, against in-process, the overhead
per step: (CPU - in-process CPU) / steps and (wall - in-process wall) / steps. Figures only.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from concurrent_backfill import (
    backfill_instance,
    run_backfill,
    start_daemon,
    start_group,
    stop_group,
)
from scale import children_cpu, symbols

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_USER = "postgres"  # the server refuses to run as root
WORKER_APP = "pipelines.workers"
READY = " ready."
READY_SECONDS = 180.0
PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The servers' processes by /proc/<pid>/comm: each is its own family (its children reaped
# by it), so own + reaped-children CPU summed over the family is consistent between reads.
SERVICES = {"beam.smp": "rabbitmq", "redis-server": "redis", "postgres": "postgresql"}
WORKER_NAME = "bench{index}-{token}"
# The bench's workers take no part in the broker's other workers' gossip and mingle.
WORKER_ARGS = ("--without-mingle", "--without-gossip")


@dataclass
class Config:
    label: str
    workers: int = 0
    wall: float = 0.0
    cpu_dagster: float = 0.0  # submission, daemon, code server, run processes
    cpu_workers: float = 0.0  # the workers' whole lives, start-up included
    cpu_startup: float = 0.0  # the workers until ready
    services: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    steps_by: Counter = field(default_factory=Counter)
    runs: int = 0
    failed: int = 0
    status: str = ""

    @property
    def cpu(self) -> float:
        return self.cpu_dagster + self.cpu_workers + sum(self.services.values())


def _stat(pid: str) -> tuple[str, int, float] | None:
    """(comm, process group, own + reaped children's CPU seconds) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, int(rest[2]), sum(int(t) for t in rest[11:15]) / CLOCK_TICKS


def _processes() -> list[tuple[int, str, int, float]]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and (stat := _stat(pid)):
            found.append((int(pid), *stat))
    return found


def services_cpu(postgres_group: int | None) -> dict[str, float]:
    """CPU seconds of the servers: PostgreSQL's processes in `postgres_group` (the bench's
    own server), or, without one, all of the machine's."""
    totals = dict.fromkeys(SERVICES.values(), 0.0)
    for _, comm, pgid, cpu in _processes():
        if comm in SERVICES and (comm != "postgres" or postgres_group in (None, pgid)):
            totals[SERVICES[comm]] += cpu
    return totals


@contextmanager
def postgres_server(tmp: Path):
    """(server URL, process group): a PostgreSQL cluster of the bench's own in `tmp`, on a
    free port, its default settings; stopped (fast shutdown) afterwards."""
    data = tmp / "postgres"
    data.mkdir()
    shutil.chown(tmp, POSTGRES_USER)
    shutil.chown(data, POSTGRES_USER)
    as_postgres = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", POSTGRES_USER, "--"]
    subprocess.run(
        [*as_postgres, POSTGRES_BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = [POSTGRES_BIN / "postgres", "-D", data, "-p", str(port), "-k", data]
    proc = start_group([*as_postgres, *server, "-c", "listen_addresses=127.0.0.1"], {})
    url = f"postgresql://postgres@127.0.0.1:{port}"
    ready = [POSTGRES_BIN / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]
    while subprocess.run(ready).returncode:
        if proc.poll() is not None:
            sys.exit("the bench's PostgreSQL server did not start")
        time.sleep(0.2)
    try:
        yield url, proc.pid
    finally:
        stop_group(proc, signal.SIGINT)


def group(pgid: int) -> list[tuple[int, float]]:
    """(pid, CPU seconds) of the live processes of a process group."""
    return [(pid, cpu) for pid, _, pg, cpu in _processes() if pg == pgid]


def start_workers(env: dict, count: int, token: str, tmp: Path) -> tuple[list, dict[int, str]]:
    """`count` workers, waited for until each has logged that it is ready: their Popen
    objects and {pid: name} of every process in their groups."""
    cli = Path(sys.executable).parent / "dagster-celery"
    procs, logs = [], []
    for index in range(1, count + 1):
        name = WORKER_NAME.format(index=index, token=token)
        log = tmp / f"worker{index}.log"
        command = [cli, "worker", "start", "-A", WORKER_APP, "-n", name, "--", *WORKER_ARGS]
        procs.append(start_group(command, env, log))
        logs.append(log)
    deadline = time.monotonic() + READY_SECONDS
    while not all(READY in log.read_text() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for proc in procs:
                stop_group(proc)
            sys.exit(
                "a worker did not start:\n" + "\n".join(log.read_text()[-2000:] for log in logs)
            )
        time.sleep(0.2)
    pids = {pid: f"worker{i}" for i, p in enumerate(procs, 1) for pid, _ in group(p.pid)}
    return procs, pids


def steps_by_process(runs: list, home: str, names: dict[int, str]) -> Counter:
    """Steps started, by the name of the process that ran them (a worker, or the run's)."""
    import dagster as dg

    counts: Counter = Counter()
    with dg.DagsterInstance.from_config(home) as instance:
        for run in runs:
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                counts[names.get(entry.dagster_event.pid, "run processes")] += 1
    return counts


def measure(args, label: str, workers: int, token: str, names: list[str], first, last) -> Config:
    figures = Config(label, workers)
    with backfill_instance(args.server, args.concurrent, names, first, args.per_run) as (
        env,
        tmp,
    ):
        env.update(
            CANDLESTACK_EXECUTOR="celery" if workers else "in_process",
            CANDLESTACK_CELERY_QUEUE=f"bench-{token}-w{workers}",
            # The workers' `celery` command is beside this python.
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        cpu_start = children_cpu()
        worker_procs, worker_pids = start_workers(env, workers, token, tmp) if workers else ([], {})
        figures.cpu_startup = sum(cpu for p in worker_procs for _, cpu in group(p.pid))
        daemon = start_daemon(env, tmp / "daemon.log")
        services_before = services_cpu(args.postgres_group)
        try:
            figures.wall, figures.status, runs = run_backfill(env, first, last)
        finally:
            services_after = services_cpu(args.postgres_group)
            before_workers = children_cpu()
            for proc in worker_procs:
                stop_group(proc)
            figures.cpu_workers = children_cpu() - before_workers
            stop_group(daemon)
        figures.cpu_dagster = children_cpu() - cpu_start - figures.cpu_workers
        figures.services = {k: services_after[k] - services_before[k] for k in services_before}
        figures.runs = len(runs)
        figures.failed = sum(r.status.value == "FAILURE" for r in runs)
        figures.steps_by = steps_by_process(runs, env["DAGSTER_HOME"], worker_pids)
        figures.steps = sum(figures.steps_by.values())
        if figures.failed or "FAIL" in figures.status:
            log = (tmp / "daemon.log").read_text().splitlines()[-40:]
            print("\n".join(log))
    return figures


def report(config: Config, baseline: Config | None) -> None:
    services = "  ".join(f"{k} {v:.1f} s" for k, v in config.services.items())
    by = ", ".join(f"{k} {v}" for k, v in sorted(config.steps_by.items()))
    print(
        f"\n{config.label}: {config.wall:.1f} s wall, {config.cpu:.1f} s cpu in all; "
        f"runs {config.runs} ({config.failed} failed), status {config.status}\n"
        f"   cpu: daemon, code server, runs, submission {config.cpu_dagster:.1f} s; "
        f"workers {config.cpu_workers:.1f} s (start-up {config.cpu_startup:.1f} s); {services}\n"
        f"   steps {config.steps} ({by})",
        flush=True,
    )
    if baseline and config.steps:

        def per_step(now: float, then: float) -> str:
            return f"{(now - then) / config.steps * 1000:+.0f} ms"

        def processes(c: Config) -> float:
            return c.cpu_dagster + c.cpu_workers

        def broker(c: Config) -> float:
            return c.services["rabbitmq"] + c.services["redis"]

        print(
            f"   against {baseline.label}: {baseline.wall / config.wall:.2f}x the speed; "
            f"overhead per step {per_step(config.cpu, baseline.cpu)} cpu "
            f"(Dagster's processes {per_step(processes(config), processes(baseline))}, "
            f"PostgreSQL {per_step(config.services['postgresql'], baseline.services['postgresql'])}"
            f", RabbitMQ + Redis {per_step(broker(config), broker(baseline))}), "
            f"{per_step(config.wall, baseline.wall)} wall",
            flush=True,
        )


def run(args) -> int:
    """scale.py --executor celery: the in-process backfill, then one per --workers count."""
    # Orphans (a worker's celery process, the daemon's code server) are reaped here, so
    # their CPU reaches RUSAGE_CHILDREN.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    names = symbols(args.symbols)
    last = datetime.now(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=args.days - 1)
    token = uuid.uuid4().hex[:8]
    print(
        f"backfill of candles_1m, bars and features: {args.days} days ({first}..{last}) x "
        f"{args.symbols} symbols, runs of {args.per_run} symbol-months, {args.concurrent} "
        f"at a time, PostgreSQL instance storage ({args.postgres or 'a server of its own'}), "
        "local lake; "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        if args.postgres:
            args.server, args.postgres_group = args.postgres, None
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            args.server, args.postgres_group = stack.enter_context(postgres_server(tmp))
        baseline = None
        for workers in [0, *args.workers]:
            label = f"celery, {workers} worker{'s' * (workers > 1)}" if workers else "in-process"
            print(f"\n== {label}: load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
            config = measure(args, label, workers, token, names, first, last)
            report(config, baseline)
            baseline = baseline or config
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"\n1-min load average: {load} (other work on the machine skews the figures)")
    return 0
