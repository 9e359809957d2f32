"""CcxtSource + Ingestor with real ccxt against the loopback FakeBinance: what lands in the lake.

Nothing in ccxt is mocked: every candle travels as Binance-shaped JSON over HTTP from the
real CSVs in ``shared/data/ohlcv`` and back through ccxt's parser into Parquet. The only
thing aligned by hand is the clock: CcxtSource reads the local clock (ccxt's
``milliseconds()``), which in production agrees with the exchange's, so here it is pointed
at the fake server's 2021 clock.
"""

from __future__ import annotations

import csv
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from candlestack.errors import SourceError
from candlestack.ingest import Ingestor, PartitionOutcome
from candlestack.lake import Lake
from candlestack.sources.ccxt_source import CcxtSource
from tests.integration.fake_binance import (
    EXCHANGE_INFO_PATH,
    KLINES_PATH,
    OHLCV_DIR,
    FakeBinance,
    Fault,
)

ETH_CSV = OHLCV_DIR / "tooyipjee_binance_ETHUSDT_1m.csv"
BTC_CSV = OHLCV_DIR / "tooyipjee_binance_BTCUSDT_1m.csv"
EXCHANGE_INFO_URL_PATH = "/api/v3/exchangeInfo"
MINUTE_MS = 60_000


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp() * 1000)


AFTER_DATA_MS = _ms("2021-05-21T00:00")  # every candle of the CSVs is closed by then
DAYS = [date(2021, 4, 21) + timedelta(days=i) for i in range(6)]  # 2021-04-21..26
# Binance maintenance on 2021-04-25: no candles opened 04:01..08:44 (284 minutes).
GAP_BEFORE_MS = _ms("2021-04-25T04:00")
GAP_FIRST_MS = _ms("2021-04-25T04:01")
GAP_LAST_MS = _ms("2021-04-25T08:44")
GAP_MINUTES = 284

Row = tuple[float, float, float, float, float]


@functools.cache
def _csv_candles(path: Path) -> dict[int, Row]:
    """ts_ms -> (open, high, low, close, volume), floats parsed from the CSV's own strings."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return {
            int(t): (float(o), float(h), float(lo), float(c), float(v))
            for t, o, h, lo, c, v in reader
        }


def _csv_between(path: Path, start_ms: int, end_ms: int) -> dict[int, Row]:
    return {t: row for t, row in _csv_candles(path).items() if start_ms <= t < end_ms}


def _day_ms(day: date) -> int:
    return _ms(day.isoformat() + "T00:00")


def _server_now(srv: FakeBinance) -> int:
    now = srv.now_ms
    return int(now() if callable(now) else now)


def _source(srv: FakeBinance, *, clock: Callable[[], int] | None = None, **retry) -> CcxtSource:
    source = CcxtSource(
        "binance",
        {**srv.ccxt_config(), "timeout": 1000, "enableRateLimit": False},
        **{"retry_base_delay": 0.01, "retry_max_delay": 1.5, "retry_max_seconds": 20, **retry},
    )
    # The local clock agrees with the exchange's in production; here the exchange lives in
    # 2021, so ccxt's clock (what CcxtSource.now_ms reads) follows the server's.
    source.client.milliseconds = clock or (lambda: _server_now(srv))
    return source


def _ingestor(srv: FakeBinance, root: Path, **source_kwargs) -> Ingestor:
    return Ingestor(_source(srv, **source_kwargs), Lake(root), refetch_attempts=2)


def _stored(outcome: PartitionOutcome) -> pl.DataFrame:
    """The day's rows as written in its month file, ts as epoch milliseconds."""
    frame = Lake(outcome.path.parents[5]).read(outcome.path)
    assert frame is not None, f"{outcome.path} was not written"
    day = frame.filter(pl.col("ts").dt.date() == outcome.day)
    return day.with_columns(pl.col("ts").dt.epoch("ms"))


def _report(root: Path, symbol: str, day: date) -> tuple[dict, pl.DataFrame]:
    """The day's report and gap ranges as stored in its month file's footer."""
    stored = Lake(root).read_day_report("binance", symbol.replace("/", "-"), day)
    assert stored is not None, f"{symbol} {day} is not in the lake"
    return stored


