"""Partition definitions, declared once.

1-minute candles are partitioned by UTC day x symbol. The symbol dimension is a
static list read from CANDLESTACK_SYMBOLS when the code location loads: adding a
symbol is a settings change and a reload, no code; and unlike dynamic partitions
it needs no sensor or instance write before a CLI backfill can name it.
"""

from collections.abc import Sequence
from datetime import date

import dagster as dg

from candlestack.config import load_settings, symbol_key

settings = load_settings()

# end_offset=1: today's partition exists while the day is open, so the minutely
# schedule can keep it current.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=settings.start_date.isoformat(), timezone="UTC", end_offset=1
)
symbol_partitions = dg.StaticPartitionsDefinition([symbol_key(s) for s in settings.symbols])


class _CandlePartitions(dg.MultiPartitionsDefinition):
    """Day x symbol, with the expansion of a key range memoised.

    Dagster re-expands the run's whole range on every per-partition
    `add_asset_metadata` call, to check the key: 12.8 ms for a year x 3 symbols, so
    14 s of a one-year backfill went to that alone. With a time and a static
    dimension, a range's keys depend only on its two ends, so they are kept.
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


candle_partitions = _CandlePartitions({"date": daily_partitions, "symbol": symbol_partitions})


def candle_range(first_day: str, last_day: str) -> dg.PartitionKeyRange:
    """Every symbol for days first_day..last_day, as one single-run range."""
    keys = symbol_partitions.get_partition_keys()
    return dg.PartitionKeyRange(
        start=str(dg.MultiPartitionKey({"date": first_day, "symbol": keys[0]})),
        end=str(dg.MultiPartitionKey({"date": last_day, "symbol": keys[-1]})),
    )


def symbol_days(partition_keys: Sequence[str]) -> dict[str, dict[date, str]]:
    """symbol key -> day -> partition key, for the keys a run targets."""
    known = set(symbol_partitions.get_partition_keys())
    by_symbol: dict[str, dict[date, str]] = {}
    for key in partition_keys:
        dims = candle_partitions.get_partition_key_from_str(key).keys_by_dimension
        if dims["symbol"] not in known:
            raise dg.Failure(f"symbol partition {dims['symbol']} is not in CANDLESTACK_SYMBOLS")
        by_symbol.setdefault(dims["symbol"], {})[date.fromisoformat(dims["date"])] = key
    return by_symbol
