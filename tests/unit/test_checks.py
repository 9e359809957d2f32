"""The OHLC sanity check reads the stored month files back and names the broken day and rule."""

from datetime import date, timedelta

import polars as pl
import pytest

from candlestack import checks
from candlestack.checks import gap_failure, ohlc_violations, sanity_failures
from candlestack.errors import LakeError
from candlestack.ingest import Ingestor, day_start_ms
from candlestack.lake import Lake, month_of, write_parquet_atomic
from candlestack.sources.synthetic import SyntheticSource
from tests.conftest import truncate

# Two days at the end of January and two at the start of February: two month files.
DAYS = [date(2024, 1, 30) + timedelta(days=i) for i in range(4)]
JAN, FEB = date(2024, 1, 1), date(2024, 2, 1)


def _ingest(tmp_path):
    source = SyntheticSource(symbols=["BTC/USDT"], clock=lambda: 1.8e9)
    return Ingestor(source, Lake(tmp_path)).ingest("BTC/USDT", DAYS)


def _months(outcomes):
    """The (symbol, month, file) triples of the month files the outcomes were written to."""
    return sorted({(o.symbol, month_of(o.day), o.path) for o in outcomes})


def test_clean_lake_passes(tmp_path):
    outcomes = _ingest(tmp_path)
    months = _months(outcomes)
    assert [m for _, m, _ in months] == [JAN, FEB]
    assert sanity_failures(months).is_empty()


def _corrupt_january(outcomes):
    """Break the last January day of its month file: a high under the body, a minute stored
    twice, and a row of the next month at the end."""
    jan_file = next(o.path for o in outcomes if o.day.month == 1)
    stored = pl.read_parquet(jan_file)
    bad_day = date(2024, 1, 31)
    day_rows = stored.filter(pl.col("ts").dt.date() == bad_day)
    row_of_bad_day = stored.height - day_rows.height + 10
    corrupted = pl.concat(
        [
            stored.with_columns(
                high=pl.when(pl.int_range(pl.len()) == row_of_bad_day).then(0.0).otherwise("high")
            ),
            day_rows.head(1),  # the same minute twice
            day_rows.tail(1).with_columns(pl.col("ts") + pl.duration(minutes=1)),  # February
        ]
    )
    write_parquet_atomic(jan_file, corrupted.to_arrow(), {})
    return bad_day, corrupted


# Files are read back in batches: the broken day is found whichever batch it falls in, and
# the result is the same whichever files share a batch.
@pytest.mark.parametrize("batch_files", [checks.SANITY_BATCH_FILES, 1, 2])
def test_a_corrupted_file_is_named_with_the_rules_it_breaks(tmp_path, monkeypatch, batch_files):
    monkeypatch.setattr(checks, "SANITY_BATCH_FILES", batch_files)
    outcomes = _ingest(tmp_path)
    bad_day, corrupted = _corrupt_january(outcomes)

    failures = sanity_failures(_months(outcomes))

    # January 31 breaks the OHLC rules; the stray row is a February minute in January's file.
    assert failures["date"].to_list() == [str(bad_day), "2024-02-01"]
    assert failures["symbol"].to_list() == ["BTC/USDT"] * 2
    violations = failures["violations"][0]
    for rule in ("high_below_body", "duplicate_ts", "not_increasing"):
        assert rule in violations, rule
    assert "negative_volume" not in violations
    assert "outside_month" not in violations
    assert failures["violations"][1] == str({"outside_month": 1})
    # The one-scan check and the single-frame rules agree on the broken day.
    day_rows = corrupted.filter(pl.col("ts").dt.date() == bad_day)
    single = ohlc_violations(day_rows, day_start_ms(bad_day))
    assert str({k: v for k, v in single.items() if v}) == violations


def test_the_untouched_month_and_days_pass(tmp_path):
    outcomes = _ingest(tmp_path)
    _corrupt_january(outcomes)
    february = [m for m in _months(outcomes) if m[1] == FEB]

    assert sanity_failures(february).is_empty()


def test_a_month_file_that_cannot_be_read_back_is_named(tmp_path):
    months = _months(_ingest(tmp_path))
    damaged = months[-1][2]
    truncate(damaged)

    with pytest.raises(LakeError) as info:
        sanity_failures(months)

    assert f"cannot read {damaged} back" in str(info.value)


def test_the_imputed_share_is_of_the_whole_day_so_an_open_day_is_not_blocked_early():
    """Reported by a CI run at 02:17 UTC: 2 imputed minutes among the open day's first 137
    failed the gaps check (1.5 % > 1 %), and so blocked the day's bars and the dry-run, though
    the day passes once closed. The threshold is a share of the day's 1,440 minutes."""
    open_day = {"expected": 137, "imputed": 2, "missing": 0, "day_closed": False}
    assert gap_failure(open_day, imputed_max_share=0.01) is None
    closed_day = {"expected": 1440, "imputed": 15, "missing": 0, "day_closed": True}
    assert gap_failure(closed_day, imputed_max_share=0.01) == "imputed share 1.04% > 1.00%"
    # An open day already past the day's allowance fails at once: it cannot pass when closed.
    assert gap_failure({**open_day, "imputed": 15}, imputed_max_share=0.01)
