"""The live builds read a month's candles once per change of its file, not once per
timeframe that closes, and the month before (the features' warm-up) not again at all."""

from collections import Counter
from datetime import UTC, date, datetime, timedelta

from candlestack.bars import MonthMinutes, usable_minutes
from candlestack.feature_store import load_feature_set
from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.live import PersistedCandle
from candlestack.live_build import BuildOnClose
from candlestack.sources.synthetic import SyntheticSource

SYMBOL, KEY = "BTC/USDT", "BTC-USDT"
DAY = date(2026, 3, 2)
MARCH, FEBRUARY = date(2026, 3, 1), date(2026, 2, 1)


class Clocked:
    """A lake of the synthetic market from three days before DAY, topped up to `now`."""

    def __init__(self, root, now: datetime) -> None:
        self.now = now
        self.lake = Lake(root)
        source = SyntheticSource(symbols=[SYMBOL], clock=lambda: self.now.timestamp())
        self.ingestor = Ingestor(source, self.lake)
        self.ingestor.ingest(SYMBOL, [DAY - timedelta(days=i) for i in range(3, -1, -1)])

    def minute_later(self) -> None:
        self.now += timedelta(minutes=1)
        self.ingestor.ingest(SYMBOL, [DAY], keep_closed=True)


def _candle_reads(lake: Lake, monkeypatch) -> Counter:
    reads: Counter = Counter()
    read_month = lake.read_month

    def counted(dataset, exchange, timeframe, symbol_key, month, **kwargs):
        if dataset == "ohlcv":
            reads[month] += 1
        return read_month(dataset, exchange, timeframe, symbol_key, month, **kwargs)

    monkeypatch.setattr(lake, "read_month", counted)
    return reads


def _close(open_at: datetime) -> PersistedCandle:
    ms = int(open_at.timestamp() * 1000)
    return PersistedCandle(SYMBOL, ms, 1, 1, 1, 1, 1, open_at.timestamp(), open_at.timestamp())


def test_kept_until_the_candle_file_changes(tmp_path):
    market = Clocked(tmp_path, datetime(2026, 3, 2, 12, 15, 30, tzinfo=UTC))
    minutes = MonthMinutes(market.lake, "synthetic", 0.01)
    first = minutes(KEY, MARCH)
    assert minutes(KEY, MARCH) is first
    market.minute_later()
    again = minutes(KEY, MARCH)
    fresh = usable_minutes(market.lake, "synthetic", KEY, MARCH, 0.01)
    assert again is not first and again.minutes.equals(fresh.minutes)
    assert again.reports == fresh.reports and again.unusable == fresh.unusable


def test_a_close_reads_each_month_of_candles_once(tmp_path, monkeypatch):
    market = Clocked(tmp_path, datetime(2026, 3, 2, 12, 15, 30, tzinfo=UTC))
    # Its own Lake, as the collector gives it: the top-ups' reads are not counted.
    builds = Lake(tmp_path)
    reads = _candle_reads(builds, monkeypatch)
    hook = BuildOnClose(builds, "synthetic", load_feature_set(None), 0.01)
    # 12:15 closes 3m, 5m and 15m bars and 1m and 15m features: three bar builds and the
    # 1m features (with February for their warm-up) read the same candles.
    hook.build(SYMBOL, [int(datetime(2026, 3, 2, 12, 15, tzinfo=UTC).timestamp() * 1000)])
    assert reads == {MARCH: 1, FEBRUARY: 1}
    market.minute_later()
    hook(_close(datetime(2026, 3, 2, 12, 15, tzinfo=UTC)))
    hook.close()
    assert len(hook.build_seconds) == 1
    assert reads == {MARCH: 2, FEBRUARY: 1}
