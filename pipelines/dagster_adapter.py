"""The one module that imports Dagster's private API (`dagster._...`); nothing else may.

Each import here is something dagster 1.13 exposes no public name for:
- the executor below copies part of Dagster's InProcessExecutor, and executors are only
  pluggable through its private execution-plan internals;
- AssetCheckExecutionRecordStatus (the metrics endpoint's check results): the public
  `fetch_asset_check_executions`-style records carry it, but dagster does not export the type;
- SerializableErrorInfo (a failed run's error, which alerts read): the type of a public
  field, not exported either.
An upgrade of dagster is checked here first.

Dagster's in-process executor, with the run's process recorded and a pool wait that ends.

Four things Dagster 1.13's in-process executor does not do, all about a step waiting for an
exchange pool's slot (each exchange is a pool, see dagster.yaml):
- it records nothing that tells a live run from one whose process was killed, so slots
  claimed by a `kill -9`'d backfill stay claimed for hours (pipelines.stuck_runs);
- a SIGTERM or Ctrl-C while waiting is captured and never acted on: the wait goes on;
- its wait never sleeps (InstanceConcurrencyContext.interval_to_next_pending_claim_check
  returns min(0, ...)), so a waiting run spins a core and polls the storage;
- on SQLite storage, two runs claiming at the same instant can both be given the last slot:
  the storage reads the free slots, then writes, and SQLite ignores its SELECT ... FOR
  UPDATE. Claims here are serialised by a lock file beside the storage.
The execution itself is Dagster's, unchanged.
"""

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.execution.api import ExecuteRunWithPlanIterable
from dagster._core.execution.context.system import PlanExecutionContext, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import PlanExecutionContextManager
from dagster._core.execution.plan.execute_plan import inner_plan_execution_iterator
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.storage.asset_check_execution_record import (
    COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES,
    AssetCheckExecutionRecordStatus,
)
from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._utils.error import SerializableErrorInfo
from dagster._utils.interrupts import check_captured_interrupt

from assets.tags import WORKER_TAG
from pipelines.stuck_runs import COMMAND, Worker, clean_up, describe

# The private names the rest of the code location uses, re-exported from here only.
__all__ = [
    "COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES",
    "AssetCheckExecutionRecordStatus",
    "SerializableErrorInfo",
    "worker_tracking_executor",
]

# How often a waiting step re-checks an interrupt (seconds), and looks at who holds its pool.
INTERRUPT_CHECK_S = 1.0
HOLDERS_CHECK_S = 30.0


