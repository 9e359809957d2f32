"""A run worker loading the code location imports none of ccxt, duckdb or requests (~0.8 s
of its start, which Dagster itself does not need): the source resources name their exchange
without building a client (and the dry-run builds one only when the live stream lacks the
fill's open: test_dry_run_assets); the catalog and the alert posts import theirs when used."""

import subprocess
import sys
from pathlib import Path

import pytest

from resources import CcxtSourceResource, ReplaySourceResource, SyntheticSourceResource
from tests.conftest import REPLAY_FILES, isolated_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("source", ["synthetic", "replay", "ccxt"])
def test_the_code_location_loads_without_ccxt_duckdb_or_requests(tmp_path, source):
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipelines.definitions; print(*sys.modules)"],
        env={**isolated_env(tmp_path, source=source), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    modules = loaded.split()
    assert "pipelines.definitions" in modules
    unwanted = ("ccxt", "duckdb", "requests")
    assert not [m for m in modules if m.split(".")[0] in unwanted]


@pytest.mark.parametrize(
    "resource",
    [
        SyntheticSourceResource(symbols=["BTC/USDT"]),
        ReplaySourceResource(files={s: str(p) for s, p in REPLAY_FILES.items()}, exchange="kraken"),
        CcxtSourceResource(exchange="kraken"),
    ],
    ids=["synthetic", "replay", "ccxt"],
)
def test_each_source_resource_names_the_exchange_its_source_has(resource):
    assert resource.exchange_name() == resource.open().exchange
