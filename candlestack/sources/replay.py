"""Recorded candles replayed as a source: research on files, tests without a network.

Formats, told apart by extension and header:
- normalised CSV with a header `ts_ms,open,high,low,close,volume` (as in shared/data);
- Binance public-data kline CSV (12 columns, open time in ms, or in µs since 2025);
- Parquet with `ts` (datetime or ms) or `ts_ms` and OHLCV columns;
- freqtrade JSON (`[[ts_ms, o, h, l, c, v], ...]`) and freqtrade feather (`date` column).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import date, timedelta
from pathlib import Path

import polars as pl

from candlestack.errors import SourceError, SourceFormatError
from candlestack.schema import DAY_MS, MARKETS, MINUTE_MS, RAW_CANDLES
from candlestack.sources.markets import markets_frame
from candlestack.validate import EARLIEST_MS, LATEST_MS, intended_epoch_ms, timestamp_unit

_OHLCV = ("open", "high", "low", "close", "volume")
_KLINE_COLUMNS = (
    "ts",
    *_OHLCV,
    "close_time",
    "quote_volume",
    "trades",
    "taker_base",
    "taker_quote",
    "ignore",
)
# A CSV whose open times are all above this is in microseconds (Binance public data switched
# in 2025). The whole file is converted, never a row: a stray row in µs among ms rows is
# left as it is, for validation to refuse.
_MICROSECONDS_FROM = 10**14


def _to_raw(frame: pl.DataFrame, ts: pl.Expr) -> pl.DataFrame:
    return frame.select(ts.alias("ts"), *_OHLCV).cast(RAW_CANDLES, strict=False)


def _epoch_ms(column: str) -> pl.Expr:
    col = pl.col(column)
    return pl.when(col.min() > _MICROSECONDS_FROM).then(col // 1000).otherwise(col)


def _check_unit(raw: pl.DataFrame, path: Path) -> None:
    """Refuse a recording none of whose open times is in epoch ms: a file in seconds would
    otherwise replay no candle at all, each of its days only gaps."""
    if raw.is_empty():
        return
    units = raw.group_by(timestamp_unit(pl.col("ts")).alias("unit")).len()
    if "milliseconds" in units["unit"]:
        return
    unit = units.sort("len", descending=True)["unit"][0]
    looks = f"look like {unit}" if unit else "are off the epoch (none from 2009 to 2100)"
    raise SourceFormatError(
        f"{path}: its timestamps {looks} (first ts={raw['ts'][0]}), not milliseconds since "
        "1970-01-01 UTC; convert the file's open times to epoch milliseconds"
    )


def read_candle_file(path: Path) -> pl.DataFrame:
    """Read any supported recording into RAW_CANDLES, sorted by ts."""
    if not path.exists():
        raise SourceFormatError(f"replay file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path) as handle:
                header = handle.readline().strip().lower().split(",")
            if header[0] in ("ts_ms", "ts", "timestamp", "date", "open_time"):
                frame = pl.read_csv(path, infer_schema_length=0)
                frame = frame.rename({header[0]: "_t"}).with_columns(pl.col("_t").cast(pl.Int64))
                raw = _to_raw(frame, _epoch_ms("_t"))
            elif len(header) == len(_KLINE_COLUMNS):
                frame = pl.read_csv(
                    path,
                    has_header=False,
                    new_columns=list(_KLINE_COLUMNS),
                    infer_schema_length=0,
                ).with_columns(pl.col("ts").cast(pl.Int64))
                raw = _to_raw(frame, _epoch_ms("ts"))
            else:
                raise SourceFormatError(
                    f"{path}: unrecognised CSV header {','.join(header)!r}; expected "
                    "ts_ms,open,high,low,close,volume or a 12-column Binance kline CSV"
                )
        elif suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list) or (rows and len(rows[0]) < 6):
                raise SourceFormatError(f"{path}: expected freqtrade JSON [[ts, o, h, l, c, v]]")
            # A typed schema: inferring from the first rows would make integral JSON
            # prices Int64 and silently truncate later fractional ones.
            raw = pl.DataFrame(
                [r[:6] for r in rows], schema=RAW_CANDLES, orient="row", strict=False
            )
        elif suffix in (".parquet", ".feather", ".arrow", ".ipc"):
            frame = pl.read_parquet(path) if suffix == ".parquet" else pl.read_ipc(path)
            time_column = next(
                (c for c in ("ts", "ts_ms", "date", "open_time") if c in frame), None
            )
            if time_column is None:
                raise SourceFormatError(f"{path}: no ts, ts_ms, date or open_time column")
            ts = pl.col(time_column)
            if frame.schema[time_column].is_temporal():
                ts = ts.dt.epoch("ms")
            raw = _to_raw(frame, ts)
        else:
            raise SourceFormatError(
                f"{path}: unsupported extension {suffix!r} (csv, json, parquet, feather)"
            )
    except SourceFormatError:
        raise
    except Exception as exc:
        raise SourceFormatError(f"cannot read candles from {path}: {exc}") from exc
    raw = raw.sort("ts", nulls_last=True)
    _check_unit(raw, path)
    return raw


def read_exchange_info(path: Path, exchange_id: str = "binance") -> pl.DataFrame:
    """Market rules from a recorded exchangeInfo payload, parsed by ccxt itself."""
    import ccxt  # here: replaying candles needs no ccxt, and it takes ~0.6 s to import

    client = getattr(ccxt, exchange_id)({"options": {"fetchMargins": False}})
    # Binance's parser looks up margin pair lists that fetch_markets would have loaded.
    client.options.setdefault("crossMarginPairsData", [])
    client.options.setdefault("isolatedMarginPairsData", [])
    payload = json.loads(path.read_text())
    return markets_frame(client.parse_markets(payload["symbols"]), client.precisionMode)


def _served_at(raw: pl.DataFrame) -> pl.DataFrame:
    """`raw` with `_at`, the epoch ms each row is served at, the row itself unchanged: the
    source drops no row, validation judges them all. A row in the wrong unit is served with
    the minute it stands for; one that no unit places in time (off the epoch, or without a
    timestamp) with the first minute of the recording's first whole day, so that each is
    refused and counted once, on a day the recording covers."""
    at = intended_epoch_ms(pl.col("ts"))
    placed = at.is_between(EARLIEST_MS, LATEST_MS, closed="left")
    first_ms = raw.select(at.filter(placed).min()).item()
    first_day_ms = -(-first_ms // DAY_MS) * DAY_MS if first_ms is not None else None
    return raw.with_columns(_at=pl.when(placed).then(at).otherwise(first_day_ms))


class ReplaySource:
    kind = "replay"

    def __init__(
        self,
        files: Mapping[str, Path | str],
        exchange: str = "binance",
        markets_file: Path | str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = {symbol: Path(path) for symbol, path in files.items()}
        self.exchange = exchange
        self.markets_file = Path(markets_file) if markets_file else None
        self._clock = clock
        self._cache: dict[str, pl.DataFrame] = {}

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _candles(self, symbol: str) -> pl.DataFrame:
        """The recording, with `_at`: the epoch ms each row is served at."""
        if symbol not in self._cache:
            if symbol not in self.files:
                raise SourceError(
                    f"replay has no recording for {symbol!r}; configured: "
                    f"{', '.join(self.files) or 'none'}"
                )
            self._cache[symbol] = _served_at(read_candle_file(self.files[symbol]))
        return self._cache[symbol]

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        served = self._candles(symbol).filter(pl.col("_at").is_between(start_ms, end_ms, "left"))
        return served.drop("_at")

    def covered_days(self, symbol: str) -> tuple[date, date] | None:
        """The first and last whole UTC days of the recording: a day the recording starts or
        ends in the middle of was not missing minutes on the exchange, so it is left out."""
        ts = self._candles(symbol).get_column("_at")
        if ts.is_empty():
            return None
        first = -(-int(ts.min()) // DAY_MS)  # days since the epoch, rounded up
        end = (int(ts.max()) + MINUTE_MS) // DAY_MS  # the day the recording ends in
        epoch = date(1970, 1, 1)
        return epoch + timedelta(days=first), epoch + timedelta(days=end - 1)

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        row = self._candles(symbol).filter(pl.col("ts") == ts_ms)
        return None if row.is_empty() else float(row.item(0, "open"))

    def load_markets(self) -> pl.DataFrame:
        if self.markets_file is None:
            return pl.DataFrame(schema=MARKETS)
        return read_exchange_info(self.markets_file, self.exchange)
