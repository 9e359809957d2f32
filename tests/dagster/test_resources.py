"""Credential-bearing settings reach the resources as dg.EnvVar when their variable is set,
and as the plain default (which holds no secret) when it is not."""

import json

import dagster as dg
import pytest

from candlestack.config import Settings
from resources import ledger_resource, source_resource

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
