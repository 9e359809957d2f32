"""Deployment settings, read once from CANDLESTACK_* environment variables.

Partitions and resources are built from these at definitions load time, so a
wrong value fails when the code location loads, naming the variable.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from candlestack.errors import ConfigError

DEFAULT_SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
ENV_PREFIX = "CANDLESTACK_"
# Read by the ccxt source through dg.EnvVar, never as settings.
CREDENTIAL_VARIABLES = ("CANDLESTACK_API_KEY", "CANDLESTACK_API_SECRET")
# ccxt constructor options that are credentials (lower case), besides proxies and headers.
CCXT_CREDENTIAL_OPTIONS = frozenset(
    {
        "apikey",
        "secret",
        "password",
        "uid",
        "login",
        "twofa",
        "privatekey",
        "walletaddress",
        "token",
    }
)


def _looks_like_path(name: str) -> bool:
    # A ccxt symbol has one slash between base and quote, and never a dot-dot or backslash.
    return name.startswith(("/", ".", "~")) or ".." in name or "\\" in name or name.count("/") > 1


def url_secrets(url: str) -> list[str]:
    """The password in a URL's userinfo, as written and decoded (none: [])."""
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL (a port that is no number, ...)
        return []
    return [password, unquote(password)] if password else []


def ccxt_option_secrets(options: object, key: str = "") -> list[str]:
    """The credentials in ccxt options: credential options, every header value, and the
    password of any URL (a proxy's)."""
    if isinstance(options, Mapping):
        if key.lower() == "headers":
            return [str(value) for value in options.values()]
        return [s for k, v in options.items() for s in ccxt_option_secrets(v, str(k))]
    if isinstance(options, list):
        return [s for item in options for s in ccxt_option_secrets(item, key)]
    if isinstance(options, str):
        return [options] if key.lower() in CCXT_CREDENTIAL_OPTIONS else url_secrets(options)
    return []


def symbol_key(symbol: str) -> str:
    """Path- and partition-safe form of a ccxt symbol: BTC/USDT -> BTC-USDT."""
    return symbol.replace("/", "-").replace(":", "_")


