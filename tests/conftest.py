import os
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from candlestack.gaps import fill, gap_report, missing_runs
from candlestack.schema import DAY_MS, day_start_ms
from candlestack.validate import validate

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OHLCV = SHARED / "ohlcv"
EXCHANGE_INFO = SHARED / "exchange" / "spot_api_v3_exchangeInfo_2021-03-24_mainnet_subset13.json"
REPLAY_FILES = {
    "BTC/USDT": OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv",
    "ETH/USDT": OHLCV / "tooyipjee_binance_ETHUSDT_1m.csv",
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED}: clone beside ../shared")
    return SHARED


INSTANCE_SETTINGS = """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
telemetry:
  enabled: false
"""


def isolated_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """Environment for a dagster subprocess: its own DAGSTER_HOME, lake and catalog under
    tmp_path, none of the caller's CANDLESTACK_* settings, plus `settings`."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    # The repository's instance settings (run queue, telemetry) without its storage paths.
    (home / "dagster.yaml").write_text(INSTANCE_SETTINGS)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")},
        "DAGSTER_HOME": str(home),
        "CANDLESTACK_LAKE": str(tmp_path / "lake"),
        "CANDLESTACK_CATALOG": str(tmp_path / "catalog.duckdb"),
        "CANDLESTACK_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
        "CANDLESTACK_REPORTS": str(tmp_path / "reports"),
        "CANDLESTACK_LIVE_STATUS": str(tmp_path / "live" / "status.json"),
        "CANDLESTACK_LIVE_OPENS": str(tmp_path / "live" / "opens"),
        **{f"CANDLESTACK_{name.upper()}": value for name, value in settings.items()},
    }


def candle_day(raw: pl.DataFrame, day: date) -> tuple[pl.DataFrame, dict, pl.DataFrame]:
    """A day's 1-minute candles, report and gap table, as ingest made them."""
    start = day_start_ms(day)
    raw = raw.filter(pl.col("ts").is_between(start, start + DAY_MS, closed="left"))
    clean, rejected = validate(raw, start, start + DAY_MS)
    runs = missing_runs(clean["ts"].to_numpy(), start, start + DAY_MS)
    candles = fill(clean, start, start + DAY_MS, previous_close=None)
    imputed = candles.filter("imputed")["ts"].dt.epoch("ms").to_numpy()
    gaps = gap_report(runs, candles["ts"].dt.epoch("ms").to_numpy(), imputed)
    report = {
        "expected": 1440,
        "rows": candles.height,
        "missing_found": int(gaps["minutes"].sum()),
        "refetched": 0,
        "imputed": int(imputed.size),
        "missing": 1440 - candles.height,
        "rejected": rejected.height,
        "first_ts": candles["ts"].min(),
        "last_ts": candles["ts"].max(),
        "source": "replay",
        "day_closed": True,
    }
    return candles, report, gaps


# --- damaged lake files ---------------------------------------------------------------


def truncate(path: Path) -> None:
    """Keep the first half of a file: a copy or a disk cut short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_with_garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def flip_data_bytes(path: Path) -> None:
    """Flip 16 bytes in the middle of a Parquet file's data pages (between its leading
    magic and its footer): its footer (reports, content hashes) still reads as it was."""
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    middle = footer_start // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # the footer still parses


DAMAGE = {"truncated": truncate, "garbage": overwrite_with_garbage, "data": flip_data_bytes}


def quarantined(lake_root: Path) -> list[Path]:
    """The files moved aside under a lake's quarantine folder."""
    return sorted(p for p in (lake_root / "_quarantine").rglob("*") if p.is_file())
