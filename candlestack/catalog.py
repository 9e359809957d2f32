"""The DuckDB catalog: a small file of views over the Parquet lake.

It is rebuilt into a temp file and renamed over the old one, so pipelines never
hold its write lock for long and a reader with the old file open keeps a
consistent (if slightly stale) view. Partitioned assets never write through it.
The catalog file itself is always local; on an s3:// lake its views read the objects
through the lake's filesystem, which every connection must register: open it with
`connect`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb

from candlestack.lake import GAPS_KEY, REPORT_KEY, REVISIONS_KEY, Lake


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _hive(column: str) -> str:
    return f"regexp_extract(file_name, '{column}=([^/]+)', 1)"


_REPORT_JSON = (
    '[{"date":"DATE","expected":"BIGINT","rows":"BIGINT","missing_found":"BIGINT","refetched":"BIGINT",'
    '"imputed":"BIGINT","missing":"BIGINT","rejected":"BIGINT","real":"BIGINT",'
    '"zero_volume":"BIGINT","kept":"BIGINT","revised":"BIGINT","first_ts":"TIMESTAMPTZ",'
    '"last_ts":"TIMESTAMPTZ","content_hash":"VARCHAR","source":"VARCHAR","day_closed":"BOOLEAN"}]'
)
_REVISIONS_JSON = (
    '[{"ts":"TIMESTAMPTZ","old_open":"DOUBLE","old_high":"DOUBLE","old_low":"DOUBLE",'
    '"old_close":"DOUBLE","old_volume":"DOUBLE","open":"DOUBLE","high":"DOUBLE","low":"DOUBLE",'
    '"close":"DOUBLE","volume":"DOUBLE","revised_at":"TIMESTAMPTZ"}]'
)
_GAPS_JSON = (
    '[{"gap_start":"TIMESTAMPTZ","gap_end":"TIMESTAMPTZ","minutes":"BIGINT",'
    '"refetched":"BIGINT","imputed":"BIGINT","missing":"BIGINT"}]'
)

EMPTY_VIEWS = {
    "ohlcv": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR timeframe, NULL::VARCHAR symbol, "
    "NULL::DATE date, NULL::TIMESTAMPTZ ts, NULL::DOUBLE open, NULL::DOUBLE high, "
    "NULL::DOUBLE low, NULL::DOUBLE close, NULL::DOUBLE volume, NULL::BOOLEAN imputed "
    "WHERE false",
    "bars": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR timeframe, NULL::VARCHAR symbol, "
    "NULL::DATE date, NULL::TIMESTAMPTZ ts, NULL::DOUBLE open, NULL::DOUBLE high, "
    "NULL::DOUBLE low, NULL::DOUBLE close, NULL::DOUBLE volume, "
    "NULL::DECIMAL(38, 8) volume_exact, NULL::BIGINT n_source, NULL::BIGINT n_imputed, "
    "NULL::BIGINT n_real, NULL::BIGINT n_zero_volume, NULL::BOOLEAN complete WHERE false",
    "features": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR timeframe, NULL::VARCHAR symbol, "
    "NULL::DATE date, NULL::TIMESTAMPTZ ts WHERE false",
    "partitions": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR symbol, "
    f"unnest(json_transform('[]', '{_REPORT_JSON}'), recursive := true) WHERE false",
    "gaps": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR symbol, NULL::DATE date, "
    "NULL::TIMESTAMPTZ gap_start, NULL::TIMESTAMPTZ gap_end, NULL::BIGINT AS minutes, "
    "NULL::BIGINT refetched, NULL::BIGINT imputed, NULL::BIGINT missing WHERE false",
    "revisions": "SELECT NULL::VARCHAR exchange, NULL::VARCHAR symbol, NULL::DATE date, "
    f"unnest(json_transform('[]', '{_REVISIONS_JSON}'), recursive := true) WHERE false",
    "markets": "SELECT NULL::VARCHAR exchange, NULL::DATE date, NULL::VARCHAR symbol WHERE false",
    "trades": "SELECT NULL::VARCHAR strategy, NULL::VARCHAR run, NULL::BIGINT trade, "
    "NULL::TIMESTAMPTZ entry_ts, NULL::DOUBLE entry_price, NULL::TIMESTAMPTZ exit_ts, "
    "NULL::DOUBLE exit_price, NULL::DOUBLE amount, NULL::DOUBLE pnl, NULL::VARCHAR exit_reason "
    "WHERE false",
    "backtest_metrics": "SELECT NULL::VARCHAR strategy, NULL::VARCHAR run, "
    "NULL::VARCHAR symbol, NULL::VARCHAR timeframe, NULL::DOUBLE total_return, "
    "NULL::DOUBLE sharpe, NULL::DOUBLE max_drawdown WHERE false",
    "sweep_results": "SELECT NULL::VARCHAR sweep, NULL::VARCHAR run, NULL::BIGINT rank WHERE false",
}

# Views straight over one kind of run file (candlestack.lake.FILES).
_RUN_VIEWS = ("trades", "backtest_metrics", "sweep_results")


def connect(
    path: Path | str, lake: Lake | str, read_only: bool = True
) -> duckdb.DuckDBPyConnection:
    """A connection to the catalog file that can read its views: with the lake's object
    store registered when the lake is on one."""
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    con = duckdb.connect(str(path), read_only=read_only)
    if lake.filesystem is not None:
        con.register_filesystem(lake.filesystem)
    return con


def _utc_date(column: str) -> str:
    # The UTC day without DuckDB's session time zone (a TIMESTAMPTZ cast to DATE uses it).
    return f"(DATE '1970-01-01' + CAST(epoch_ms({column}) // 86400000 AS INTEGER))"


def view_sql(lake: Lake) -> dict[str, str]:
    """The SQL of each view, over whatever the lake holds now."""
    candles, markets = lake.files_url("ohlcv"), lake.files_url("markets")
    views = dict(EMPTY_VIEWS)
    if lake.holds("ohlcv"):
        footer = (
            f"SELECT {_hive('exchange')} exchange, {_hive('symbol')} symbol, "
            "decode(key) k, decode(value) v "
            f"FROM parquet_kv_metadata({_literal(candles)})"
        )
        views["ohlcv"] = (
            f"SELECT exchange, timeframe, symbol, {_utc_date('ts')} date, ts, open, high, low, "
            f"close, volume, imputed FROM read_parquet({_literal(candles)}, "
            "hive_partitioning = true)"
        )
        # One row per stored symbol-day, from the per-day reports in each month's footer.
        views["partitions"] = (
            "SELECT exchange, symbol, unnest(r) FROM ("
            f"SELECT exchange, symbol, unnest(json_transform(v, '{_REPORT_JSON}')) r "
            f"FROM ({footer}) WHERE k = '{REPORT_KEY.decode()}')"
        )
        views["gaps"] = (
            f"SELECT exchange, symbol, {_utc_date('g.gap_start')} date, unnest(g) FROM ("
            f"SELECT exchange, symbol, unnest(json_transform(v, '{_GAPS_JSON}')) g "
            f"FROM ({footer}) WHERE k = '{GAPS_KEY.decode()}')"
        )
        # Stored candles the source later delivered with other values: old beside new.
        views["revisions"] = (
            f"SELECT exchange, symbol, {_utc_date('r.ts')} date, unnest(r) FROM ("
            f"SELECT exchange, symbol, unnest(json_transform(v, '{_REVISIONS_JSON}')) r "
            f"FROM ({footer}) WHERE k = '{REVISIONS_KEY.decode()}')"
        )
    bars = lake.files_url("bars")
    if lake.holds("bars"):
        # One view for every timeframe, told apart by its `timeframe` column.
        views["bars"] = (
            f"SELECT exchange, timeframe, symbol, {_utc_date('ts')} date, ts, open, high, low, "
            "close, volume, volume_exact, n_source, n_imputed, n_source - n_imputed n_real, "
            "n_zero_volume, complete "
            f"FROM read_parquet({_literal(bars)}, hive_partitioning = true, union_by_name = true)"
        )
    features = lake.files_url("features")
    if lake.holds("features"):
        # One view: feature columns are the union over timeframes (null where a timeframe
        # does not compute that feature).
        views["features"] = (
            f"SELECT exchange, timeframe, symbol, {_utc_date('ts')} date, * "
            "EXCLUDE (exchange, timeframe, symbol, month) "
            f"FROM read_parquet({_literal(features)}, hive_partitioning = true, "
            "union_by_name = true)"
        )
    if lake.holds("markets"):
        # symbol_key (as config.symbol_key makes it) joins markets to the candle views.
        views["markets"] = (
            "SELECT *, replace(replace(symbol, '/', '-'), ':', '_') AS symbol_key "
            f"FROM read_parquet({_literal(markets)}, hive_partitioning = true)"
        )
    for name in _RUN_VIEWS:
        if lake.holds(name):
            views[name] = (
                f"SELECT * FROM read_parquet({_literal(lake.files_url(name))}, "
                "hive_partitioning = true, union_by_name = true)"
            )
    return views


def build_catalog(lake: Lake, path: Path | str) -> dict[str, int]:
    """(Re)build the catalog file; returns the row count of each view.

    Damaged files are moved aside first (their partitions are rebuilt at their next
    materialization), so no view counts what cannot be read: candle files are decoded
    whole, since the partitions and gaps views count their days complete; bar and feature
    files have their footers read (a whole decode of each costs ~5 ms; their own builds
    decode them, and `python -m candlestack.verify` checks every file)."""
    lake.quarantine_damaged("ohlcv")
    for dataset in ("bars", "features"):
        lake.quarantine_damaged(dataset, decode=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    counts = {}
    try:
        with connect(tmp, lake, read_only=False) as con:
            for name, sql in view_sql(lake).items():
                con.execute(f"CREATE VIEW {name} AS {sql}")
                counts[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    return counts
