"""The whole live path on this machine, for the end-to-end test and bench/live.py: the
loopback Binance (kline stream and REST) replaying a recorded day as today on the wall
clock, the live collector (`python -m candlestack.live`, as deployed), and a real
dagster-daemon running the dry_run_bars sensor and its dry-run runs, on an isolated
instance, lake and ledger.

No REST schedule runs: every candle the runs see came through the collector.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from candlestack.backtest import config_signals
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.ledger import Ledger
from candlestack.sources.ccxt_source import CcxtSource
from candlestack.strategies.config import StrategyConfig
from tests.conftest import isolated_env
from tests.integration.daemon import BIN, DRY_RUN_STRATEGIES, ROOT, dagster, running_daemon
from tests.integration.fake_binance import OHLCV_DIR, FakeBinance
from tests.integration.fake_binance_ws import FakeBinanceWS

MARKETS = {"BTCUSDT": OHLCV_DIR / "tooyipjee_binance_BTCUSDT_1m.csv"}
# Whole recorded days (each minute there) inside the recording, one of which is served as
# today: the one whose strategy enters soon after now's time of day.
RECORDED_DAYS = [date(2021, 4, 21) + timedelta(days=n) for n in range(28)]
DAY_MS = 86_400_000
DAY = timedelta(days=1)
ENTRY_AFTER = (timedelta(minutes=3), timedelta(minutes=6))  # past the collector's start-up


@dataclass
class LiveStack:
    env: dict[str, str]
    ws: FakeBinanceWS
    rest: FakeBinance
    collector: subprocess.Popen
    shift_ms: int  # served = recorded + shift_ms

    @property
    def ledger_url(self) -> str:
        return self.env["CANDLESTACK_LEDGER_URL"]

    @property
    def lake(self) -> Lake:
        return Lake(self.env["CANDLESTACK_LAKE"])


def recorded_day_entering_soon(strategies: str, now: datetime) -> date:
    """A recorded day on which the first strategy enters between ENTRY_AFTER after `now`'s
    time of day, its signals computed from midnight, as the dry-run computes them."""
    config = StrategyConfig.model_validate(yaml.safe_load(strategies)["strategies"][0])
    candles = pl.read_csv(MARKETS["BTCUSDT"]).select(
        pl.col("ts_ms").cast(pl.Datetime("ms", "UTC")).alias("ts"),
        *(pl.col(c).cast(pl.Float64) for c in ("open", "high", "low", "close", "volume")),
    )
    since_midnight = now - datetime(now.year, now.month, now.day, tzinfo=UTC)
    for day in RECORDED_DAYS:
        midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
        bars = candles.filter(pl.col("ts").is_between(midnight, midnight + DAY, closed="left"))
        entry, _ = config_signals(config, bars)
        entries = bars.filter(pl.Series(entry)).get_column("ts")
        early, late = (midnight + since_midnight + after for after in ENTRY_AFTER)
        if entries.is_between(early, late).any():
            return day
    raise AssertionError(f"no recorded day enters within {ENTRY_AFTER} of {now:%H:%M}")


@contextmanager
def live_stack(tmp_path: Path, strategies: str = DRY_RUN_STRATEGIES) -> Iterator[LiveStack]:
    """Everything running until the block ends; then the daemon (and its runs) and the
    collector are stopped with SIGTERM, as a deployment stops them."""
    now = datetime.now(UTC)
    today = now.date()
    since_midnight = now - datetime(today.year, today.month, today.day, tzinfo=UTC)
    # The strategy's features warm up on the day's first hour: it cannot enter before.
    if not timedelta(hours=1) < since_midnight < timedelta(hours=23, minutes=45):
        pytest.skip("too close to midnight UTC: a day too short to warm up on, or ending")
    shift_ms = (today - recorded_day_entering_soon(strategies, now)).days * DAY_MS
    with ExitStack() as stack:
        ws = stack.enter_context(
            FakeBinanceWS(MARKETS, start_ms=0, shift_ms=shift_ms, wall_clock=True)
        )
        rest = stack.enter_context(FakeBinance(MARKETS, now_ms=ws.now_ms, shift_ms=shift_ms))
        options = rest.ccxt_config()
        options["urls"]["api"] |= ws.ccxt_config()["urls"]["api"]
        (tmp_path / "strategies.yaml").write_text(strategies)
        env = isolated_env(
            tmp_path,
            source="ccxt",
            symbols="BTC/USDT",
            strategies=str(tmp_path / "strategies.yaml"),
            ccxt_options=json.dumps(options),
        )
        # Today's market rules, as the daily markets schedule stores them.
        rules = CcxtSource("binance", options).load_markets()
        write_parquet_atomic(
            Lake(env["CANDLESTACK_LAKE"]).markets_path("binance", today), rules.to_arrow(), {}
        )
        # The repository's instance settings (run queue, sensor threads, pools) without its
        # storage paths: what a deployment runs with.
        shipped = yaml.safe_load((ROOT / "dagster.yaml").read_text())
        for local in ("storage", "local_artifact_storage", "compute_logs"):
            shipped.pop(local)
        Path(env["DAGSTER_HOME"], "dagster.yaml").write_text(yaml.safe_dump(shipped))
        Ledger(env["CANDLESTACK_LEDGER_URL"]).migrate()  # as a deployment's first start does
        dagster(env, "sensor", "start", "dry_run_bars")
        log = stack.enter_context((tmp_path / "live.log").open("w"))
        collector = subprocess.Popen(
            [BIN / "python", "-m", "candlestack.live"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            stack.enter_context(running_daemon(env))
            yield LiveStack(env, ws, rest, collector, shift_ms)
        finally:
            collector.send_signal(signal.SIGTERM)
            collector.wait(timeout=30)


def recorded_open(stack: LiveStack, ts: datetime) -> float:
    """The recording's open of the minute served at `ts`."""
    recorded_ms = int(ts.timestamp() * 1000) - stack.shift_ms
    with MARKETS["BTCUSDT"].open() as fh:
        for line in fh:
            if line.startswith(f"{recorded_ms},"):
                return float(line.split(",")[1])
    raise KeyError(ts)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""