def _rows(frame: pl.DataFrame) -> dict[int, Row]:
    cols = ["ts", "open", "high", "low", "close", "volume"]
    return {r[0]: tuple(r[1:]) for r in frame.select(cols).iter_rows()}


def _diff(got: dict[int, Row], want: dict[int, Row], limit: int = 5) -> list[str]:
    """Human-readable differences between two {ts: row} maps (empty when equal)."""
    out = []
    for ts in sorted(set(got) | set(want)):
        if got.get(ts) != want.get(ts):
            when = datetime.fromtimestamp(ts / 1000, UTC).isoformat()
            out.append(f"{when}: stored {got.get(ts)} != csv {want.get(ts)}")
            if len(out) == limit:
                break
    return out


def _fault_when(
    srv: FakeBinance, seen: Callable[[list[dict[str, str]]], bool], fault: Fault, count: int = 1
) -> Callable[[], bool]:
    """Queue `fault` for the klines request right after `seen(klines requests so far)` holds.

    The fake reads its clock while answering each klines request (after recording it), so
    a clock that peeks at the request log places a fault mid-stream, however the client
    paginates. Returns a probe telling whether the fault was queued.
    """
    now = srv.now_ms
    fired = False

    def clock() -> int:
        nonlocal fired
        if not fired:
            klines = srv.requests_to(KLINES_PATH)
            if seen(klines):
                fired = True
                srv.inject(fault, count)
        return now

    srv.now_ms = clock
    return lambda: fired


def _after_requests(n: int) -> Callable[[list[dict[str, str]]], bool]:
    return lambda klines: len(klines) >= n


@pytest.fixture(scope="module")
def srv() -> Iterator[FakeBinance]:
    with FakeBinance({"ETHUSDT": ETH_CSV, "BTCUSDT": BTC_CSV}) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_server(srv: FakeBinance) -> Iterator[None]:
    """Each test starts with a quiet server whose clock is after the data."""
    srv.now_ms = AFTER_DATA_MS
    srv.timeout_sleep = 3.0
    srv.clear_faults()
    srv.unhide()
    srv.clear_requests()
    errors_before = len(srv.errors)
    yield
    _wait_for_handlers()
    assert srv.errors[errors_before:] == [], "the fake server itself failed"


