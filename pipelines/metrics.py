"""The Prometheus endpoint: `python -m pipelines.metrics` (or `make metrics`).

Serves http://CANDLESTACK_METRICS_HOST:CANDLESTACK_METRICS_PORT/metrics (127.0.0.1:9464 by
default) with the lake's and ledger's figures (candlestack.metrics) and, from the Dagster
instance of DAGSTER_HOME, each check's latest result and the drift checks' figures. Every
figure is computed when scraped.
"""

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import dagster as dg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from assets.dry_run import DRIFT_CHECK, enabled_strategies
from assets.keys import dry_run_key
from candlestack.config import Settings, load_settings
from candlestack.lake import Lake
from candlestack.live_status import read_status
from candlestack.metrics import (
    PREFIX,
    SourcesCollector,
    lake_metrics,
    ledger_metrics,
    live_metrics,
)
from pipelines.dagster_adapter import (
    COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES,
    AssetCheckExecutionRecordStatus,
)
from pipelines.definitions import defs
from resources import LedgerResource

logger = logging.getLogger(__name__)


def instance_metrics(
    instance: dg.DagsterInstance, check_keys: Sequence[dg.AssetCheckKey]
) -> list[Metric]:
    """Each check's latest completed evaluation, and the figures of each drift check's."""
    failed = GaugeMetricFamily(
        PREFIX + "check_failed",
        "1 if the check's latest completed evaluation failed, 0 if it passed",
        labels=["asset", "check", "severity"],
    )
    drift = GaugeMetricFamily(
        PREFIX + "drift",
        "The latest drift check's figures (candlestack.drift), per strategy and figure",
        labels=["strategy", "metric"],
    )
    strategy_by_asset = {dry_run_key(c.name): c.name for c in enabled_strategies}
    storage = instance.event_log_storage
    for key in sorted(check_keys, key=lambda k: (k.asset_key.to_user_string(), k.name)):
        records = storage.get_asset_check_execution_history(
            key, limit=1, status=COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES
        )
        if not records or records[0].event is None:
            continue
        evaluation = records[0].event.dagster_event.event_specific_data
        failed.add_metric(
            [key.asset_key.to_user_string(), key.name, evaluation.severity.value.lower()],
            float(records[0].status == AssetCheckExecutionRecordStatus.FAILED),
        )
        if key.name == DRIFT_CHECK and key.asset_key in strategy_by_asset:
            for name, entry in evaluation.metadata.items():
                if isinstance(entry.value, int | float) and not isinstance(entry.value, bool):
                    drift.add_metric([strategy_by_asset[key.asset_key], name], entry.value)
    return [failed, drift]


def build_registry(settings: Settings, instance: dg.DagsterInstance) -> CollectorRegistry:
    """A fresh registry with one collector (no process or platform metrics of this exporter)."""
    lake = Lake(settings.lake)
    ledger = LedgerResource(url=settings.ledger_url)
    check_keys = list(defs.resolve_asset_graph().asset_check_keys)
    registry = CollectorRegistry()
    registry.register(
        SourcesCollector(
            {
                "lake": lambda now: lake_metrics(lake, settings.exchange_id, settings.symbols, now),
                "ledger": lambda now: ledger_metrics(ledger.open(), enabled_strategies, now),
                "instance": lambda now: instance_metrics(instance, check_keys),
                "live": lambda now: live_metrics(read_status(settings.live_status), now),
            },
            clock=lambda: datetime.now(UTC),
        )
    )
    return registry


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = load_settings()
    with dg.DagsterInstance.get() as instance:
        start_http_server(
            settings.metrics_port,
            settings.metrics_host,
            registry=build_registry(settings, instance),
        )
        logger.info(
            "serving metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port
        )
        threading.Event().wait()  # the server's thread is a daemon: keep the process up


if __name__ == "__main__":
    main()
