"""Settings.from_env: parsing CANDLESTACK_* variables and naming the one at fault."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import pytest

from candlestack.config import CREDENTIAL_VARIABLES, DEFAULT_SYMBOLS, Settings, symbol_key
from candlestack.errors import ConfigError


def test_defaults_without_variables():
    settings = Settings.from_env({"PATH": "/usr/bin", "OTHER_CANDLESTACK_X": "1"})
    assert settings.symbols == DEFAULT_SYMBOLS
    assert settings.source == "synthetic"
    assert settings.exchange_id == "synthetic"
    assert settings.imputed_max_share == 0.01
    assert settings.replay_files == {}


def test_symbols_are_split_and_trimmed():
    settings = Settings.from_env({"CANDLESTACK_SYMBOLS": " BTC/USDT, ETH/USDT,,BTC/USDT:USDT "})
    assert settings.symbols == ("BTC/USDT", "ETH/USDT", "BTC/USDT:USDT")
    assert settings.symbol_by_key == {
        "BTC-USDT": "BTC/USDT",
        "ETH-USDT": "ETH/USDT",
        "BTC-USDT_USDT": "BTC/USDT:USDT",
    }
    assert symbol_key("BTC/USDT:USDT") == "BTC-USDT_USDT"


def test_replay_files_json_and_other_typed_values():
    settings = Settings.from_env(
        {
            "CANDLESTACK_SOURCE": "replay",
            "CANDLESTACK_REPLAY_FILES": '{"BTC/USDT": "/data/btc.csv", "ETH/USDT": "eth.json"}',
            "CANDLESTACK_CCXT_OPTIONS": '{"options": {"defaultType": "spot"}}',
            "CANDLESTACK_START_DATE": "2021-04-20",
            "CANDLESTACK_IMPUTED_MAX_SHARE": "0.05",
            "CANDLESTACK_REFETCH_ATTEMPTS": "0",
            "CANDLESTACK_LAKE": "/tmp/lake",
            "CANDLESTACK_API_KEY": "not-a-setting-but-allowed",
            "CANDLESTACK_API_SECRET": "its-pair",
        }
    )
    assert settings.replay_files == {
        "BTC/USDT": Path("/data/btc.csv"),
        "ETH/USDT": Path("eth.json"),
    }
    assert settings.ccxt_options == {"options": {"defaultType": "spot"}}
    assert settings.start_date == date(2021, 4, 20)
    assert settings.imputed_max_share == 0.05
    assert settings.refetch_attempts == 0
    assert settings.lake == Path("/tmp/lake")
    assert settings.exchange_id == "binance"


def test_empty_value_means_default():
    settings = Settings.from_env({"CANDLESTACK_SYMBOLS": "", "CANDLESTACK_REPLAY_FILES": ""})
    assert settings.symbols == DEFAULT_SYMBOLS
    assert settings.replay_files == {}


def test_reads_the_process_environment(monkeypatch):
    for key in list(os.environ):
        if key.startswith("CANDLESTACK_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CANDLESTACK_SYMBOLS", "SOL/USDT")
    assert Settings.from_env().symbols == ("SOL/USDT",)


@pytest.mark.parametrize(
    ("environ", "variable", "detail"),
    [
        ({"CANDLESTACK_SYMBOLS": "BTCUSDT"}, "CANDLESTACK_SYMBOLS", "BTCUSDT"),
        ({"CANDLESTACK_SYMBOLS": "BTC/USDT ETH/USDT"}, "CANDLESTACK_SYMBOLS", "BTC/USDT ETH"),
        ({"CANDLESTACK_SYMBOLS": "BTC/USDT,BTC/USDT"}, "CANDLESTACK_SYMBOLS", "repeat"),
        ({"CANDLESTACK_SYMBOLS": " , "}, "CANDLESTACK_SYMBOLS", "at least one symbol"),
        ({"CANDLESTACK_REPLAY_FILES": "{BTC/USDT: x.csv}"}, "CANDLESTACK_REPLAY_FILES", "JSON"),
        ({"CANDLESTACK_CCXT_OPTIONS": "{'a': 1}"}, "CANDLESTACK_CCXT_OPTIONS", "JSON"),
        ({"CANDLESTACK_REPLAY_FILES": "[1, 2]"}, "CANDLESTACK_REPLAY_FILES", "dictionary"),
        (
            {"CANDLESTACK_IMPUTED_MAX_SHARE": "1.5"},
            "CANDLESTACK_IMPUTED_MAX_SHARE",
            "less than or equal to 1",
        ),
        (
            {"CANDLESTACK_IMPUTED_MAX_SHARE": "-0.1"},
            "CANDLESTACK_IMPUTED_MAX_SHARE",
            "greater than or equal to 0",
        ),
        (
            {"CANDLESTACK_REFETCH_ATTEMPTS": "11"},
            "CANDLESTACK_REFETCH_ATTEMPTS",
            "less than or equal to 10",
        ),
        (
            {"CANDLESTACK_FRESHNESS_LAG_MINUTES": "0"},
            "CANDLESTACK_FRESHNESS_LAG_MINUTES",
            "greater than or equal to 1",
        ),
        (
            {"CANDLESTACK_BACKFILL_RUN_PARTITIONS": "0"},
            "CANDLESTACK_BACKFILL_RUN_PARTITIONS",
            "greater than or equal to 1",
        ),
        ({"CANDLESTACK_SOURCE": "kraken"}, "CANDLESTACK_SOURCE", "synthetic"),
        ({"CANDLESTACK_START_DATE": "yesterday"}, "CANDLESTACK_START_DATE", "date"),
        ({"CANDLESTACK_EXECUTOR": "multiprocess"}, "CANDLESTACK_EXECUTOR", "'celery'"),
        ({"CANDLESTACK_EXECUTOR": "Celery"}, "CANDLESTACK_EXECUTOR", "'in_process'"),
        ({"CANDLESTACK_CELERY_QUEUE": "steps queue"}, "CANDLESTACK_CELERY_QUEUE", "pattern"),
        ({"CANDLESTACK_CELERY_QUEUE": "a/b"}, "CANDLESTACK_CELERY_QUEUE", "pattern"),
    ],
)
def test_bad_value_names_the_variable(environ, variable, detail):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    message = str(info.value)
    assert variable in message
    assert detail in message


def replay_settings(files: str) -> Settings:
    return Settings.from_env(
        {
            "CANDLESTACK_SOURCE": "replay",
            "CANDLESTACK_SYMBOLS": "BTC/USDT,ETH/USDT",
            "CANDLESTACK_REPLAY_FILES": files,
        }
    )


@pytest.mark.parametrize(
    ("key", "suggestion"), [("BTC/USTD", "BTC/USDT"), ("ETHUSDT", "ETH/USDT"), ("DOGE/EUR", None)]
)
def test_a_replay_key_that_is_not_a_configured_symbol_is_named(key, suggestion):
    with pytest.raises(ConfigError) as info:
        replay_settings(f'{{"BTC/USDT": "btc.csv", "{key}": "other.csv"}}')
    message = str(info.value)
    assert "CANDLESTACK_REPLAY_FILES" in message
    assert f"{key!r} is not a configured symbol" in message
    assert "CANDLESTACK_SYMBOLS: BTC/USDT, ETH/USDT" in message
    if suggestion:
        assert f"did you mean {suggestion!r}?" in message
    else:
        assert "did you mean" not in message


@pytest.mark.parametrize("key", ["../../x", "/etc/passwd", "BTC/USDT/../../x", "..\\x"])
def test_a_path_as_replay_key_is_refused(key):
    with pytest.raises(ConfigError, match="looks like a path") as info:
        replay_settings(json.dumps({key: "x.csv"}))
    assert repr(key) in str(info.value)


def test_replay_keys_may_name_some_of_the_symbols():
    settings = replay_settings('{"ETH/USDT": "eth.csv"}')
    assert settings.replay_files == {"ETH/USDT": Path("eth.csv")}


def test_only_the_bad_variable_is_named():
    environ = {"CANDLESTACK_SYMBOLS": "BTC/USDT", "CANDLESTACK_IMPUTED_MAX_SHARE": "2"}
    with pytest.raises(ConfigError) as info:
        Settings.from_env(environ)
    assert "CANDLESTACK_IMPUTED_MAX_SHARE" in str(info.value)
    assert "CANDLESTACK_SYMBOLS" not in str(info.value)


@pytest.mark.parametrize(
    "typo", ["CANDLESTACK_SYMBOL", "CANDLESTACK_IMPUTED_SHARE", "CANDLESTACK_"]
)
def test_unknown_variable_is_named(typo):
    with pytest.raises(ConfigError, match="unknown setting") as info:
        Settings.from_env({typo: "x", "CANDLESTACK_SYMBOLS": "BTC/USDT"})
    assert typo in str(info.value)


def test_all_unknown_variables_are_named_at_once():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CANDLESTACK_B": "1", "CANDLESTACK_A": "2"})
    assert "CANDLESTACK_A, CANDLESTACK_B" in str(info.value)


def test_wrong_case_variable_is_not_silently_ignored():
    environ = {"CANDLESTACK_Symbols": "ETH/USDT"}
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        assert "CANDLESTACK_Symbols" in str(exc)
    else:
        assert settings.symbols == ("ETH/USDT",)


@pytest.mark.parametrize(
    ("present", "absent"),
    [
        ("CANDLESTACK_API_SECRET", "CANDLESTACK_API_KEY"),
        ("CANDLESTACK_API_KEY", "CANDLESTACK_API_SECRET"),
    ],
)
def test_half_a_credential_is_refused_naming_the_missing_half(present, absent):
    """Reported: a secret without its key was ignored silently (no keys were used)."""
    with pytest.raises(ConfigError, match=f"{present} is set but {absent} is not"):
        Settings.from_env({present: "canary"})


def test_secrets_are_every_credential_the_settings_hold(monkeypatch):
    monkeypatch.setenv("CANDLESTACK_API_KEY", "key-1")
    monkeypatch.setenv("CANDLESTACK_API_SECRET", "secret-1")
    options = {
        "httpProxy": "http://trader:proxy-pw@127.0.0.1:8080",
        "proxies": {"https": "https://other:pw%2F2@proxy.example:3128"},
        "headers": {"X-Api-Token": "token-1", "User-Agent": "candlestack"},
        "password": "trading-pw",
        "urls": {"api": {"public": "https://mirror.example/api/v3"}},
        "timeout": 10000,
    }
    settings = Settings.from_env(
        {
            "CANDLESTACK_LEDGER_URL": "postgresql+psycopg://cs:p%40ss@db:5432/cs",
            "CANDLESTACK_CCXT_OPTIONS": json.dumps(options),
            "CANDLESTACK_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x",
        }
    )
    assert set(settings.secrets()) == {
        "key-1",
        "secret-1",
        "https://hooks.slack.com/services/T/B/x",
        "p%40ss",  # as the URL writes it, and as it is sent
        "p@ss",
        "proxy-pw",
        "pw%2F2",
        "pw/2",
        "token-1",
        "candlestack",  # every header value: headers are where tokens go
        "trading-pw",
    }


def test_the_celery_settings_default_to_in_process_and_local_services():
    settings = Settings.from_env({})
    assert settings.executor == "in_process"
    assert settings.celery_broker == "pyamqp://guest@127.0.0.1:5672//"
    assert settings.celery_backend == "redis://127.0.0.1:6379/0"
    assert settings.celery_queue == "candlestack"
    celery = Settings.from_env(
        {
            "CANDLESTACK_EXECUTOR": "celery",
            "CANDLESTACK_CELERY_BROKER": "pyamqp://cs@rabbitmq:5672/candlestack",
            "CANDLESTACK_CELERY_BACKEND": "redis://redis:6379/1",
            "CANDLESTACK_CELERY_QUEUE": "candlestack.prod-1",
        }
    )
    assert celery.executor == "celery"
    assert celery.celery_broker == "pyamqp://cs@rabbitmq:5672/candlestack"
    assert celery.celery_backend == "redis://redis:6379/1"
    assert celery.celery_queue == "candlestack.prod-1"
    assert celery.secrets() == []  # no password in either URL


def test_the_broker_and_backend_passwords_are_secrets(monkeypatch):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env(
        {
            "CANDLESTACK_EXECUTOR": "celery",
            "CANDLESTACK_CELERY_BROKER": "pyamqp://cs:br%2Fker@rabbitmq:5672//",
            "CANDLESTACK_CELERY_BACKEND": "redis://:redis-pw@redis:6379/0",
        }
    )
    # As the URL writes it, and as it is sent.
    assert set(settings.secrets()) == {"br%2Fker", "br/ker", "redis-pw"}


def test_the_default_settings_hold_no_secret(monkeypatch):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert Settings.from_env({}).secrets() == []


def test_every_setting_is_in_the_configuration_reference():
    reference = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    text = reference.read_text()
    missing = [
        name for name in Settings.model_fields if f"`CANDLESTACK_{name.upper()}`" not in text
    ]
    assert missing == []
