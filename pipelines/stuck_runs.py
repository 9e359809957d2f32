"""Runs whose process died: failed, and their exchange-pool slots freed, within minutes.

A `kill -9`'d CLI backfill (or a killed run worker) stays STARTED and keeps the pool slots it
claimed: Dagster's CLI and local run launcher cannot probe a run's process, and run
monitoring only fails such a run after max_runtime_seconds (hours). Every run of this code
location records the process executing it (pipelines.dagster_adapter, tag `candlestack/run_worker`:
host, pid and process start time, since a pid alone is reused), so a run whose process on
this host is gone is known dead. A run on another host cannot be probed from here, and is
named, not touched.

    python -m pipelines.stuck_runs              fail dead runs, free their slots, report
    python -m pipelines.stuck_runs --list       report only
    python -m pipelines.stuck_runs --run ID     fail a run you know is dead (any host)

The same cleanup runs in the `stuck_runs` sensor while the daemon runs, and in a step that
waits for a pool held by dead runs (pipelines.dagster_adapter).
"""

import argparse
import socket
import sys
from collections.abc import Collection
from dataclasses import dataclass, field

import dagster as dg
import psutil

from assets.tags import WORKER_TAG

UNFINISHED = (
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)
COMMAND = "python -m pipelines.stuck_runs"


@dataclass(frozen=True)
class Worker:
    """The process executing a run."""

    host: str
    pid: int
    started: float  # the process's start time, epoch seconds

    @classmethod
    def current(cls) -> "Worker":
        process = psutil.Process()
        return cls(socket.gethostname(), process.pid, process.create_time())

    @classmethod
    def of(cls, run: dg.DagsterRun) -> "Worker | None":
        tag = run.tags.get(WORKER_TAG)
        if tag is None:
            return None
        host, pid, started = tag.rsplit(":", 2)
        return cls(host, int(pid), float(started))

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    def alive(self) -> bool | None:
        """Whether the process still runs; None on another host, where it cannot be seen."""
        if self.host != socket.gethostname():
            return None
        try:
            process = psutil.Process(self.pid)
            # A different start time is another process that was given the same pid.
            return (
                abs(process.create_time() - self.started) < 0.5
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return False


@dataclass
class Cleanup:
    failed: list[str] = field(default_factory=list)  # dead runs, now FAILURE
    freed: list[str] = field(default_factory=list)  # ended runs whose slots were still held
    unknown: list[str] = field(default_factory=list)  # unfinished, process not visible here

    def lines(self) -> list[str]:
        return [*self.failed, *self.freed, *self.unknown]

    def summary(self) -> str:
        return (
            f"{len(self.failed)} dead run(s) failed and their slots freed, "
            f"{len(self.freed)} ended run(s) had slots freed, "
            f"{len(self.unknown)} unfinished run(s) not verifiable on this host"
        )


def pool_holders(instance: dg.DagsterInstance) -> set[str]:
    """Runs holding or waiting for a slot of any pool."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return set()
    return set(storage.get_concurrency_run_ids())


def describe(run: dg.DagsterRun) -> str:
    worker = Worker.of(run)
    where = f"process {worker}" if worker else "no recorded process"
    return f"run {run.run_id} ({run.job_name}, {run.status.value}, {where})"


def clean_up(
    instance: dg.DagsterInstance,
    run_ids: Collection[str] | None = None,
    *,
    force: Collection[str] = (),
    dry_run: bool = False,
) -> Cleanup:
    """Fail the unfinished runs whose process is gone (and those in `force`), free the slots
    of every ended run still holding some. Looks at `run_ids` if given, else at every
    unfinished run and every pool holder."""
    holders = pool_holders(instance)
    if run_ids is None:
        unfinished = instance.get_run_ids(dg.RunsFilter(statuses=list(UNFINISHED)))
        run_ids = {*unfinished, *holders, *force}
    cleanup = Cleanup()
    for run_id in sorted(run_ids):
        run = instance.get_run_by_id(run_id)
        if run is None:
            continue
        if run.status in UNFINISHED:
            worker = Worker.of(run)
            alive = worker.alive() if worker else None
            if run_id in force:
                reason = f"marked dead by hand ({COMMAND} --run)"
            elif alive is False:
                reason = f"its process {worker} is gone"
            else:
                if alive is None:
                    cleanup.unknown.append(
                        f"{describe(run)}: cannot tell from {socket.gethostname()} whether it "
                        f"still runs; if it does not, `{COMMAND} --run {run_id}`"
                    )
                continue
            if not dry_run:
                instance.report_run_failed(run, f"Failed by candlestack: {reason}.")
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            done = "would be failed" if dry_run else "failed"
            cleanup.failed.append(f"{describe(run)} {done}, its slots freed: {reason}")
        elif run_id in holders:
            if not dry_run:
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            cleanup.freed.append(
                f"{describe(run)} held pool slots after it ended: "
                + ("they would be freed" if dry_run else "freed")
            )
    return cleanup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="report only, change nothing")
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RUN_ID",
        help="fail this unfinished run and free its slots, wherever it ran (repeatable)",
    )
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        missing = [r for r in args.run if instance.get_run_by_id(r) is None]
        if missing:
            print(f"no such run: {', '.join(missing)}", file=sys.stderr)
            return 2
        cleanup = clean_up(instance, force=set(args.run), dry_run=args.list)
    for line in cleanup.lines():
        print(line)
    print(cleanup.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
