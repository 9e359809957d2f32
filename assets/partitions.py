"""Partition definitions, declared once.

Every time-partitioned asset (candles, bars, features) is partitioned by UTC month x symbol:
keys `2021-04-01|BTC-USDT`. Day x symbol meant 12-21 ms of Dagster bookkeeping per partition
and one small file per symbol-day; a month is one file and one partition, and each month's
materialization still carries its per-day table. The symbol dimension is a static list read
from CANDLESTACK_SYMBOLS when the code location loads: adding a symbol is a settings change
and a reload, no code; and unlike dynamic partitions it needs no sensor or instance write
before a CLI backfill can name it.
"""

from collections.abc import Sequence
from datetime import date

import dagster as dg

from assets.tags import TOP_UP_TAG
from candlestack.config import symbol_key
from candlestack.lake import month_of
from resources.deployment import settings

# The symbols and first day the partitions hold, for the assets that ingest and grade them.
symbols = settings.symbols
symbol_by_key = settings.symbol_by_key
start_date = settings.start_date

# end_offset=1: the current month's partition exists while the month is open, so the
# minutely schedule can keep it current.
monthly_partitions = dg.MonthlyPartitionsDefinition(
    start_date=month_of(settings.start_date).isoformat(), timezone="UTC", end_offset=1
)
# The market-rule snapshots stay daily: one small file per exchange and day, no symbol.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=settings.start_date.isoformat(), timezone="UTC", end_offset=1
)
symbol_partitions = dg.StaticPartitionsDefinition([symbol_key(s) for s in settings.symbols])


class _CandlePartitions(dg.MultiPartitionsDefinition):
    """Month x symbol, with the expansion of a key range memoised.

    Dagster re-expands the run's whole range on every per-partition `add_asset_metadata`
    call, to check the key. With a time and a static dimension, a range's keys depend only
    on its two ends, so they are kept.
    """

    def get_partition_keys_in_range(self, partition_key_range, dynamic_partitions_store=None):
        cache: dict[dg.PartitionKeyRange, Sequence[str]] = self.__dict__.setdefault("_keys", {})
        if partition_key_range not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[partition_key_range] = tuple(
                super().get_partition_keys_in_range(partition_key_range, dynamic_partitions_store)
            )
        return cache[partition_key_range]


candle_partitions = _CandlePartitions({"month": monthly_partitions, "symbol": symbol_partitions})

# One run per backfill by default; runs of N symbol-months with CANDLESTACK_BACKFILL_RUN_PARTITIONS.
candle_backfill_policy = (
    dg.BackfillPolicy.multi_run(settings.backfill_run_partitions)
    if settings.backfill_run_partitions
    else dg.BackfillPolicy.single_run()
)


def month_key(day: date | str, symbol: str) -> str:
    """The partition key of the month holding `day`, for one symbol key."""
    return str(dg.MultiPartitionKey({"month": month_of(day).isoformat(), "symbol": symbol}))


def candle_range(first_day: str, last_day: str) -> dg.PartitionKeyRange:
    """Every symbol for the months of first_day..last_day, as one single-run range."""
    keys = symbol_partitions.get_partition_keys()
    return dg.PartitionKeyRange(
        start=month_key(first_day, keys[0]), end=month_key(last_day, keys[-1])
    )


def is_top_up(context: dg.AssetExecutionContext) -> bool:
    return context.run.tags.get(TOP_UP_TAG) == "open_month"


def symbol_months(partition_keys: Sequence[str]) -> dict[str, dict[date, str]]:
    """symbol key -> month (its first day) -> partition key, for the keys a run targets."""
    known = set(symbol_partitions.get_partition_keys())
    by_symbol: dict[str, dict[date, str]] = {}
    for key in partition_keys:
        dims = candle_partitions.get_partition_key_from_str(key).keys_by_dimension
        if dims["symbol"] not in known:
            raise dg.Failure(f"symbol partition {dims['symbol']} is not in CANDLESTACK_SYMBOLS")
        by_symbol.setdefault(dims["symbol"], {})[date.fromisoformat(dims["month"])] = key
    return dict(sorted(by_symbol.items()))
