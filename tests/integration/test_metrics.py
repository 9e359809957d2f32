"""The Prometheus endpoint for real: `python -m pipelines.metrics` serving a lake, a dry-run
ledger and a Dagster instance filled by real runs, scraped over HTTP and parsed."""

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from assets.dry_run import drift_checks, dry_run_assets, enabled_strategies
from assets.market_data import candles_1m, candles_freshness
from candlestack.dryrun import latency_stats
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.sources.synthetic import SyntheticSource
from pipelines.sensors import dry_run_bars
from resources import LakeResource, LedgerResource, SyntheticSourceResource
from tests.conftest import isolated_env

STRATEGY = "btc_scalp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    families = text_string_to_metric_families(requests.get(url, timeout=30).text)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def labels(**values: str) -> tuple:
    return tuple(sorted(values.items()))


@pytest.fixture
def filled(tmp_path):
    """A lake of yesterday's and today's BTC minutes, a 10-bar dry-run session, a failed
    freshness check and a drift check, in a SQLite Dagster instance under tmp_path."""
    today = datetime.now(UTC).date()
    if datetime.now(UTC) - datetime.combine(today, datetime.min.time(), UTC) < timedelta(
        minutes=20
    ):
        pytest.skip("too close to midnight UTC for a session of today's bars")
    env = isolated_env(tmp_path, symbols="BTC/USDT", metrics_port=str(free_port()))
    lake = Lake(env["CANDLESTACK_LAKE"])
    source = SyntheticSource(seed=7, symbols=["BTC/USDT"])
    Ingestor(source, lake).ingest("BTC/USDT", [today - timedelta(days=1), today])
    for day in (today - timedelta(days=1), today):
        write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    resources = {
        "source": SyntheticSourceResource(symbols=["BTC/USDT"]),
        "lake": LakeResource(root=env["CANDLESTACK_LAKE"]),
        "ledger": LedgerResource(url=env["CANDLESTACK_LEDGER_URL"]),
    }
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    strategy = next(a for a in dry_run_assets if a.key == dg.AssetKey(f"dryrun_{STRATEGY}"))
    cursor = dry_run_bars(dg.build_sensor_context(instance=instance, resources=resources)).cursor
    newest = datetime.fromisoformat(json.loads(cursor)[STRATEGY])
    behind = json.dumps({STRATEGY: (newest - timedelta(minutes=10)).isoformat()})
    context = dg.build_sensor_context(instance=instance, cursor=behind, resources=resources)
    for request in dry_run_bars(context).run_requests:
        dg.materialize(
            [strategy], run_config=request.run_config, resources=resources, instance=instance
        )
    # The test process has the default three symbols: ETH and SOL have no candle today.
    dg.materialize(
        [candles_1m, candles_freshness],
        selection=dg.AssetSelection.checks(candles_freshness),
        resources=resources,
        instance=instance,
    )
    drift_check = next(
        c for c in drift_checks if any(k.asset_key == strategy.key for k in c.check_keys)
    )
    drifted = dg.materialize(
        [strategy, drift_check],
        selection=dg.AssetSelection.checks(drift_check),
        resources=resources,
        instance=instance,
    )
    resources["ledger"].open().trip("btc_ma_cross", "exchange maintenance", "test")
    yield env, lake, resources["ledger"].open(), drifted.get_asset_check_evaluations()[0]
    instance.dispose()


@pytest.fixture
def endpoint(filled):
    env = filled[0]
    url = f"http://127.0.0.1:{env['CANDLESTACK_METRICS_PORT']}/metrics"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipelines.metrics"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            requests.get(url, timeout=5)
            break
        except requests.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the metrics server did not come up:\n{server.communicate()[0]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_scraped_metrics_are_what_the_lake_ledger_and_instance_hold(filled, endpoint):
    _, lake, ledger, drift = filled
    metrics = scrape(endpoint)
    scraped_at = datetime.now(UTC)

    for source in ("lake", "ledger", "instance"):
        assert metrics[("candlestack_metrics_source_up", labels(source=source))] == 1

    # Candle lag and imputed share, from the files of the lake.
    # One file per month: yesterday's and today's minutes, in one or two month files.
    files = lake.month_files("ohlcv", "synthetic", "1m", "BTC-USDT")
    assert 1 <= len(files) <= 2
    candles = pl.read_parquet(list(files.values()), columns=["ts", "imputed"])
    close = candles.get_column("ts").max() + timedelta(minutes=1)
    lag = metrics[("candlestack_candle_lag_seconds", labels(symbol="BTC/USDT"))]
    assert (scraped_at - close).total_seconds() - 5 <= lag <= (scraped_at - close).total_seconds()
    window = candles.filter(pl.col("ts") >= scraped_at - timedelta(hours=24))
    share = metrics[("candlestack_imputed_share_24h", labels(symbol="BTC/USDT"))]
    assert share == pytest.approx(window.get_column("imputed").mean(), abs=2 / window.height)

    # Each check's latest result, and the drift check's figures.
    failed = "candlestack_check_failed"
    assert metrics[(failed, labels(asset="candles_1m", check="freshness", severity="warn"))] == 1
    drift_labels = labels(asset=f"dryrun_{STRATEGY}", check="drift", severity="error")
    assert metrics[(failed, drift_labels)] == float(not drift.passed)
    for figure in ("signal_agreement", "bars_compared", "pnl_diff"):
        scraped = metrics[("candlestack_drift", labels(strategy=STRATEGY, metric=figure))]
        assert scraped == drift.metadata[figure].value

    # Dry-run latency, orders and the kill switch, from the ledger.
    config = next(c for c in enabled_strategies if c.name == STRATEGY)
    stats = latency_stats(ledger.decisions(STRATEGY), config.timeframe)
    assert ledger.decisions(STRATEGY).height == 10
    for q, name in (("0.5", "p50"), ("0.95", "p95")):
        compute = metrics[
            ("candlestack_dryrun_decision_compute_seconds", labels(strategy=STRATEGY, quantile=q))
        ]
        assert compute == pytest.approx(stats[f"decision_compute_{name}_ms"] / 1000)
        latency = (
            "candlestack_dryrun_close_to_fill_seconds",
            labels(strategy=STRATEGY, quantile=q),
        )
        if f"close_to_fill_{name}_s" in stats:
            assert metrics[latency] == pytest.approx(stats[f"close_to_fill_{name}_s"])
    orders = ledger.orders(STRATEGY)
    rejected = orders.filter(pl.col("status") == "rejected").height
    for status, count in (("filled", orders.height - rejected), ("rejected", rejected)):
        key = ("candlestack_dryrun_orders_today", labels(strategy=STRATEGY, status=status))
        assert metrics[key] == count
    ratio = ("candlestack_dryrun_order_rejection_ratio_today", labels(strategy=STRATEGY))
    assert metrics.get(ratio) == (rejected / orders.height if orders.height else None)
    tripped = "candlestack_kill_switch_tripped"
    assert metrics[(tripped, labels(scope="btc_ma_cross"))] == 1
    assert metrics[(tripped, labels(scope=STRATEGY))] == 0
    assert metrics[(tripped, labels(scope="*"))] == 0

    # Computed at scrape time: a trip now shows on the next scrape.
    ledger.trip("*", "all stop", "test")
    assert scrape(endpoint)[(tripped, labels(scope="*"))] == 1
