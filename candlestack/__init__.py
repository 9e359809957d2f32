"""candlestack: the pure computation behind the Dagster pipelines (no Dagster imports here)."""
