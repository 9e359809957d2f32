"""Schedules request one run per month for every symbol, with stable run keys."""

from datetime import UTC, datetime

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from assets.partitions import candle_partitions
from pipelines.definitions import defs
from pipelines.schedules import finalise_yesterday, keep_open_day_current


def _request(schedule, at: datetime) -> dg.RunRequest:
    context = dg.build_schedule_context(scheduled_execution_time=at)
    (request,) = schedule.evaluate_tick(context).run_requests
    return request


def _keys(request: dg.RunRequest) -> list[str]:
    tags = request.tags
    return list(
        candle_partitions.get_partition_keys_in_range(
            dg.PartitionKeyRange(
                tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]
            )
        )
    )


def test_open_day_schedule_targets_today_for_every_symbol_once_a_minute():
    at = datetime(2026, 3, 4, 12, 31, tzinfo=UTC)
    request = _request(keep_open_day_current, at)
    assert _keys(request) == ["2026-03-01|BTC-USDT", "2026-03-01|ETH-USDT", "2026-03-01|SOL-USDT"]
    assert request.run_key == "open-day-2026-03-04T12:31"
    # A repeated tick for the same minute asks for the same run key: Dagster dedupes it.
    assert _request(keep_open_day_current, at).run_key == request.run_key


def test_daily_schedule_finalises_yesterday():
    request = _request(finalise_yesterday, datetime(2026, 3, 5, 0, 10, tzinfo=UTC))
    assert {k.split("|")[0] for k in _keys(request)} == {"2026-03-01"}
    assert request.run_key == "finalise-2026-03-04"
    # On the first of a month, yesterday is in the month before.
    request = _request(finalise_yesterday, datetime(2026, 4, 1, 0, 10, tzinfo=UTC))
    assert {k.split("|")[0] for k in _keys(request)} == {"2026-03-01"}


def test_definitions_load_with_every_schedule_on_a_job():
    dg.Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    for schedule in repository.schedule_defs:
        assert repository.has_job(schedule.job_name), schedule.name
