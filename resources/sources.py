"""The exchange source as a Dagster resource: one interface, three configurations."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from candlestack.config import Settings
from candlestack.live_status import StreamedOpens
from candlestack.sources import CandleSource, ReplaySource, SyntheticSource
from resources.env import env_var_or

if TYPE_CHECKING:
    from candlestack.sources.ccxt_source import CcxtSource


class CandleSourceResource(dg.ConfigurableResource):
    """Base of the source resources; assets ask for this type under the key `source`."""

    refetch_attempts: int = Field(2, description="re-requests of missing minutes per day")

    def open(self) -> CandleSource:
        raise NotImplementedError

    def exchange_name(self) -> str:
        """`open().exchange` (the exchange id in lake paths), without building a client."""
        raise NotImplementedError

    def streamed_opens(self) -> StreamedOpens | None:
        """The live collector's forming-minute opens, for sources it streams from."""
        return None


class SyntheticSourceResource(CandleSourceResource):
    """Seeded synthetic market: offline, deterministic, with missing minutes on purpose."""

    seed: int = 7
    symbols: list[str] = Field(default_factory=list, description="markets load_markets lists")

    def open(self) -> SyntheticSource:
        return SyntheticSource(seed=self.seed, symbols=self.symbols)

    def exchange_name(self) -> str:
        return "synthetic"


class ReplaySourceResource(CandleSourceResource):
    """Recorded candles: symbol -> file (CSV, Parquet, freqtrade JSON/feather, kline CSV)."""

    files: dict[str, str]
    exchange: str = "binance"
    markets_file: str | None = Field(None, description="a recorded exchangeInfo JSON")

    def open(self) -> ReplaySource:
        return ReplaySource(self.files, exchange=self.exchange, markets_file=self.markets_file)

    def exchange_name(self) -> str:
        return self.exchange


class CcxtSourceResource(CandleSourceResource):
    """Any ccxt exchange over REST. Keys come from the environment and are never logged."""

    exchange: str = "binance"
    options_json: str = Field(
        "{}",
        description="ccxt constructor options as JSON: urls, options, timeout, proxies, "
        "headers, ...; given as EnvVar, since proxies and headers may hold credentials",
    )
    sandbox: bool = False
    api_key: str | None = None
    secret: str | None = None
    retry_max_seconds: float = 120.0
    live_opens: str | None = Field(
        None, description="the live collector's forming-minute opens (dry-run fill prices)"
    )

    def open(self) -> "CcxtSource":
        # Imported here, not with the module: ccxt takes ~0.6 s to import, and a run that
        # needs only the exchange's name (or the streamed opens) never builds a client.
        from candlestack.sources.ccxt_source import CcxtSource

        config = json.loads(self.options_json)
        if self.api_key:
            config |= {"apiKey": self.api_key, "secret": self.secret}
        return CcxtSource(
            self.exchange,
            config,
            sandbox=self.sandbox,
            retry_max_seconds=self.retry_max_seconds,
        )

    def exchange_name(self) -> str:
        return self.exchange

    def streamed_opens(self) -> StreamedOpens | None:
        return StreamedOpens(Path(self.live_opens)) if self.live_opens else None


def source_resource(settings: Settings) -> CandleSourceResource:
    """The source the settings ask for (CANDLESTACK_SOURCE)."""
    common = {"refetch_attempts": settings.refetch_attempts}
    if settings.source == "ccxt":
        return CcxtSourceResource(
            exchange=settings.exchange_id,
            options_json=env_var_or("CANDLESTACK_CCXT_OPTIONS", json.dumps(settings.ccxt_options)),
            sandbox=settings.ccxt_sandbox,
            api_key=env_var_or("CANDLESTACK_API_KEY", None),
            secret=env_var_or("CANDLESTACK_API_SECRET", None),
            live_opens=str(settings.live_opens),
            **common,
        )
    if settings.source == "replay":
        return ReplaySourceResource(
            files={symbol: str(path) for symbol, path in settings.replay_files.items()},
            exchange=settings.exchange_id,
            markets_file=str(settings.replay_markets_file)
            if settings.replay_markets_file
            else None,
            **common,
        )
    return SyntheticSourceResource(
        seed=settings.synthetic_seed, symbols=list(settings.symbols), **common
    )
