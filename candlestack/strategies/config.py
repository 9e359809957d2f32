"""How a user configures strategies, backtest windows and parameter sweeps (YAML or JSON)."""

from __future__ import annotations

import json
import re
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from candlestack.errors import ConfigError
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.strategies.base import Strategy
from candlestack.strategies.registry import resolve

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_STRATEGIES = Path(__file__).with_name("default.yaml")


def _asset_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("lower case letters, digits and _, starting with a letter")
    return value


# Strategy and sweep names become asset names (backtest_<name>, sweep_<name>).
AssetName = Annotated[str, AfterValidator(_asset_name)]


class DriftTolerance(BaseModel):
    """How far the dry-run may drift from its backtest before the drift check fails."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_days: int = Field(7, ge=1, description="trailing window compared, in days")
    min_signal_agreement: float = Field(
        0.99, ge=0, le=1, description="share of decided bars whose signals match the replay"
    )
    max_fill_price_diff_bps: float = Field(1.0, ge=0, description="per matched fill")
    max_unmatched_fills: int = Field(0, ge=0, description="fills on one side only")
    max_pnl_diff: float = Field(
        0.001, ge=0, description="realised PnL difference as a fraction of capital"
    )


class DryRunConfig(BaseModel):
    """Paper trading of a strategy on closed bars, with its kill-switch triggers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    catch_up: Literal["all", "latest"] = Field(
        "all",
        description="bars that closed while nothing ran: decide each in order (all), or "
        "decide the newest and record the others as skipped (latest)",
    )
    max_drawdown: float = Field(
        0.2, gt=0, lt=1, description="trip the kill switch at this drawdown from peak equity"
    )
    stale_after_seconds: float = Field(
        300, gt=0, description="trip when the newest 1m candle closed longer ago than this"
    )
    max_imputed_share: float = Field(
        0.25, ge=0, le=1, description="trip when more of the recent minutes were imputed"
    )
    quality_window_bars: int = Field(60, ge=1, description="bars the imputed share covers")
    error_burst: int = Field(3, ge=1, description="trip after this many failed bars ...")
    error_window_minutes: float = Field(15, gt=0, description="... within this many minutes")
    fill_wait_seconds: float = Field(
        10, ge=0, description="how long to wait for the next bar's open to exist"
    )
    drift: DriftTolerance = Field(default_factory=DriftTolerance)


class StrategyConfig(BaseModel):
    """One strategy on one symbol and timeframe, with its money and risk settings.

    Fractions are fractions: fee 0.001 is 0.1 %, slippage 0.0005 is 5 basis points.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: AssetName = Field(description="unique; the backtest asset is backtest_<name>")
    strategy: str = Field(description="built-in name, entry point name or module:Class")
    symbol: str
    timeframe: str = "15m"
    min_price: float = Field(0.0, ge=0, description="no entries below this close")
    max_price: float | None = Field(None, gt=0, description="no entries above this close")
    order_value: float = Field(1_000.0, gt=0, description="quote currency per entry")
    capital: float = Field(10_000.0, gt=0, description="starting quote balance")
    min_profit: float = Field(0.0, ge=0, description="take profit at this net return; 0: off")
    stop_loss: float = Field(0.0, ge=0, lt=1, description="exit at this loss; 0: off")
    fee: float = Field(0.001, ge=0, lt=0.1)
    slippage: float = Field(0.0005, ge=0, lt=0.1)
    params: dict[str, Any] = Field(default_factory=dict)
    start: date | None = Field(None, description="first backtest day; None: the first bar")
    end: date | None = Field(None, description="last backtest day; None: the last bar")
    dry_run: DryRunConfig = Field(default_factory=DryRunConfig)

    _strategy: Strategy = PrivateAttr()

    @field_validator("symbol")
    @classmethod
    def _check_symbol(cls, value: str) -> str:
        if "/" not in value:
            raise ValueError(f"{value!r} is not a ccxt symbol like BTC/USDT")
        return value

    @field_validator("timeframe")
    @classmethod
    def _check_timeframe(cls, value: str) -> str:
        if value not in TIMEFRAME_MINUTES:
            raise ValueError(f"unknown timeframe {value!r}; one of {', '.join(TIMEFRAME_MINUTES)}")
        return value

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, value: str) -> str:
        resolve(value)
        return value

    @model_validator(mode="after")
    def _build(self) -> StrategyConfig:
        if self.max_price is not None and self.max_price <= self.min_price:
            raise ValueError(f"max_price ({self.max_price}) must be above min_price")
        if self.order_value * (1 + self.fee) > self.capital:
            raise ValueError(
                f"order_value ({self.order_value}) plus fee exceeds capital ({self.capital})"
            )
        if self.start and self.end and self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        try:
            self._strategy = resolve(self.strategy).model_validate(self.params)
        except ValidationError as exc:
            problems = "; ".join(
                f"params.{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"strategy {self.strategy!r}: {problems}") from None
        return self

    @property
    def strategy_object(self) -> Strategy:
        """The strategy with its validated parameters."""
        return self._strategy

    def with_params(self, **params: Any) -> StrategyConfig:
        """The same config with some parameters replaced (validated), e.g. for a sweep."""
        data = self.model_dump()
        data["params"] = {**self.strategy_object.model_dump(), **params}
        return StrategyConfig.model_validate(data)


class SweepConfig(BaseModel):
    """A parameter grid for one configured strategy, ranked by one metric."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: AssetName
    strategy: str = Field(description="the `name` of a configured strategy")
    grid: dict[str, list[Any]] = Field(description="parameter -> values; every combination runs")
    rank_by: str = "sharpe"

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in value.items() if not v]
        if not value or empty:
            raise ValueError(f"every grid parameter needs values (empty: {empty or 'grid'})")
        return value


class StrategiesFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    strategies: list[StrategyConfig] = Field(default_factory=list)
    sweeps: list[SweepConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_references(self) -> StrategiesFile:
        names = [s.name for s in self.strategies]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"strategy names repeat: {', '.join(repeated)}")
        sweeps = [s.name for s in self.sweeps]
        if len(set(sweeps)) != len(sweeps):
            raise ValueError("sweep names repeat")
        for sweep in self.sweeps:
            if sweep.strategy not in names:
                raise ValueError(
                    f"sweep {sweep.name!r}: no configured strategy {sweep.strategy!r}; "
                    f"configured: {', '.join(names) or 'none'}"
                )
        return self

    def strategy(self, name: str) -> StrategyConfig:
        for config in self.strategies:
            if config.name == name:
                return config
        raise KeyError(name)


@lru_cache(maxsize=8)
def load_strategies(path: Path | None = None) -> StrategiesFile:
    """The strategies and sweeps in a YAML or JSON file (the built-in default when None);
    ConfigError naming the file, the entry and the field when anything is wrong."""
    path = Path(path) if path is not None else DEFAULT_STRATEGIES
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read strategies file {path}: {exc}") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"strategies file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    try:
        return StrategiesFile.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(_where(raw, err) + err["msg"] for err in exc.errors())
        raise ConfigError(f"strategies file {path}: {problems}") from exc


def _where(raw: Any, error: dict) -> str:
    """`strategies[0] (btc_mr).fee: ` for an error's location."""
    loc = list(error["loc"])
    parts = []
    node = raw
    for key in loc:
        if isinstance(key, int):
            name = node[key].get("name") if isinstance(node, list) and key < len(node) else None
            parts[-1] += f"[{key}]" + (f" ({name})" if isinstance(name, str) else "")
        else:
            parts.append(str(key))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) + ": " if parts else ""
