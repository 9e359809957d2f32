"""Dagster ConfigurableResources: candle sources, the lake, the dry-run ledger and alerts."""

from resources.alerts import AlertResource
from resources.lake import LakeResource
from resources.ledger import LedgerResource, ledger_resource
from resources.sources import (
    CandleSourceResource,
    CcxtSourceResource,
    ReplaySourceResource,
    SyntheticSourceResource,
    source_resource,
)

__all__ = [
    "AlertResource",
    "CandleSourceResource",
    "CcxtSourceResource",
    "LakeResource",
    "LedgerResource",
    "ReplaySourceResource",
    "SyntheticSourceResource",
    "ledger_resource",
    "source_resource",
]