def _wait_for_handlers(timeout: float = 5.0) -> None:
    """Let requests still in flight finish, e.g. a "timeout" fault's handler that outlives the
    client's patience, so they cannot spill into (or read the clock of) the next test."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if "process_request_thread" in thread.name and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


# -- 1. exact content ------------------------------------------------------------------


@pytest.mark.parametrize(("symbol", "csv_path"), [("BTC/USDT", BTC_CSV), ("ETH/USDT", ETH_CSV)])
def test_lake_equals_the_exchange_candles_exactly(
    srv: FakeBinance, tmp_path: Path, symbol: str, csv_path: Path
) -> None:
    """Every candle the exchange has is stored bit-for-bit, as a real candle, and nothing else
    is passed off as real."""
    outcomes = _ingestor(srv, tmp_path).ingest(symbol, DAYS)

    assert [o.day for o in outcomes] == DAYS
    key = symbol.replace("/", "-")
    # One file for the month, holding the six days and nothing else.
    month_file = tmp_path / f"ohlcv/exchange=binance/timeframe=1m/symbol={key}/month=2021-04"
    assert {o.path for o in outcomes} == {month_file / "data.parquet"}
    assert _files(tmp_path) == [month_file / "data.parquet"]
    assert list(Lake(tmp_path).day_reports("ohlcv", "binance", "1m", key)) == DAYS
    stored = pl.concat([_stored(o) for o in outcomes])
    assert stored["ts"].is_unique().all()
    real = _rows(stored.filter(~pl.col("imputed")))
    want = _csv_between(csv_path, _day_ms(DAYS[0]), _day_ms(DAYS[-1]) + 86_400_000)
    assert len(want) == 6 * 1440 - GAP_MINUTES
    assert _diff(real, want) == []


# -- 2. the maintenance gap --------------------------------------------------------------


def test_maintenance_gap_is_rerequested_then_imputed_flat(srv: FakeBinance, tmp_path: Path) -> None:
    """The 284 minutes Binance never had are asked for again, then filled as flat, zero-volume
    candles at the last real close, flagged imputed and reported as such."""
    day = date(2021, 4, 25)
    (outcome,) = _ingestor(srv, tmp_path).ingest("ETH/USDT", [day])

    report, gaps = _report(tmp_path, "ETH/USDT", day)
    assert report["missing_found"] == GAP_MINUTES
    assert report["imputed"] == GAP_MINUTES
    assert report["refetched"] == 0
    assert report["missing"] == 0
    assert report["rows"] == report["expected"] == 1440
    assert gaps.to_dicts() == [
        {
            "gap_start": datetime(2021, 4, 25, 4, 1, tzinfo=UTC),
            "gap_end": datetime(2021, 4, 25, 8, 44, tzinfo=UTC),
            "minutes": GAP_MINUTES,
            "refetched": 0,
            "imputed": GAP_MINUTES,
            "missing": 0,
        }
    ]

    stored = _stored(outcome)
    imputed = stored.filter("imputed")
    assert imputed["ts"].to_list() == list(range(GAP_FIRST_MS, GAP_LAST_MS + 1, MINUTE_MS))
    last_close = _csv_candles(ETH_CSV)[GAP_BEFORE_MS][3]
    assert set(_rows(imputed).values()) == {(last_close,) * 4 + (0.0,)}
    real = _rows(stored.filter(~pl.col("imputed")))
    assert _diff(real, _csv_between(ETH_CSV, _day_ms(day), _day_ms(day) + 86_400_000)) == []

    # The first pass pages through the day up to its end; the re-request comes after it
    # and asks for (at least) the gap's window.
    klines = srv.requests_to(KLINES_PATH)
    run_until = str(_day_ms(day) + 86_400_000 - 1)
    last_bulk = max(i for i, q in enumerate(klines) if q["endTime"] == run_until)
    rerequests = [
        q
        for q in klines[last_bulk + 1 :]
        if int(q["startTime"]) <= GAP_FIRST_MS and int(q["endTime"]) >= GAP_LAST_MS
    ]
    assert rerequests, f"the gap was never asked for again: {klines}"


# -- 3. a gap the exchange fills on request ------------------------------------------------


def test_gap_served_on_rerequest_is_refetched_not_imputed(srv: FakeBinance, tmp_path: Path) -> None:
    """Minutes missing from the first answer but served when asked again are stored as the
    exchange's real candles, reported as re-fetched, never imputed."""
    day = date(2021, 4, 23)
    first, last = _ms("2021-04-23T12:00"), _ms("2021-04-23T12:09")
    srv.hide("ETHUSDT", first, last, times=1)

    (outcome,) = _ingestor(srv, tmp_path).ingest("ETH/USDT", [day])

    assert outcome.report["missing_found"] == 10
    assert outcome.report["refetched"] == 10
    assert outcome.report["imputed"] == 0
    assert outcome.report["missing"] == 0
    assert outcome.gaps.select("minutes", "refetched", "imputed", "missing").rows() == [
        (10, 10, 0, 0)
    ]
    stored = _stored(outcome)
    assert not stored["imputed"].any()
    want = _csv_between(ETH_CSV, _day_ms(day), _day_ms(day) + 86_400_000)
    assert len(want) == 1440
    assert _diff(_rows(stored), want) == []


# -- 4. transient faults ---------------------------------------------------------------------

FAULT_DAYS = [date(2021, 4, 21), date(2021, 4, 22), date(2021, 4, 23)]


@pytest.fixture(scope="module")
def clean_run(
    srv: FakeBinance, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[PartitionOutcome], int]:
    """FAULT_DAYS of ETH/USDT ingested with no fault: outcomes and klines request count."""
    srv.now_ms = AFTER_DATA_MS
    srv.clear_faults()
    srv.unhide()
    srv.clear_requests()
    outcomes = _ingestor(srv, tmp_path_factory.mktemp("clean")).ingest("ETH/USDT", FAULT_DAYS)
    return outcomes, len(srv.requests_to(KLINES_PATH))


