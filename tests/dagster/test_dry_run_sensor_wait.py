"""A dry_run_bars tick that falls just before (or just after) a bar's close waits for the
bar to be stored, instead of leaving its run to the next tick; otherwise it waits for
nothing. On a fake clock: the waiting is the sensor's own, the timing the daemon's."""

from datetime import UTC, datetime

import dagster as dg

from candlestack.strategies.config import StrategyConfig
from pipelines.sensors import BAR_WAIT_SECONDS, INTERVAL_SECONDS, requests_waiting_for_close

CLOSE = datetime(2026, 3, 5, 9, 31, tzinfo=UTC).timestamp()  # the 09:30 1m bar closes


def strategy(timeframe: str = "1m") -> StrategyConfig:
    return StrategyConfig.model_validate(
        {"name": "s", "strategy": "ma_cross", "symbol": "BTC/USDT", "timeframe": timeframe,
         "params": {"fast": 2, "slow": 5}, "dry_run": {"enabled": True}}
    )  # fmt: skip


class FakeTime:
    def __init__(self, now: float) -> None:
        self.now = now
        self.slept = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def bar_stored_at(time: FakeTime, stored: float | None):
    """A poll that finds the bar once the fake clock passes `stored` (None: never)."""

    def poll() -> list[dg.RunRequest]:
        if stored is not None and time.now >= stored:
            return [dg.RunRequest(run_key="s|09:30")]
        return []

    return poll


def test_a_tick_before_the_close_requests_the_bar_the_moment_it_is_stored():
    time = FakeTime(CLOSE - INTERVAL_SECONDS + 0.5)
    poll = bar_stored_at(time, CLOSE + 0.3)
    requests = requests_waiting_for_close([strategy()], {}, poll, time.clock, time.sleep)
    assert [r.run_key for r in requests] == ["s|09:30"]
    assert CLOSE + 0.3 <= time.now < CLOSE + 0.5  # not a whole interval later


def test_a_tick_just_after_the_close_waits_for_the_bar_too():
    time = FakeTime(CLOSE + 0.05)
    requests = requests_waiting_for_close(
        [strategy()], {}, bar_stored_at(time, CLOSE + 0.6), time.clock, time.sleep
    )
    assert requests and time.now < CLOSE + 0.8


def test_a_bar_that_does_not_come_is_given_up_after_the_wait():
    time = FakeTime(CLOSE - 1)
    requests = requests_waiting_for_close(
        [strategy()], {}, bar_stored_at(time, None), time.clock, time.sleep
    )
    assert requests == []
    assert CLOSE + BAR_WAIT_SECONDS <= time.now < CLOSE + BAR_WAIT_SECONDS + 0.5


def test_no_wait_far_from_a_close_or_for_a_bar_already_requested():
    time = FakeTime(CLOSE - 30)
    assert (
        requests_waiting_for_close(
            [strategy(), strategy("5m")], {}, bar_stored_at(time, None), time.clock, time.sleep
        )
        == []
    )
    assert time.slept == 0
    time = FakeTime(CLOSE + 1)
    requested = {"s": datetime.fromtimestamp(CLOSE - 60, UTC).isoformat()}
    assert (
        requests_waiting_for_close(
            [strategy()], requested, bar_stored_at(time, None), time.clock, time.sleep
        )
        == []
    )
    assert time.slept == 0