class Settings(BaseModel, frozen=True):
    source: Literal["synthetic", "ccxt", "replay"] = "synthetic"
    exchange: str = Field(
        "", description="ccxt exchange id; defaults to binance, or the source name"
    )
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    start_date: date = date(2020, 1, 1)
    # A local folder, or s3://bucket/prefix (endpoint and credentials: the AWS environment).
    lake: Path | str = Path("data/lake")
    catalog: Path = Path("data/catalog.duckdb")
    ccxt_options: dict = Field(default_factory=dict)
    ccxt_sandbox: bool = False
    replay_files: dict[str, Path] = Field(default_factory=dict)
    replay_markets_file: Path | None = None
    features: Path | None = None  # a YAML or JSON feature set; None: the default set
    strategies: Path | None = None  # a YAML or JSON strategies file; None: the built-in one
    reports: Path = Path("data/reports")  # backtest reports (HTML) a person opens
    # The live collector's state, read by the metrics endpoint, alerts and the UI.
    live_status: Path = Path("data/live/status.json")
    # Each symbol's forming minute's open as the collector streamed it: dry-run fill prices.
    live_opens: Path = Path("data/live/opens")
    # Alerts: a symbol whose newest streamed candle closed longer ago than this; this many
    # reconnects within 10 minutes.
    live_max_buffer_age_seconds: float = Field(150.0, gt=0)
    live_reconnect_storm: int = Field(5, ge=1)
    # The dry-run ledger: a SQLite file by default, or postgresql+psycopg://user@host/db.
    ledger_url: str = "sqlite:///data/ledger.sqlite"
    synthetic_seed: int = 7
    refetch_attempts: int = Field(2, ge=0, le=10)
    imputed_max_share: float = Field(0.01, ge=0, le=1)
    freshness_lag_minutes: int = Field(3, ge=1)
    # Real minutes that traded nothing, as a share of a day's real minutes: above it the
    # warn-level zero_volume check fails (a venue printing flat candles is not a market).
    zero_volume_max_share: float = Field(0.05, ge=0, le=1)
    # A backfill of month x symbol partitions launched through the daemon (UI, dg launch):
    # None is one run for the whole range; N splits it into runs of N symbol-months that the
    # run queue executes concurrently.
    backfill_run_partitions: int | None = Field(None, ge=1)
    # Alerts: webhook URLs may carry a token (Slack's do), so they reach the resource through
    # EnvVar and never appear in an error, log or payload. ui_url: the Dagster UI for links.
    alert_webhook_url: str | None = None
    slack_webhook_url: str | None = None
    ui_url: str | None = None
    # The Prometheus endpoint (python -m pipelines.metrics): loopback unless told otherwise.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=1, le=65535)
    # The live collector (python -m candlestack.live): a socket silent this long is
    # reconnected; reconnects back off exponentially, with jitter, up to the cap.
    live_stall_seconds: float = Field(90.0, gt=0)
    live_backoff_max_seconds: float = Field(30.0, gt=0)
    # Where a run's steps execute: in the run's own process, or as Celery tasks on
    # `dagster-celery worker` processes (pipelines/workers.py) on any machine that reaches
    # the broker, the instance's PostgreSQL and an s3:// lake. The broker and the result
    # backend may carry passwords: they are masked like every other credential.
    executor: Literal["in_process", "celery"] = "in_process"
    celery_broker: str = "pyamqp://guest@127.0.0.1:5672//"
    celery_backend: str = "redis://127.0.0.1:6379/0"
    # The broker queue the steps are sent to and the workers take them from: deployments
    # sharing one broker keep apart by their queue names.
    celery_queue: str = Field("candlestack", pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("lake", mode="before")
    @classmethod
    def _lake_location(cls, value: object) -> object:
        if isinstance(value, str) and "://" in value:
            bucket = value.removeprefix("s3://").split("/")[0]
            if not value.startswith("s3://") or not bucket:
                raise ValueError(f"{value!r} is neither a local folder nor s3://bucket/prefix")
            return value.rstrip("/")
        return Path(value) if isinstance(value, str) else value

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(s.strip() for s in value.split(",") if s.strip())
        return value

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one symbol is needed")
        keys = [symbol_key(s) for s in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"symbols repeat: {', '.join(value)}")
        for symbol in value:
            if "/" not in symbol or any(c in symbol for c in " |,[]{}*"):
                raise ValueError(f"{symbol!r} is not a ccxt symbol like BTC/USDT")
        return value

    @field_validator("replay_files")
    @classmethod
    def _check_replay_symbols(cls, value: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        # Only configured symbols are ever replayed: any other key is a typo, found now
        # rather than as a symbol whose days are all gaps.
        symbols = info.data.get("symbols")
        if symbols is None:  # the symbols were refused, with their own message
            return value
        for key in value:
            if _looks_like_path(key):
                raise ValueError(
                    f"key {key!r} looks like a path; a key is a symbol of CANDLESTACK_SYMBOLS "
                    'and its value the recording, as in {"BTC/USDT": "data/btc.csv"}'
                )
            if key not in symbols:
                close = difflib.get_close_matches(key, symbols, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"key {key!r} is not a configured symbol ({hint}CANDLESTACK_SYMBOLS: "
                    f"{', '.join(symbols)})"
                )
        return value

    @field_validator("alert_webhook_url", "slack_webhook_url", "ui_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        # The message leaves the value out: a webhook URL is a credential.
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @property
    def alerts_configured(self) -> bool:
        return bool(self.alert_webhook_url or self.slack_webhook_url)

    @property
    def exchange_id(self) -> str:
        if self.exchange:
            return self.exchange
        return "binance" if self.source in ("ccxt", "replay") else self.source

    @property
    def symbol_by_key(self) -> dict[str, str]:
        return {symbol_key(s): s for s in self.symbols}

    def secrets(self) -> list[str]:
        """Every credential these settings hold: the exchange keys, the ledger's password,
        the webhook URLs, the ccxt options' credentials and the Celery broker's and backend's
        passwords. Alerts mask each of them."""
        values = [os.environ.get(name) for name in CREDENTIAL_VARIABLES]
        values += [self.alert_webhook_url, self.slack_webhook_url]
        values += url_secrets(self.ledger_url) + ccxt_option_secrets(self.ccxt_options)
        values += url_secrets(self.celery_broker) + url_secrets(self.celery_backend)
        return list(dict.fromkeys(value for value in values if value))

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields} | set(CREDENTIAL_VARIABLES)
        unknown = sorted(
            key for key in environ if key.upper().startswith(ENV_PREFIX) and key not in known
        )
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see docs/configuration.md")
        # Half a credential would be ignored (a key is only used with its secret): refuse it.
        halves = {n: bool(environ.get(n)) for n in CREDENTIAL_VARIABLES}
        if len(set(halves.values())) > 1:
            present, absent = sorted(halves, key=halves.get, reverse=True)
            raise ConfigError(f"{present} is set but {absent} is not: set both, or neither")
        for name in cls.model_fields:
            value = environ.get(ENV_PREFIX + name.upper())
            if value is None or value == "":
                continue
            if name in ("ccxt_options", "replay_files"):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{ENV_PREFIX}{name.upper()} is not valid JSON: {exc}"
                    ) from exc
            raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid candlestack settings: {problems}") from exc


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """The process's settings: partitions, resources and the demo read the same ones."""
    return Settings.from_env()
