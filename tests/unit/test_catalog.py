"""The DuckDB catalog over a lake ingested from real Binance candles."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import pytest

from candlestack.bars import BarBuilder
from candlestack.catalog import build_catalog
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.sources.replay import ReplaySource, read_exchange_info
from tests.conftest import DAMAGE, OHLCV, SHARED, quarantined, truncate

BTC = OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv"
ETH = OHLCV / "tooyipjee_binance_ETHUSDT_1m.csv"
EXCHANGE_INFO = SHARED / "exchange" / "spot_api_v3_exchangeInfo_2021-03-24_mainnet_subset13.json"
DAYS = [date(2021, 4, 24), date(2021, 4, 25), date(2021, 4, 26)]
VIEWS = {
    "ohlcv",
    "bars",
    "features",
    "gaps",
    "partitions",
    "revisions",
    "markets",
    "trades",
    "backtest_metrics",
    "sweep_results",
}


def ingest(lake: Lake, symbol: str, days: list[date]) -> None:
    source = ReplaySource({"BTC/USDT": BTC, "ETH/USDT": ETH})
    Ingestor(source, lake).ingest(symbol, days)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Lake, Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("catalog")
    lake = Lake(root / "lake")
    ingest(lake, "BTC/USDT", DAYS)
    markets = read_exchange_info(EXCHANGE_INFO)
    write_parquet_atomic(lake.markets_path("binance", date(2021, 3, 24)), markets.to_arrow(), {})
    path = root / "catalog.duckdb"
    return lake, path, build_catalog(lake, path)


def query(path: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_views_exist(built):
    _, path, counts = built
    names = {r[0] for r in query(path, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert names == VIEWS
    assert set(counts) == VIEWS


def test_gaps_lists_the_maintenance_gap(built):
    _, path, counts = built
    rows = query(
        path,
        "SELECT exchange, symbol, date, gap_start, gap_end, minutes, refetched, imputed, missing "
        "FROM gaps",
    )
    assert counts["gaps"] == 1
    assert rows == [
        (
            "binance",
            "BTC-USDT",
            date(2021, 4, 25),
            datetime(2021, 4, 25, 4, 1, tzinfo=UTC),
            datetime(2021, 4, 25, 8, 44, tzinfo=UTC),
            284,
            0,
            284,
            0,
        )
    ]


def test_ohlcv_rows_equal_the_sum_of_partition_rows(built):
    _, path, counts = built
    (ohlcv,) = query(path, "SELECT count(*) FROM ohlcv")[0]
    (partition_rows,) = query(path, "SELECT sum(rows) FROM partitions")[0]
    assert ohlcv == partition_rows == counts["ohlcv"] == 3 * 1440
    per_day = query(
        path,
        "SELECT o.date, o.n, p.rows FROM (SELECT date, count(*) n FROM ohlcv GROUP BY date) o "
        "JOIN partitions p USING (date) ORDER BY 1",
    )
    assert [(d, n) for d, n, _ in per_day] == [(d, 1440) for d in DAYS]
    assert all(n == rows for _, n, rows in per_day)


def test_imputed_minutes_in_ohlcv_match_the_reports(built):
    _, path, _ = built
    rows = query(
        path,
        "SELECT p.date, p.imputed, (SELECT count(*) FROM ohlcv o "
        "WHERE o.date = p.date AND o.imputed) FROM partitions p ORDER BY 1",
    )
    assert rows == [(DAYS[0], 0, 0), (DAYS[1], 284, 284), (DAYS[2], 0, 0)]


def test_partitions_view_exposes_typed_reports(built):
    _, path, counts = built
    rows = query(
        path,
        "SELECT date, expected, missing, first_ts, day_closed, source, length(content_hash) "
        "FROM partitions ORDER BY date",
    )
    assert counts["partitions"] == 3
    assert rows[1] == (
        DAYS[1],
        1440,
        0,
        datetime(2021, 4, 25, tzinfo=UTC),
        True,
        "replay",
        64,
    )


def test_ohlcv_columns_come_from_the_hive_path(built):
    _, path, _ = built
    rows = query(
        path,
        "SELECT exchange, timeframe, symbol, min(ts), max(ts) FROM ohlcv GROUP BY ALL ORDER BY ALL",
    )
    assert rows == [
        (
            "binance",
            "1m",
            "BTC-USDT",
            datetime(2021, 4, 24, tzinfo=UTC),
            datetime(2021, 4, 26, 23, 59, tzinfo=UTC),
        )
    ]


def test_markets_view_reads_the_markets_files(built):
    _, path, counts = built
    payload = json.loads(EXCHANGE_INFO.read_text())
    assert counts["markets"] == len(payload["symbols"])
    rows = query(path, "SELECT date, min_cost, price_tick FROM markets WHERE symbol = 'BTC/USDT'")
    assert rows == [(date(2021, 3, 24), 10.0, 0.01)]


def test_empty_lake_gives_empty_queryable_views(tmp_path):
    path = tmp_path / "catalog.duckdb"
    counts = build_catalog(Lake(tmp_path / "nothing"), path)

    assert counts == dict.fromkeys(VIEWS, 0)
    for view in VIEWS:
        assert query(path, f"SELECT * FROM {view}") == []
    # The empty views have the columns queries are written against.
    assert query(path, "SELECT sum(rows), max(first_ts) FROM partitions") == [(None, None)]
    assert query(path, "SELECT count(*) FROM ohlcv WHERE imputed AND volume = 0") == [(0,)]
    assert query(path, "SELECT sum(minutes) FROM gaps WHERE symbol = 'BTC-USDT'") == [(None,)]


def test_rebuild_leaves_no_temp_files(built, tmp_path):
    lake, _, _ = built
    path = tmp_path / "sub" / "catalog.duckdb"
    build_catalog(lake, path)
    build_catalog(lake, path)
    assert [p.name for p in path.parent.iterdir()] == ["catalog.duckdb"]


def test_reader_keeps_working_while_the_catalog_is_rebuilt(tmp_path):
    lake = Lake(tmp_path / "lake")
    path = tmp_path / "catalog.duckdb"
    build_catalog(lake, path)

    old = duckdb.connect(str(path), read_only=True)
    try:
        assert old.execute("SELECT count(*) FROM ohlcv").fetchone() == (0,)
        ingest(lake, "ETH/USDT", [date(2021, 4, 25)])
        counts = build_catalog(lake, path)
        assert counts["ohlcv"] == 1440
        # The old connection still answers, from the catalog it opened.
        assert old.execute("SELECT count(*) FROM ohlcv").fetchone() == (0,)
        assert old.execute("SELECT count(*) FROM gaps").fetchone() == (0,)
        # A new reader (another process, as a notebook or the webserver would be) sees it.
        script = (
            "import duckdb, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
            "print(con.execute('SELECT count(*) FROM ohlcv').fetchone()[0], "
            "con.execute('SELECT sum(imputed) FROM gaps').fetchone()[0])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["1440", "284"]
    finally:
        old.close()
    # Once the old connection is closed, a new one in this process sees the rebuild too.
    assert query(path, "SELECT count(*), count(DISTINCT symbol) FROM ohlcv") == [(1440, 1)]


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_days_of_a_damaged_candle_file_are_not_counted(tmp_path, damage):
    """Before, a file whose data pages were damaged but whose footer read was counted
    complete in the partitions view (and a truncated one failed the whole catalog)."""
    lake = Lake(tmp_path / "lake")
    ingest(lake, "BTC/USDT", DAYS)
    ingest(lake, "ETH/USDT", DAYS)
    damaged = lake.month_path("ohlcv", "binance", "1m", "ETH-USDT", DAYS[0])
    DAMAGE[damage](damaged)
    path = tmp_path / "catalog.duckdb"

    counts = build_catalog(lake, path)

    assert query(path, "SELECT DISTINCT symbol FROM partitions") == [("BTC-USDT",)]
    assert counts["partitions"] == len(DAYS)
    assert counts["ohlcv"] == len(DAYS) * 1440
    assert not damaged.exists() and len(quarantined(lake.root)) == 1


def test_a_truncated_bar_file_is_moved_aside_and_the_catalog_still_builds(tmp_path):
    lake = Lake(tmp_path / "lake")
    ingest(lake, "BTC/USDT", DAYS)
    builder = BarBuilder(lake, "binance", imputed_max_share=0.25)
    for timeframe in ("5m", "1h"):
        builder.build(timeframe, "BTC-USDT", DAYS[0])
    damaged = lake.month_path("bars", "binance", "1h", "BTC-USDT", DAYS[0])
    truncate(damaged)
    path = tmp_path / "catalog.duckdb"

    counts = build_catalog(lake, path)

    assert query(path, "SELECT DISTINCT timeframe FROM bars") == [("5m",)]
    assert counts["bars"] == len(DAYS) * 288
    assert not damaged.exists() and len(quarantined(lake.root)) == 1
