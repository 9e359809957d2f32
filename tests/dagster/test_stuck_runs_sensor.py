"""The stuck_runs sensor and command on a real instance: which runs are dead, which are left."""

import os
import socket
import uuid

import dagster as dg
import psutil
import pytest

from assets.tags import WORKER_TAG
from pipelines.sensors import stuck_runs
from pipelines.stuck_runs import Worker, main

POOL = "exchange-binance"
STEP = "candles_1m"


@pytest.fixture
def instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.event_log_storage.set_concurrency_slots(POOL, 10)
        yield instance


def _run(instance, status: dg.DagsterRunStatus, worker: Worker | None, slot: bool = True) -> str:
    run_id = str(uuid.uuid4())
    tags = {WORKER_TAG: str(worker)} if worker else {}
    instance.add_run(
        dg.DagsterRun(job_name="ingest_candles", run_id=run_id, status=status, tags=tags)
    )
    if slot:
        assert instance.event_log_storage.claim_concurrency_slot(POOL, run_id, STEP).is_claimed
    return run_id


def _exited_worker() -> Worker:
    process = psutil.Popen(["sleep", "60"])
    worker = Worker(socket.gethostname(), process.pid, process.create_time())
    process.kill()
    process.wait()
    return worker


def _holders(instance) -> set[str]:
    return instance.event_log_storage.get_concurrency_info(POOL).active_run_ids


def test_sensor_fails_runs_whose_process_is_gone_and_frees_their_slots(instance):
    here = Worker.current()
    started = dg.DagsterRunStatus.STARTED
    killed = _run(instance, started, _exited_worker())
    pid_reused = _run(instance, started, Worker(here.host, os.getpid(), here.started - 100))
    alive = _run(instance, started, here)
    elsewhere = _run(instance, started, Worker("another-host", 4242, here.started))
    untagged = _run(instance, started, None, slot=False)
    _run(instance, dg.DagsterRunStatus.FAILURE, here)  # ended, its slot leaked

    skip = stuck_runs(dg.build_sensor_context(instance=instance))

    assert skip.skip_message == (
        "2 dead run(s) failed and their slots freed, 1 ended run(s) had slots freed, "
        "2 unfinished run(s) not verifiable on this host"
    )
    status = {r: instance.get_run_by_id(r).status.value for r in (killed, pid_reused, alive)}
    assert status == {killed: "FAILURE", pid_reused: "FAILURE", alive: "STARTED"}
    assert instance.get_run_by_id(elsewhere).status == started
    assert instance.get_run_by_id(untagged).status == started
    (failure,) = instance.all_logs(killed, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert f"its process {Worker.of(instance.get_run_by_id(killed))} is gone" in failure.message
    assert _holders(instance) == {alive, elsewhere}

    # Nothing more to do on the next tick.
    skip = stuck_runs(dg.build_sensor_context(instance=instance))
    assert skip.skip_message.startswith("0 dead run(s) failed")


def test_command_lists_then_fails_a_run_named_by_hand(instance, capsys):
    here = Worker.current()
    killed = _run(instance, dg.DagsterRunStatus.STARTED, _exited_worker())
    elsewhere = _run(instance, dg.DagsterRunStatus.STARTED, Worker("another-host", 4242, 1.0))

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert f"run {killed} " in out and "would be failed" in out
    assert f"--run {elsewhere}" in out  # how to fail the run it cannot see
    assert _holders(instance) == {killed, elsewhere}
    assert instance.get_run_by_id(killed).status == dg.DagsterRunStatus.STARTED

    assert main(["--run", "no-such-run"]) == 2
    assert "no such run: no-such-run" in capsys.readouterr().err

    assert main(["--run", elsewhere]) == 0
    out = capsys.readouterr().out
    assert "marked dead by hand" in out
    assert {instance.get_run_by_id(r).status.value for r in (killed, elsewhere)} == {"FAILURE"}
    assert _holders(instance) == set()
    assert here.alive()
