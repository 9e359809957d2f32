"""Run tag names, spelled once.

Dagster's partition tags are part of its CLI and run-request contract (a user passes them to
`dagster job launch --tags`), but dagster exports no public constant for them;
tests/dagster/test_tags.py holds these strings to Dagster's own, so an upgrade that renames
one fails there.
"""

# Dagster's: a run of one partition, or of a single-run partition range.
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

# Set by the minutely schedule: a run that tops up the open month keeps what is stored closed
# (candles of closed days, bars built from unchanged candles) instead of redoing the month.
TOP_UP_TAG = "candlestack/top_up"
# The strategy a dry-run run trades, and the bar it was started for.
STRATEGY_TAG = "candlestack/strategy"
BAR_OPEN_TAG = "candlestack/bar_open"
# The process executing a run (pipelines.stuck_runs).
WORKER_TAG = "candlestack/run_worker"