@pytest.mark.parametrize("fault", ["429", "500", "503", "timeout", "truncated"])
def test_fault_mid_stream_loses_and_duplicates_nothing(
    srv: FakeBinance,
    tmp_path: Path,
    clean_run: tuple[list[PartitionOutcome], int],
    fault: Fault,
) -> None:
    """A rate limit, a server error, a hung request or a body cut short in the middle of a
    multi-day download is retried: the lake ends up exactly as after a clean run."""
    clean, clean_requests = clean_run
    srv.clear_requests()
    srv.timeout_sleep = 2.0  # longer than the client's 1 s timeout
    fired = _fault_when(srv, _after_requests(2), fault)
    # The source's clock must not read the server's (request-counting) clock.
    started = time.monotonic()
    outcomes = _ingestor(srv, tmp_path, clock=lambda: AFTER_DATA_MS).ingest("ETH/USDT", FAULT_DAYS)

    elapsed = time.monotonic() - started
    assert fired() and srv.pending_faults == [], "the fault never reached the client"
    if fault == "429":
        assert elapsed >= 1.0, "Binance's Retry-After: 1 was not honoured"
    klines = srv.requests_to(KLINES_PATH)
    # Exactly one extra request: the failed page asked again, nothing re-downloaded.
    assert len(klines) == clean_requests + 1
    assert klines[2] == klines[3], "the failed page was not retried as is"
    for got, want in zip(outcomes, clean, strict=True):
        assert got.day == want.day
        assert got.report == want.report  # same rows, gaps, hash: nothing lost or re-fetched
        assert got.write.content_hash == want.write.content_hash
        stored = _stored(got)
        assert stored["ts"].is_unique().all()
        assert stored.equals(_stored(want))
        assert stored.height == 1440 and not stored["imputed"].any()


def test_truncated_exchange_info_is_retried(srv: FakeBinance) -> None:
    """A market list cut short in transit is fetched again, not taken for "no markets"."""
    srv.inject("truncated", 1, path=EXCHANGE_INFO_URL_PATH)

    markets = _source(srv).load_markets()

    assert len(srv.requests_to(EXCHANGE_INFO_URL_PATH)) == 2
    assert srv.pending_faults == []
    assert {"BTC/USDT", "ETH/USDT"} <= set(markets["symbol"])
    assert markets.height == 13


# -- 5. invalid rows -------------------------------------------------------------------------


def test_bad_row_is_rejected_and_the_minute_refetched(srv: FakeBinance, tmp_path: Path) -> None:
    """A candle with high < low never reaches the lake: it is counted as rejected and its
    minute is asked for again, so the stored candle is the exchange's correct one."""
    days = [date(2021, 4, 21), date(2021, 4, 22)]
    fired = _fault_when(srv, _after_requests(1), "bad_row")  # first row of the 2nd page

    outcomes = _ingestor(srv, tmp_path, clock=lambda: AFTER_DATA_MS).ingest("ETH/USDT", days)

    assert fired() and srv.pending_faults == []
    klines = srv.requests_to(KLINES_PATH)
    eth = _csv_candles(ETH_CSV)
    bad_ts = min(t for t in eth if t >= int(klines[1]["startTime"]))
    bad_day = next(o for o in outcomes if _day_ms(o.day) <= bad_ts < _day_ms(o.day) + 86_400_000)
    other = [o for o in outcomes if o is not bad_day]

    assert bad_day.report["rejected"] == 1
    assert bad_day.rejected.select("ts", "reason").rows() == [(bad_ts, "high < low")]
    assert _report(tmp_path, "ETH/USDT", bad_day.day)[0]["rejected"] == 1
    assert bad_day.report["refetched"] == 1
    assert bad_day.report["imputed"] == 0
    assert all(o.report["rejected"] == 0 for o in other)

    stored = pl.concat([_stored(o) for o in outcomes])
    assert not stored["imputed"].any()
    assert (stored["high"] >= stored["low"]).all()
    want = _csv_between(ETH_CSV, _day_ms(days[0]), _day_ms(days[-1]) + 86_400_000)
    assert _diff(_rows(stored), want) == []
    assert any(int(q["startTime"]) <= bad_ts <= int(q["endTime"]) for q in klines[2:]), (
        "the rejected minute was not asked for again"
    )


# -- 6. failing fast and failing cleanly ---------------------------------------------------


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("symbol", "klines_calls"),
    [
        ("SOL/USDT", 1),  # listed in exchangeInfo, but the exchange refuses its klines
        ("FOO/USDT", 0),  # not listed at all: refused before any candle request
    ],
)
def test_unknown_symbol_fails_fast_naming_it(
    srv: FakeBinance, tmp_path: Path, symbol: str, klines_calls: int
) -> None:
    """A symbol the exchange does not serve stops at once with an error naming the exchange and
    the symbol, instead of retrying for minutes or writing empty days."""
    ingestor = _ingestor(srv, tmp_path)
    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        ingestor.ingest(symbol, [date(2021, 4, 21)])

    assert time.monotonic() - started < 2
    assert "binance" in str(err.value)
    assert symbol in str(err.value)
    assert len(srv.requests_to(KLINES_PATH)) == klines_calls
    assert _files(tmp_path) == []


