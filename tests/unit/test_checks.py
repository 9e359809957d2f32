"""The OHLC sanity check reads the stored files back and names the broken day and rule."""

from datetime import date, timedelta

import polars as pl
import pytest

from candlestack import checks
from candlestack.checks import ohlc_violations, sanity_failures
from candlestack.ingest import Ingestor, day_start_ms
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.sources.synthetic import SyntheticSource

DAYS = [date(2024, 2, 1) + timedelta(days=i) for i in range(3)]


def _ingest(tmp_path):
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 1.8e9)
    return Ingestor(source, Lake(tmp_path)).ingest("BTC/USDT", DAYS)


def test_clean_lake_passes(tmp_path):
    outcomes = _ingest(tmp_path)
    assert sanity_failures((o.symbol, o.day, o.path) for o in outcomes).is_empty()


# Files are read back in batches: the broken day is found whichever batch it falls in.
@pytest.mark.parametrize("batch_files", [checks.SANITY_BATCH_FILES, 1, 2])
def test_a_corrupted_file_is_named_with_the_rules_it_breaks(tmp_path, monkeypatch, batch_files):
    monkeypatch.setattr(checks, "SANITY_BATCH_FILES", batch_files)
    outcomes = _ingest(tmp_path)
    bad = outcomes[1]
    stored = pl.read_parquet(bad.path)
    corrupted = pl.concat(
        [
            stored.with_columns(
                high=pl.when(pl.int_range(pl.len()) == 10).then(0.0).otherwise("high")
            ),
            stored.head(1),  # the same minute twice
            stored.tail(1).with_columns(pl.col("ts") + pl.duration(minutes=1)),  # next day
        ]
    )
    write_parquet_atomic(bad.path, corrupted.to_arrow(), {})

    failures = sanity_failures((o.symbol, o.day, o.path) for o in outcomes)

    assert failures["date"].to_list() == [str(bad.day)]
    violations = failures["violations"][0]
    for rule in ("high_below_body", "duplicate_ts", "not_increasing", "outside_day"):
        assert rule in violations, rule
    assert "negative_volume" not in violations
    # The one-scan check and the single-frame rules agree.
    single = ohlc_violations(corrupted, day_start_ms(bad.day))
    assert str({k: v for k, v in single.items() if v}) == violations
