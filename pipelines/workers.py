"""The Celery deployment: the executor that CANDLESTACK_EXECUTOR=celery selects, and the app
its workers run. A worker takes one step at a time from the broker:

    dagster-celery worker start -A pipelines.workers -n worker1

(`make workers N=2` starts N of them). A worker loads this code location with its own
CANDLESTACK_* settings, so each needs the same settings as the run's process, the
instance's PostgreSQL (DAGSTER_HOME) and an s3:// lake: nothing on another worker's disk.
"""

import warnings

import dagster as dg
from celery.app import trace
from celery.exceptions import DuplicateTaskNameWarning
from dagster_celery import celery_executor
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task
from kombu import Queue

from assets.tags import WORKER_TAG
from candlestack.config import Settings
from pipelines.stuck_runs import Worker
from resources.deployment import settings

# A broker restart is waited out for this long before sending a step fails its run.
PUBLISH_RETRY_SECONDS = 300
RETRY_EACH_SECOND = {
    "max_retries": PUBLISH_RETRY_SECONDS,
    "interval_start": 0,
    "interval_step": 1,
    "interval_max": 1,
}


def celery_settings(settings: Settings) -> dict:
    """The Celery settings both sides use: the run's process sending steps, the workers."""
    return {
        # A step is acknowledged only once it ends, and put back if its worker process is
        # lost: a worker killed mid-step has the step run again by another, not dropped.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One step per worker at a time, none reserved behind a busy one. In a child process
        # (the prefork pool): the worker's own process keeps answering the broker's
        # heartbeats during a long step. In the solo pool a step blocks them, the broker drops
        # the connection and hands the step out again (the bench saw steps started twice).
        "worker_prefetch_multiplier": 1,
        "worker_pool": "prefork",
        "worker_concurrency": 1,
        "task_default_queue": settings.celery_queue,
        # dagster-celery gives up sending after ~1.5 s (3 retries): a broker restart would
        # fail the run. Sending now retries each second, and workers reconnect forever.
        "task_publish_retry_policy": RETRY_EACH_SECOND,
        # kombu also stops reconnecting after the connect timeout (4 s) in all.
        "broker_transport_options": {
            **RETRY_EACH_SECOND,
            "connect_retries_timeout": PUBLISH_RETRY_SECONDS,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
    }


def executor_config(settings: Settings) -> dict:
    """dagster-celery's executor config for this deployment."""
    return {
        "broker": settings.celery_broker,
        "backend": settings.celery_backend,
        "config_source": celery_settings(settings),
    }


class RecordedCeleryExecutor(CeleryExecutor):
    """dagster-celery's executor, with the run's process recorded as the in-process executor
    records it: a run process killed while its steps are on the workers leaves a run that
    pipelines.stuck_runs fails, and whose pool slots it frees."""

    def execute(self, plan_context, execution_plan):
        worker = str(Worker.current())
        plan_context.instance.add_run_tags(plan_context.run_id, {WORKER_TAG: worker})
        yield from super().execute(plan_context, execution_plan)


@dg.executor(
    name="celery",
    config_schema=celery_executor.config_schema,
    requirements=dg.multiple_process_executor_requirements(),
)
def recorded_celery_executor(init_context: dg.InitExecutorContext) -> RecordedCeleryExecutor:
    """Each step a Celery task on the workers; the run's process recorded (see above)."""
    base = celery_executor.executor_creation_fn(init_context)
    return RecordedCeleryExecutor(
        retries=base.retries,
        broker=base.broker,
        backend=base.backend,
        include=base.include,
        config_source=vars(base.config_source),
    )


def celery_app(settings: Settings):
    app = make_app(CeleryExecutor.for_cli(**executor_config(settings)).app_args())
    # dagster-celery's app listens on its own queue name: workers take the deployment's,
    # declared with the same priority bound as the queue the run's process sends to.
    queue = settings.celery_queue
    priorities = {"x-max-priority": app.conf.task_queue_max_priority}
    app.conf.task_queues = [Queue(queue, routing_key=f"{queue}.#", queue_arguments=priorities)]
    return app


# A step's result is its serialized events (tens of KB): a worker's log says that it ended,
# the instance's event log holds what it did.
trace.LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss"
# dagster-celery registers its task anew for every step it sends; the first registration
# is the one used, so the warning each repeat raises says nothing.
warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)

app = celery_app(settings)
execute_plan = create_task(app)