def test_exchange_down_for_good_fails_within_budget_without_partial_file(
    srv: FakeBinance, tmp_path: Path
) -> None:
    """When the exchange stays down, the run gives up within its retry budget with an error
    naming the symbol; a month finished before stays, the failed month's file is not
    written at all (not even its days that were fetched before the failure)."""
    days = [date(2021, 4, 30), date(2021, 5, 1), date(2021, 5, 2)]
    # Once the first pass has paged into the middle of 2021-05-01, every request answers
    # 503: April is done and written, May fails part-way through its download.
    may_noon = _ms("2021-05-01T12:00")
    fired = _fault_when(
        srv, lambda klines: int(klines[-1]["startTime"]) > may_noon, "503", count=10_000
    )
    ingestor = _ingestor(srv, tmp_path, clock=lambda: AFTER_DATA_MS, retry_max_seconds=1)

    started = time.monotonic()
    with pytest.raises(SourceError) as err:
        ingestor.ingest("ETH/USDT", days)
    elapsed = time.monotonic() - started

    assert fired()
    assert elapsed < 5
    assert "ETH/USDT" in str(err.value)
    assert "binance" in str(err.value)
    done = ingestor.path("ETH/USDT", days[0])
    failed = ingestor.path("ETH/USDT", days[1])
    assert done != failed
    assert _files(tmp_path) == [done], "a partial or temporary file was left behind"
    assert _report(tmp_path, "ETH/USDT", days[0])[0]["rows"] == 1440
    assert list(Lake(tmp_path).day_reports("ohlcv", "binance", "1m", "ETH-USDT")) == days[:1]
    assert not failed.exists()
    klines = srv.requests_to(KLINES_PATH)
    failing = next(i for i, q in enumerate(klines) if int(q["startTime"]) > may_noon)
    assert len(klines[failing + 1 :]) > 1, "the 503 was not retried"


def test_failed_day_keeps_the_stored_month_as_it_was(srv: FakeBinance, tmp_path: Path) -> None:
    """A month file already in the lake is left exactly as it was when a later run of the
    month fails on one of its days: the days finished by that run are not half-written."""
    ingestor = _ingestor(srv, tmp_path, clock=lambda: AFTER_DATA_MS, retry_max_seconds=1)
    (kept,) = ingestor.ingest("ETH/USDT", [date(2021, 4, 23)])
    before = kept.path.read_bytes()
    days = [date(2021, 4, 24), date(2021, 4, 25)]
    # Once the first pass has paged past the maintenance gap, every request answers 503,
    # so 2021-04-25 fails while re-requesting its gap, after 2021-04-24 was fetched.
    fired = _fault_when(
        srv, lambda klines: int(klines[-1]["startTime"]) > GAP_LAST_MS, "503", count=10_000
    )

    with pytest.raises(SourceError, match="ETH/USDT"):
        ingestor.ingest("ETH/USDT", days)

    assert fired()
    assert _files(tmp_path) == [kept.path], "a partial or temporary file was left behind"
    assert kept.path.read_bytes() == before
    assert list(Lake(tmp_path).day_reports("ohlcv", "binance", "1m", "ETH-USDT")) == [
        date(2021, 4, 23)
    ]


# -- 7. only closed candles ------------------------------------------------------------------


