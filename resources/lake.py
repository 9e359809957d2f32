"""The lake and its DuckDB catalog as a Dagster resource."""

import dagster as dg

from candlestack.lake import Lake


class LakeResource(dg.ConfigurableResource):
    """Where the Parquet lake and the DuckDB catalog file live."""

    root: str = "data/lake"  # a local folder, or s3://bucket/prefix
    catalog_path: str = "data/catalog.duckdb"
    reports_path: str = "data/reports"

    @property
    def lake(self) -> Lake:
        return Lake(self.root)

    def rebuild_catalog(self) -> dict[str, int]:
        # Imported here: duckdb takes ~0.1 s to import, and only the catalog asset needs it.
        from candlestack.catalog import build_catalog

        return build_catalog(self.lake, self.catalog_path)
