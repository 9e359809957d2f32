"""The instance and deployment files parse, pass Dagster's own config schema, and agree with
each other: the same run queue everywhere, services and ports that reference each other.
(Docker and Kubernetes are not run here; this is what can be checked without them.)"""

import ast
import importlib.util
import json
import re
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from dagster._config import Shape, validate_config
from dagster._core.instance.config import (
    dagster_instance_config,
    dagster_instance_config_schema,
    validate_concurrency_config,
)
from dagster_k8s import K8sRunLauncher
from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

from candlestack.config import ENV_PREFIX, Settings
from candlestack.lake.s3 import S3Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# What every instance must share: the queue, the run and exchange-pool limits, monitoring.
SHARED_SECTIONS = ("run_coordinator", "concurrency", "run_monitoring", "telemetry")
# The services that load the code location and the instance (a worker executes steps).
DAGSTER_SERVICES = ("code", "daemon", "webserver", "worker")
# What the Celery deployment adds: its broker, its results, the lake's object store and the
# one-shot service that makes the lake's bucket.
CELERY_SERVICES = ("rabbitmq", "redis", "minio", "bucket")
WORKER_COMMAND = ["dagster-celery", "worker", "start", "-A", "pipelines.workers"]
# The passwords `docker compose up` is given (it refuses to start without them).
COMPOSE_SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "RABBITMQ_PASSWORD": "mq-secret",
    "MINIO_ROOT_PASSWORD": "minio-secret",
}
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")
LIVE_COMMAND = ["python", "-m", "candlestack.live"]
HEALTH_CHECK = ["python", "-m", "candlestack.live_status"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's substitution: ${X}, ${X:-default}, ${X:?error} (unset: refused), $$ ($)."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, kind, rest = match.groups()
        if environ.get(name):
            return environ[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return COMPOSE_VARIABLE.sub(substitute, value)


def compose_env(service: dict, environ: dict[str, str] = COMPOSE_SECRETS) -> dict[str, str]:
    return {k: interpolate(str(v), environ) for k, v in service["environment"].items()}


def extra_manifest(helm: dict, name: str) -> dict:
    (manifest,) = [m for m in helm["extraManifests"] if m["metadata"]["name"] == name]
    return manifest


def camel_to_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def snake_keys(values: dict) -> dict:
    return {camel_to_snake(k): v for k, v in values.items()}


@pytest.fixture(scope="module")
def local() -> dict:
    config, _ = dagster_instance_config(str(ROOT))
    return config


@pytest.fixture(scope="module")
def postgres() -> dict:
    config, _ = dagster_instance_config(str(DEPLOY / "postgres"))
    return config


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(DEPLOY / "docker-compose.yaml")


@pytest.fixture(scope="module")
def helm() -> dict:
    return load(DEPLOY / "helm" / "values.yaml")


def test_sqlite_by_default_postgres_selected_by_dagster_home(local, postgres):
    assert list(local["storage"]) == ["sqlite"]
    assert postgres["storage"] == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    for section in SHARED_SECTIONS:
        assert postgres[section] == local[section], section


def test_run_queue_pools_and_monitoring(local):
    assert local["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert local["concurrency"]["runs"]["max_concurrent_runs"] >= 1
    pools = local["concurrency"]["pools"]
    assert pools["default_limit"] >= 1 and pools["granularity"] == "op"
    monitoring = local["run_monitoring"]
    assert monitoring["enabled"] is True
    # The local run launcher cannot resume a run; Dagster refuses resume attempts with it.
    assert monitoring.get("max_resume_run_attempts", 0) == 0
    assert monitoring["max_runtime_seconds"] > 0  # how a run on another host that died ends


def test_exchange_calls_share_one_pool_per_exchange():
    from assets.dry_run import dry_run_assets
    from assets.market_data import EXCHANGE_POOL, candles_1m, markets

    assert EXCHANGE_POOL == "exchange-synthetic"  # the settings' exchange, here the default
    for asset in (candles_1m, markets, *dry_run_assets):
        assert {node.pool for node in asset.node_def.iterate_op_defs()} == {EXCHANGE_POOL}


def test_ui_binds_loopback_unless_told():
    recipe = re.search(r"^ui:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "dagster dev -h 127.0.0.1" in recipe
    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"  # dagster dev and dagster-webserver without -h


def test_compose_services_and_loopback_ui(compose):
    services = compose["services"]
    assert set(services) == {"postgres", *CELERY_SERVICES, *DAGSTER_SERVICES, "live"}
    # The UI is published on loopback only; nothing else is published at all.
    assert services["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    assert [name for name, s in services.items() if "ports" in s] == ["webserver"]
    images = {services[name]["image"] for name in (*DAGSTER_SERVICES, "live")}
    assert images == {"candlestack:latest"}
    for name in (*DAGSTER_SERVICES, "live"):
        build = services[name]["build"]
        dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile == DEPLOY / "Dockerfile"


def test_compose_wires_the_postgres_instance(compose, postgres):
    services = compose["services"]
    db = services["postgres"]["environment"]
    (pg_env_var,) = [v["env"] for v in postgres["storage"]["postgres"].values()]
    for name in DAGSTER_SERVICES:
        env = services[name]["environment"]
        url = env[pg_env_var]
        assert url.startswith("postgresql+psycopg2://"), url
        user, host, database = re.fullmatch(r"[^/]+//([^:]+):.*@([^:/]+):5432/(\w+)", url).groups()
        assert (user, host, database) == (db["POSTGRES_USER"], "postgres", db["POSTGRES_DB"])
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        # Only settings candlestack knows: an unknown CANDLESTACK_* fails the code location.
        known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
        assert {k for k in env if k.startswith(ENV_PREFIX)} <= known


def seconds(duration: str) -> int:
    return int(re.fullmatch(r"(\d+)s", duration).group(1))


def test_compose_live_collector(compose):
    services = compose["services"]
    live, code = services["live"], services["code"]
    # Started only when asked (--profile live): it needs CANDLESTACK_SOURCE=ccxt.
    assert live["profiles"] == ["live"]
    assert live["command"] == LIVE_COMMAND
    assert importlib.util.find_spec(LIVE_COMMAND[-1]) is not None
    # The code server's settings and lake: its live_feed sensor reads the status file there.
    assert live["environment"] == code["environment"]
    assert live["volumes"] == code["volumes"]
    assert live["restart"] == "unless-stopped"
    assert seconds(live["stop_grace_period"]) >= 60  # a write in flight, not Docker's 10 s
    check = live["healthcheck"]
    assert check["test"] == ["CMD", *HEALTH_CHECK]
    assert importlib.util.find_spec(HEALTH_CHECK[-1]) is not None


def test_compose_refuses_to_start_without_its_passwords(compose):
    services = compose["services"]
    for name in COMPOSE_SECRETS:
        environ = {k: v for k, v in COMPOSE_SECRETS.items() if k != name}
        with pytest.raises(KeyError, match=name):
            for service in services.values():
                if "environment" in service:
                    compose_env(service, environ)


def test_compose_celery_worker(compose):
    services = compose["services"]
    worker, code = services["worker"], services["code"]
    command = worker["command"]
    assert command[: len(WORKER_COMMAND)] == WORKER_COMMAND
    # The pool and one step at a time come from pipelines/workers.py's settings, not flags.
    assert "--" not in command
    # dagster-celery appends @%h to the name: each replica's container hostname keeps the
    # names of `--scale worker=N` apart. A fixed container name would refuse to scale.
    assert "@" not in command[command.index("-n") + 1]
    assert "container_name" not in worker and "profiles" not in worker  # `up` starts it
    # The app module the workers load (-A), with its `app`.
    spec = importlib.util.find_spec(command[command.index("-A") + 1])
    tree = ast.parse(Path(spec.origin).read_text())
    assigned = {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    assert "app" in assigned
    # The run's process (in `code`) and the workers: the same image, settings and volumes.
    assert worker["image"] == code["image"]
    assert worker["environment"] == code["environment"]
    assert worker["volumes"] == code["volumes"]
    assert worker["restart"] == "unless-stopped"
    # SIGTERM is Celery's warm shutdown, which lets the step in flight finish.
    assert seconds(worker["stop_grace_period"]) >= 60
    conditions = {name: d["condition"] for name, d in worker["depends_on"].items()}
    assert conditions == {
        "postgres": "service_healthy",
        "rabbitmq": "service_healthy",
        "redis": "service_healthy",
        "bucket": "service_completed_successfully",
    }
    # The run's process sends steps to the broker and reads their results and the lake.
    assert code["depends_on"] == worker["depends_on"]


def test_compose_celery_settings_reach_the_broker_results_and_lake(compose, monkeypatch):
    services = compose["services"]
    env = compose_env(services["worker"])
    settings = Settings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert settings.executor == "celery"
    assert Settings.from_env({}).celery_queue == settings.celery_queue  # the workers' default
    # The broker: RabbitMQ's service, as the user it creates (guest may not log in remotely).
    mq = compose_env(services["rabbitmq"])
    broker = urlsplit(settings.celery_broker)
    assert (broker.scheme, broker.hostname, broker.port) == ("pyamqp", "rabbitmq", 5672)
    assert (broker.username, broker.password) == (
        mq["RABBITMQ_DEFAULT_USER"],
        mq["RABBITMQ_DEFAULT_PASS"],
    )
    assert broker.username != "guest"
    assert COMPOSE_SECRETS["RABBITMQ_PASSWORD"] in settings.secrets()  # masked in alerts
    backend = urlsplit(settings.celery_backend)
    assert (backend.scheme, backend.hostname, backend.port) == ("redis", "redis", 6379)
    # The lake: a bucket of the MinIO service, which the bucket service makes, reached with
    # MinIO's user through the standard AWS environment.
    assert isinstance(settings.lake, str) and settings.lake.startswith("s3://")
    bucket = settings.lake.removeprefix("s3://").split("/")[0]
    for name, value in env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    s3 = S3Settings.from_env()
    endpoint = urlsplit(s3.endpoint)
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    minio = compose_env(services["minio"])
    assert (s3.access_key, s3.secret_key) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    assert services["minio"]["command"] == ["server", "/data"]
    maker = services["bucket"]
    (script,) = [interpolate(line, COMPOSE_SECRETS) for line in maker["command"]]
    assert f"mc alias set lake {s3.endpoint} {s3.access_key} " in script
    assert '"$MINIO_ROOT_PASSWORD"' in script  # the shell's, from the service's environment
    assert compose_env(maker)["MINIO_ROOT_PASSWORD"] == s3.secret_key
    assert f"mc mb --ignore-existing lake/{bucket}" in script
    assert maker["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "restart" not in maker  # it runs once and exits


def test_compose_health_checks_behind_every_wait(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, wait in service.get("depends_on", {}).items():
            if wait["condition"] == "service_healthy":
                assert services[dependency]["healthcheck"]["test"], (name, dependency)


def test_compose_broker_keeps_waiting_steps_across_a_restart(compose, postgres):
    mq = compose["services"]["rabbitmq"]
    # RabbitMQ keeps its data under its node name, rabbit@<hostname>: a fixed hostname and a
    # volume keep the durable queue and its steps when the container is recreated.
    assert mq["hostname"] == "rabbitmq"
    assert any(v.endswith(":/var/lib/rabbitmq") for v in mq["volumes"])
    # A step unacknowledged past consumer_timeout is redelivered: not before a run's limit.
    timeout = re.search(
        r"consumer_timeout (\d+)", mq["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    )
    max_runtime = postgres["run_monitoring"]["max_runtime_seconds"]
    assert int(timeout.group(1)) >= max_runtime * 1000
    assert "--appendonly" in compose["services"]["redis"]["command"]


def test_make_workers_starts_the_compose_worker_command(compose):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^N \?= 2$", makefile, re.M)  # the documented default
    assert re.search(r"^workers: setup$", makefile, re.M)
    recipe = re.search(r"^workers:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert " ".join(WORKER_COMMAND) + " -n worker$$i &" in recipe
    assert "seq 1 $(N)" in recipe and "wait" in recipe
    assert "dagster-celery" in (ROOT / "pyproject.toml").read_text()  # in the image too


def test_dockerfile_ships_the_postgres_instance_and_workspace(compose):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    home = re.search(r"DAGSTER_HOME=(\S+)", dockerfile).group(1)
    copies = dict(line.split()[1:3] for line in dockerfile.splitlines() if line.startswith("COPY "))
    assert copies["deploy/postgres/dagster.yaml"] == "${DAGSTER_HOME}/dagster.yaml"
    assert copies["deploy/workspace.yaml"] == "./deploy/workspace.yaml"
    for source in copies:
        assert (ROOT / source).exists(), source
    # Compute logs live under $DAGSTER_HOME/storage: one volume shared by the Dagster services
    # (a step's logs are written where it executes: on a worker).
    for name in DAGSTER_SERVICES:
        assert f"dagster-storage:{home}/storage" in compose["services"][name]["volumes"]


def test_workspace_points_at_the_code_server(compose):
    (entry,) = load(DEPLOY / "workspace.yaml")["load_from"]
    server = entry["grpc_server"]
    services = compose["services"]
    code = services["code"]["command"]
    assert server["host"] == "code"
    assert code[code.index("-p") + 1] == str(server["port"])
    assert code[code.index("-h") + 1] == "0.0.0.0"
    assert code[code.index("-m") + 1] == "pipelines.definitions"
    for name in ("daemon", "webserver"):
        command = services[name]["command"]
        assert command[command.index("-w") + 1] == "deploy/workspace.yaml"
    # The image's default command is the code server the workspace names.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1)) == code


def render_helm_instance(values: dict) -> dict:
    """The instance sections the chart renders from these values (its configmap-instance
    template), to hold them against Dagster's schema."""
    pg = values["postgresql"]
    launcher = snake_keys(values["runLauncher"]["config"]["k8sRunLauncher"])
    for key in ("env_config_maps", "env_secrets"):
        launcher[key] = [ref["name"] for ref in launcher[key]]
    # Filled in by the chart itself (an unset namespace is the release's).
    launcher["job_namespace"] = launcher["job_namespace"] or "candlestack"
    launcher |= {
        "service_account_name": "dagster",
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
    }
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    concurrency = values["concurrency"]
    return {
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": pg["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": pg["postgresqlHost"] or "candlestack-postgresql",
                    "db_name": pg["postgresqlDatabase"],
                    "port": pg["service"]["port"],
                    "params": pg["postgresqlParams"],
                    "scheme": pg["postgresqlScheme"],
                }
            }
        },
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher},
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": snake_keys(queued),
        },
        "run_monitoring": snake_keys(values["dagsterDaemon"]["runMonitoring"]),
        "concurrency": {
            "runs": snake_keys(concurrency["runs"]),
            "pools": snake_keys(concurrency["pools"]),
        },
        "telemetry": values["telemetry"],
    }


def test_helm_values_give_a_valid_instance(helm, local):
    assert helm["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    instance = render_helm_instance(helm)
    validate_concurrency_config(instance)
    result = validate_config(Shape(dagster_instance_config_schema()), instance)
    assert result.success, [e.message for e in result.errors]
    launcher = validate_config(K8sRunLauncher.config_type(), instance["run_launcher"]["config"])
    assert launcher.success, [e.message for e in launcher.errors]
    # PostgreSQL through psycopg2, as in deploy/postgres/dagster.yaml.
    assert instance["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    # The same queue and pools as the local instance; on Kubernetes, a dead run pod is resumed.
    assert instance["concurrency"] == local["concurrency"]
    assert instance["run_monitoring"]["enabled"] is True
    assert instance["run_monitoring"]["max_resume_run_attempts"] > 0


def test_helm_user_code_is_the_compose_image_and_module(helm, compose):
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    repository = deployment["image"]["repository"]
    assert repository.rsplit("/", 1)[-1] == compose["services"]["code"]["image"].split(":")[0]
    known = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    assert {e["name"] for e in deployment["env"]} <= known
    assert helm["dagsterWebserver"]["service"]["type"] == "ClusterIP"


def test_helm_live_collector(helm, compose):
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    collector = extra_manifest(helm, "candlestack-live")["spec"]
    # One replica, never two at once (a rollout stops the old pod first).
    assert collector["replicas"] == 1
    assert collector["strategy"] == {"type": "Recreate"}
    pod = collector["template"]["spec"]
    (container,) = pod["containers"]
    image = deployment["image"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
    assert container["command"] == compose["services"]["live"]["command"] == LIVE_COMMAND
    assert container["env"] == deployment["env"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [
        s["name"] for s in deployment["envSecrets"]
    ]
    assert container["livenessProbe"]["exec"]["command"] == HEALTH_CHECK
    assert pod["terminationGracePeriodSeconds"] == seconds(
        compose["services"]["live"]["stop_grace_period"]
    )
    # The status file and the streamed opens are on a volume the user code (the live_feed
    # sensor, the dry-run runs) mounts too.
    claim = extra_manifest(helm, "candlestack-live-status")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert pod["volumes"] == deployment["volumes"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert container["volumeMounts"] == deployment["volumeMounts"]
    (mount,) = container["volumeMounts"]
    workdir = re.search(r"^WORKDIR (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    status = PurePosixPath(workdir) / Settings().live_status
    assert (mount["name"], mount["mountPath"]) == (volume["name"], str(status.parent))
    assert (PurePosixPath(workdir) / Settings().live_opens).parent == status.parent
    assert pod["securityContext"] == deployment["podSecurityContext"]


def test_helm_celery_workers(helm, compose, postgres):
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    settings = Settings.from_env(env)
    assert settings.executor == "celery"
    assert str(settings.lake).startswith("s3://")  # nothing on another pod's disk
    # The URLs that carry passwords, and the workers' instance database, in the Secret.
    (pg_env_var,) = [v["env"] for v in postgres["storage"]["postgres"].values()]
    header = (DEPLOY / "helm" / "values.yaml").read_text()
    for name in ("CANDLESTACK_CELERY_BROKER", "CANDLESTACK_CELERY_BACKEND", pg_env_var):
        assert f"--from-literal={name}=" in header, name
    workers = extra_manifest(helm, "candlestack-worker")["spec"]
    assert workers["replicas"] >= 2
    labels = workers["template"]["metadata"]["labels"]
    assert workers["selector"]["matchLabels"].items() <= labels.items()
    live = extra_manifest(helm, "candlestack-live")["spec"]
    assert workers["selector"]["matchLabels"] != live["selector"]["matchLabels"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    image = deployment["image"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"
    assert container["command"] == compose["services"]["worker"]["command"]
    assert container["env"] == deployment["env"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == [
        s["name"] for s in deployment["envSecrets"]
    ]
    # The dry-run steps read the streamed opens on the workers too.
    assert pod["volumes"] == deployment["volumes"]
    assert container["volumeMounts"] == deployment["volumeMounts"]
    assert pod["securityContext"] == deployment["podSecurityContext"]
    assert pod["terminationGracePeriodSeconds"] == seconds(
        compose["services"]["worker"]["stop_grace_period"]
    )