def test_open_day_stores_only_closed_candles_and_appends(srv: FakeBinance, tmp_path: Path) -> None:
    """Today's file never holds the candle still forming; the next run appends the minutes
    closed since, downloading only those (and the newest stored minute again, in case it
    was stored while still forming) and leaving the stored ones untouched."""
    day = date(2021, 4, 22)
    srv.now_ms = _ms("2021-04-22T10:30") + 20_000  # the 10:30 candle is still forming
    ingestor = _ingestor(srv, tmp_path)

    (first,) = ingestor.ingest("ETH/USDT", [day])

    assert first.report["day_closed"] is False
    assert first.report["expected"] == 630
    assert first.report["rows"] == 630
    assert first.report["missing"] == first.report["imputed"] == 0
    before = _stored(first)
    assert before["ts"].max() == _ms("2021-04-22T10:29")
    want = _csv_between(ETH_CSV, _day_ms(day), _ms("2021-04-22T10:30"))
    assert _diff(_rows(before), want) == []

    srv.clear_requests()
    srv.now_ms += 5 * MINUTE_MS
    (second,) = ingestor.ingest("ETH/USDT", [day])

    after = _stored(second)
    assert second.report["day_closed"] is False
    assert second.report["expected"] == second.report["rows"] == 635
    assert after.height == before.height + 5
    assert after.head(before.height).equals(before)
    want = _csv_between(ETH_CSV, _day_ms(day), _ms("2021-04-22T10:35"))
    assert _diff(_rows(after), want) == []
    klines = srv.requests_to(KLINES_PATH)
    assert klines, "the second pass asked for nothing"
    assert all(int(q["startTime"]) >= _ms("2021-04-22T10:29") for q in klines), klines


# -- 8. idempotent reruns --------------------------------------------------------------------


def test_rerun_leaves_files_untouched(srv: FakeBinance, tmp_path: Path) -> None:
    """Ingesting the same days again yields the same content and does not rewrite the files."""
    days = [date(2021, 4, 24), date(2021, 4, 25)]
    first = _ingestor(srv, tmp_path).ingest("ETH/USDT", days)
    mtimes = [o.path.stat().st_mtime_ns for o in first]

    second = _ingestor(srv, tmp_path).ingest("ETH/USDT", days)

    assert [o.write.content_hash for o in second] == [o.write.content_hash for o in first]
    assert all(o.write.written for o in first)
    assert not any(o.write.written for o in second)
    assert [o.path.stat().st_mtime_ns for o in second] == mtimes
    assert [o.report for o in second] == [o.report for o in first]


# -- 9. market rules -------------------------------------------------------------------------


def test_market_rules_match_exchange_info_filters(srv: FakeBinance) -> None:
    """Order-size and price rules in the markets table are Binance's own filter values."""
    info = json.loads(EXCHANGE_INFO_PATH.read_text())
    markets = _source(srv).load_markets()

    assert markets.height == len(info["symbols"]) == 13
    by_id = {r["market_id"]: r for r in markets.iter_rows(named=True)}
    for entry in info["symbols"]:
        filters = {f["filterType"]: f for f in entry["filters"]}
        row = by_id[entry["symbol"]]
        assert row["symbol"] == f"{entry['baseAsset']}/{entry['quoteAsset']}"
        assert row["active"] is (entry["status"] == "TRADING")
        got = {k: row[k] for k in ("amount_step", "price_tick", "min_amount", "max_amount")}
        assert got == {
            "amount_step": float(filters["LOT_SIZE"]["stepSize"]),
            "price_tick": float(filters["PRICE_FILTER"]["tickSize"]),
            "min_amount": float(filters["LOT_SIZE"]["minQty"]),
            "max_amount": float(filters["LOT_SIZE"]["maxQty"]),
        }, entry["symbol"]
        assert row["min_cost"] == float(filters["MIN_NOTIONAL"]["minNotional"]), entry["symbol"]

    btc = by_id["BTCUSDT"]
    assert (btc["amount_step"], btc["price_tick"], btc["min_cost"]) == (0.000001, 0.01, 10.0)


def test_open_at_reads_one_candles_open_and_none_when_there_is_none(srv: FakeBinance) -> None:
    """The dry-run's fill price: one request for the candle opening at ts, its open as the
    exchange has it; None when the exchange has no candle there (yet)."""
    srv.now_ms = _ms("2021-04-22T10:30") + 20_000
    source = _source(srv)
    minute = _ms("2021-04-22T10:29")
    want = _csv_between(ETH_CSV, minute, minute + MINUTE_MS)[minute]
    srv.clear_requests()
    assert source.open_at("ETH/USDT", minute) == float(want[0])
    assert [q["limit"] for q in srv.requests_to(KLINES_PATH)] == ["1"]
    # This loopback server serves closed candles only (Binance also serves the forming one).
    assert source.open_at("ETH/USDT", _ms("2021-04-22T10:31")) is None
