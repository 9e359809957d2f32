"""The lake and its DuckDB catalog as a Dagster resource."""

import dagster as dg
from pydantic import Field

from candlestack.config import Settings
from candlestack.lake import Lake

_DEFAULTS = Settings.model_fields


class LakeResource(dg.ConfigurableResource):
    """Where the Parquet lake and the DuckDB catalog file live."""

    root: str = "data/lake"  # a local folder, or s3://bucket/prefix
    catalog_path: str = "data/catalog.duckdb"
    reports_path: str = "data/reports"
    # The quality rules of what the lake stores; the settings' defaults unless configured.
    imputed_max_share: float = Field(
        _DEFAULTS["imputed_max_share"].default, description="CANDLESTACK_IMPUTED_MAX_SHARE"
    )
    zero_volume_max_share: float = Field(
        _DEFAULTS["zero_volume_max_share"].default,
        description="CANDLESTACK_ZERO_VOLUME_MAX_SHARE",
    )
    freshness_lag_minutes: int = Field(
        _DEFAULTS["freshness_lag_minutes"].default,
        description="CANDLESTACK_FRESHNESS_LAG_MINUTES",
    )

    @property
    def lake(self) -> Lake:
        return Lake(self.root)

    def rebuild_catalog(self) -> dict[str, int]:
        # Imported here: duckdb takes ~0.1 s to import, and only the catalog asset needs it.
        from candlestack.catalog import build_catalog

        return build_catalog(self.lake, self.catalog_path)
