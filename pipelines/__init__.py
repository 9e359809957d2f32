"""The Dagster code location: definitions, jobs, schedules (nothing imports this package)."""
