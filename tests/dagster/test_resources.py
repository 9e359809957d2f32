"""Settings reach the code location's resources: credential-bearing ones as dg.EnvVar when their
variable is set,
and as the plain default (which holds no secret) when it is not."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from candlestack.config import Settings
from resources import ledger_resource, source_resource
from tests.conftest import isolated_env

ROOT = Path(__file__).resolve().parents[2]

LEDGER_URL = "postgresql+psycopg://cs:ledger-pw@db.internal:5432/cs"
OPTIONS = {"httpProxy": "http://trader:proxy-pw@127.0.0.1:8080", "headers": {"X-Token": "t-1"}}


@pytest.fixture
def environment(monkeypatch):
    for name in ("LEDGER_URL", "CCXT_OPTIONS", "API_KEY", "API_SECRET"):
        monkeypatch.delenv(f"CANDLESTACK_{name}", raising=False)
    return monkeypatch


def test_set_variables_are_env_vars_resolved_at_init(environment):
    environment.setenv("CANDLESTACK_LEDGER_URL", LEDGER_URL)
    environment.setenv("CANDLESTACK_CCXT_OPTIONS", json.dumps(OPTIONS))
    environment.setenv("CANDLESTACK_API_KEY", "key-1")
    environment.setenv("CANDLESTACK_API_SECRET", "secret-1")
    settings = Settings.from_env({"CANDLESTACK_SOURCE": "ccxt"})
    ledger, source = ledger_resource(settings), source_resource(settings)
    configured = {
        "url": ledger.url,
        "options_json": source.options_json,
        "api_key": source.api_key,
        "secret": source.secret,
    }
    assert {k: (type(v), v.env_var_name) for k, v in configured.items()} == {
        "url": (dg.EnvVar, "CANDLESTACK_LEDGER_URL"),
        "options_json": (dg.EnvVar, "CANDLESTACK_CCXT_OPTIONS"),
        "api_key": (dg.EnvVar, "CANDLESTACK_API_KEY"),
        "secret": (dg.EnvVar, "CANDLESTACK_API_SECRET"),
    }
    assert ledger.process_config_and_initialize().url == LEDGER_URL
    client = source.process_config_and_initialize().open().client
    assert (client.httpProxy, client.headers, client.apiKey) == (
        OPTIONS["httpProxy"],
        OPTIONS["headers"],
        "key-1",
    )


def test_unset_variables_are_the_plain_defaults(environment):
    settings = Settings.from_env({"CANDLESTACK_SOURCE": "ccxt"})
    ledger, source = ledger_resource(settings), source_resource(settings)
    assert (ledger.url, source.options_json, source.api_key) == (settings.ledger_url, "{}", None)
    assert not isinstance(ledger.url, dg.EnvVar)
    # Nothing to resolve, so nothing fails at init for want of a variable.
    assert ledger.process_config_and_initialize().url == "sqlite:///data/ledger.sqlite"
    source.process_config_and_initialize()


def test_the_code_locations_lake_takes_its_thresholds_from_the_environment(tmp_path):
    """Assets read the imputed-share, zero-volume and freshness thresholds from the lake
    resource only, so a CANDLESTACK_* setting must reach it through pipelines.definitions."""
    script = (
        "import json, pipelines.definitions as d; lake = d.defs.resources['lake']; "
        "print(json.dumps([lake.imputed_max_share, lake.zero_volume_max_share, "
        "lake.freshness_lag_minutes, lake.root]))"
    )
    thresholds = {"imputed_max_share": "0.07", "zero_volume_max_share": "0.3"}
    env = {
        **isolated_env(tmp_path, **thresholds, freshness_lag_minutes="42"),
        "PYTHONPATH": str(ROOT),
    }
    printed = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == [0.07, 0.3, 42, str(tmp_path / "lake")]
