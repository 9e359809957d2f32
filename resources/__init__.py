"""Dagster ConfigurableResources: candle sources and the lake."""

from resources.lake import LakeResource
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
    "ReplaySourceResource",
    "SyntheticSourceResource",
    "source_resource",
]
