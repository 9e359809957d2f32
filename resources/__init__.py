"""Dagster ConfigurableResources: candle sources, the lake and the dry-run ledger."""

from resources.lake import LakeResource
from resources.ledger import LedgerResource
from resources.sources import (
    CandleSourceResource,
    CcxtSourceResource,
    ReplaySourceResource,
    SyntheticSourceResource,
    source_resource,
)

__all__ = [
    "CandleSourceResource",
    "CcxtSourceResource",
    "LakeResource",
    "LedgerResource",
    "ReplaySourceResource",
    "SyntheticSourceResource",
    "source_resource",
]
