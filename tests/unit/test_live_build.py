"""A streamed candle's close builds the bars and features that close with it."""

import time
from datetime import UTC, date, datetime, timedelta

import polars as pl

from candlestack.bars import BarBuilder
from candlestack.feature_store import FeatureBuilder, load_feature_set
from candlestack.ingest import Ingestor
from candlestack.lake import Lake
from candlestack.live import PersistedCandle
from candlestack.live_build import BuildOnClose, closing_timeframes, month_of
from candlestack.resample import BAR_TIMEFRAMES
from candlestack.sources.synthetic import SyntheticSource

SYMBOL, KEY = "BTC/USDT", "BTC-USDT"
DAY = date(2026, 3, 2)
MINUTE_MS = 60_000


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _lake(root, now: datetime) -> Lake:
    """The month before (the features' warm-up) and this one up to `now`."""
    lake = Lake(root)
    source = SyntheticSource(symbols=[SYMBOL], clock=lambda: now.timestamp())
    ingestor = Ingestor(source, lake)
    ingestor.ingest(SYMBOL, [DAY - timedelta(days=i) for i in range(3, -1, -1)])
    return lake


def _candle(open_at: datetime) -> PersistedCandle:
    return PersistedCandle(SYMBOL, _ms(open_at), 1, 1, 1, 1, 1, time.time(), time.time())


def _read(lake: Lake, dataset: str, timeframe: str) -> pl.DataFrame | None:
    return lake.read_days(dataset, "synthetic", timeframe, KEY, DAY, DAY)


def test_closing_timeframes_and_the_month_of_a_close():
    quarter = _ms(datetime(2026, 3, 2, 12, 15, tzinfo=UTC))
    assert closing_timeframes(BAR_TIMEFRAMES, [quarter]) == ["3m", "5m", "15m"]
    assert closing_timeframes(BAR_TIMEFRAMES, [quarter - MINUTE_MS, quarter + MINUTE_MS]) == []
    midnight = _ms(datetime(2026, 4, 1, tzinfo=UTC))
    assert closing_timeframes(BAR_TIMEFRAMES, [midnight]) == list(BAR_TIMEFRAMES)
    assert month_of(midnight) == date(2026, 3, 1)


def test_a_close_builds_what_closes_with_it_as_the_assets_would(tmp_path):
    now = datetime(2026, 3, 2, 12, 15, 30, tzinfo=UTC)
    features = load_feature_set(None)
    live = _lake(tmp_path / "live", now)
    hook = BuildOnClose(live, "synthetic", features, 0.01)
    # 12:14 closes only 1m features; 12:15 also closes 3m, 5m and 15m. Built apart or, when
    # the second arrives while the first waits, as one build of every timeframe either closed.
    hook(_candle(datetime(2026, 3, 2, 12, 13, tzinfo=UTC)))
    hook(_candle(datetime(2026, 3, 2, 12, 14, tzinfo=UTC)))
    hook.close()
    assert len(hook.build_seconds) >= 1

    reference = _lake(tmp_path / "reference", now)
    bars = BarBuilder(reference, "synthetic", 0.01)
    for timeframe in ("3m", "5m", "15m"):
        bars.build(timeframe, KEY, date(2026, 3, 1))
        assert _read(live, "bars", timeframe).equals(_read(reference, "bars", timeframe))
    assert _read(live, "bars", "15m")["ts"].max() == datetime(2026, 3, 2, 12, tzinfo=UTC)
    for timeframe in ("1h", "10m", "4h", "1d"):  # they did not close at 12:14 or 12:15
        assert _read(live, "bars", timeframe) is None
    built = FeatureBuilder(reference, "synthetic", features, 0.01)
    for timeframe in ("1m", "15m"):
        built.build(timeframe, KEY, date(2026, 3, 1))
        assert _read(live, "features", timeframe).equals(_read(reference, "features", timeframe))


def test_a_build_waits_while_the_collector_writes_closed_candles(tmp_path):
    now = datetime(2026, 3, 2, 12, 15, 30, tzinfo=UTC)
    lake = _lake(tmp_path / "live", now)
    writing_until = time.monotonic() + 0.3
    hook = BuildOnClose(
        lake, "synthetic", load_feature_set(None), 0.01, lambda: time.monotonic() < writing_until
    )
    hook(_candle(datetime(2026, 3, 2, 12, 14, tzinfo=UTC)))
    time.sleep(0.15)
    assert _read(lake, "features", "1m") is None  # not while the other symbols write
    hook.close()
    assert time.monotonic() >= writing_until
    assert _read(lake, "features", "1m")["ts"].max() == datetime(2026, 3, 2, 12, 14, tzinfo=UTC)