class PoolWait(InstanceConcurrencyContext):
    """Dagster's pool claims, plus: an interrupt ends the wait, the wait sleeps, and a full
    pool's holders are named in the run's log, the dead ones failed and their slots freed."""

    def __init__(self, job_context: PlanExecutionContext):
        super().__init__(job_context.instance, job_context.dagster_run)
        self._job_context = job_context
        self._holders_checked: dict[str, float] = {}

    def claim(self, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
        if check_captured_interrupt():
            raise DagsterExecutionInterruptedError(
                f"Interrupted while {step_key} waited for a slot of pool {concurrency_key}"
            )
        with self._claims_serialised():
            claimed = super().claim(concurrency_key, step_key, step_priority)
        now = time.monotonic()
        if not claimed and now - self._holders_checked.get(concurrency_key, -1e9) >= (
            HOLDERS_CHECK_S
        ):
            self._holders_checked[concurrency_key] = now
            claimed = self._free_dead_holders(concurrency_key, step_key)
        return claimed

    def free_step(self, step_key: str) -> None:
        # Freeing assigns the slot to a waiting step: the same read-then-write as a claim.
        with self._claims_serialised():
            super().free_step(step_key)

    def __exit__(self, *exc_info) -> None:
        with self._claims_serialised():
            super().__exit__(*exc_info)

    @contextmanager
    def _claims_serialised(self) -> Iterator[None]:
        storage = self._instance.event_log_storage
        if not isinstance(storage, SqliteEventLogStorage):
            yield  # PostgreSQL locks the slot rows it reads
            return
        # _base_dir: the folder of the storage's index.db, shared by every run of the instance.
        with open(os.path.join(storage._base_dir, "pool_claims.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _free_dead_holders(self, pool: str, step_key: str) -> bool:
        """Fails the pool's holders whose process is gone, logs who holds it; claims again
        if that freed a slot."""
        instance = self._job_context.instance
        log = self._job_context.log
        info = instance.event_log_storage.get_concurrency_info(pool)
        waiting = {step.run_id for step in info.pending_steps}
        cleanup = clean_up(instance, (info.active_run_ids | waiting) - {self._run_id})
        for line in cleanup.failed + cleanup.freed:
            log.warning(f"Pool {pool}: {line}")
        if cleanup.failed or cleanup.freed:
            self._pending_timeouts.pop(step_key, None)
            with self._claims_serialised():
                if super().claim(pool, step_key):
                    return True
            info = instance.event_log_storage.get_concurrency_info(pool)  # who holds it now
        holders = [instance.get_run_by_id(r) for r in sorted(info.active_run_ids)]
        log.warning(
            f"{step_key} waits for pool {pool}: {len(info.claimed_slots)} of {info.limit} "
            f"slots held by {'; '.join(describe(r) for r in holders if r)}. A run whose "
            f"process is gone is failed and its slots freed by this wait (same host), by the "
            f"stuck_runs sensor or by `{COMMAND}` (`--run ID` for a run on another host); "
            f"`dagster instance concurrency set {pool} N` changes the limit."
        )
        return False

    def interval_to_next_pending_claim_check(self) -> float:
        if not self._pending_claims:
            return 0.0
        until = min((t - time.time() for t in self._pending_timeouts.values()), default=0.0)
        return min(INTERRUPT_CHECK_S, max(0.0, until))


def _execution_iterator(
    job_context: PlanExecutionContext, execution_plan: ExecutionPlan
) -> Iterator[DagsterEvent]:
    with PoolWait(job_context) as pool_wait:
        yield from inner_plan_execution_iterator(job_context, execution_plan, pool_wait)


class WorkerTrackingExecutor(InProcessExecutor):
    # Dagster's InProcessExecutor.execute, with its run tagged and its iterator replaced.
    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[DagsterEvent]:
        worker = Worker.current()
        plan_context.instance.add_run_tags(plan_context.run_id, {WORKER_TAG: str(worker)})
        steps = execution_plan.step_keys_to_execute
        yield DagsterEvent.engine_event(
            plan_context,
            f"Executing steps in process {worker}",
            event_specific_data=EngineEventData.in_process(os.getpid(), steps),
        )
        yield from ExecuteRunWithPlanIterable(
            execution_plan=plan_context.execution_plan,
            iterator=_execution_iterator,
            execution_context_manager=PlanExecutionContextManager(
                job=plan_context.job,
                retry_mode=plan_context.retry_mode,
                execution_plan=plan_context.execution_plan,
                run_config=plan_context.run_config,
                dagster_run=plan_context.dagster_run,
                instance=plan_context.instance,
                raise_on_error=plan_context.raise_on_error,
                output_capture=plan_context.output_capture,
                step_dependency_config=self.step_dependency_config,
            ),
        )
        yield DagsterEvent.engine_event(
            plan_context,
            f"Finished steps in process {worker}",
            event_specific_data=EngineEventData.in_process(os.getpid(), steps),
        )


@dg.executor(name="in_process", config_schema=dg.in_process_executor.config_schema)
def worker_tracking_executor(init_context: dg.InitExecutorContext) -> WorkerTrackingExecutor:
    """Executes all steps in the run's process, recording that process (see module doc)."""
    base = dg.in_process_executor.executor_creation_fn(init_context)
    return WorkerTrackingExecutor(base.retries, base.step_dependency_config)
