"""Benchmark: the live collector (issue 16), streaming from loopback Binance servers.

    python bench/live.py [--symbols 1 5 20] [--minutes 12] [--minute-seconds 10]
                         [--fill-minutes 8] [--history 500000 | --skip-history]

For each symbol count N, `python -m candlestack.live`'s collector (`live.wired` and
`live.serve`: the status file and the bars-and-features builds of the default feature set
on every close) runs in a process of its own against FakeBinanceWS (klines on a compressed
clock, a minute every `--minute-seconds`) and FakeBinance (REST, on the stream's clock).
The recording has two real markets: their CSVs are replayed alternately under the market
ids of the recorded exchangeInfo (13) and, past 13 symbols, under real Binance USDT ids
added to a copy of it. The lake is first backfilled over REST from 2021-04-20 (the
recording's start) to 2021-05-19 23:50, with every month's bars and features built; the
stream starts there, its first minute is a warm-up, and the `--minutes` counted after it
cross midnight into 2021-05-20, where every timeframe closes (days 19 and 20 of May).
The clock is slower than the slowest minute's work at 20 symbols (midnight's, about 6 s),
so that its work is done before the next close, as it is at the real clock.

Prints, per N:
1. WebSocket receipt -> persisted latency p50/p95/p99/max (target p95 < 300 ms at 20).
2. Post-close calculation (BuildOnClose.build_seconds: closing kline's arrival -> its
   bars and features built) p50/p95/max, and how many closes were coalesced into one
   build (target p95 < 500 ms).
3. The collector process's CPU seconds per streamed minute and its resident memory, in
   total and per symbol, and its wall seconds per streamed minute against the clock's.
4. Close to fill with a real dagster-daemon (`close_to_fill`), on the wall clock for
   `--fill-minutes` (0 skips it): per stage, seconds from the bar's close, p50/p95
   (target: the fill p95 <= 10 s).
5. Unless --skip-history: bench/dry_run_history.py's dry-run step and drift check with 0,
   a drift window's (10,080) and --history earlier decisions in the ledger (target:
   within 20 % of each other).
Figures only.
"""

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402

from candlestack.bars import BarBuilder  # noqa: E402
from candlestack.config import symbol_key  # noqa: E402
from candlestack.feature_store import FeatureBuilder, load_feature_set  # noqa: E402
from candlestack.ingest import Ingestor  # noqa: E402
from candlestack.lake import Lake  # noqa: E402
from candlestack.ledger import Ledger  # noqa: E402
from candlestack.resample import BAR_TIMEFRAMES  # noqa: E402
from candlestack.sources.ccxt_source import CLOSE_MARGIN_MS, CcxtSource  # noqa: E402
from tests.integration.fake_binance import EXCHANGE_INFO_PATH, OHLCV_DIR, FakeBinance  # noqa: E402
from tests.integration.fake_binance_ws import FakeBinanceWS  # noqa: E402
from tests.integration.live_stack import live_stack  # noqa: E402

CSVS = [OHLCV_DIR / f"tooyipjee_binance_{m}_1m.csv" for m in ("BTCUSDT", "ETHUSDT")]
# Real Binance USDT markets of 2021 the recorded exchangeInfo lacks, for N > 13.
ADDED_MARKETS = ["BNBUSDT", "XRPUSDT", "DOTUSDT", "LTCUSDT", "BCHUSDT", "TRXUSDT", "EOSUSDT"]
FIRST_DAY = date(2021, 4, 20)
STREAM_START = datetime(2021, 5, 19, 23, 50, tzinfo=UTC)
STREAM_START_MS = int(STREAM_START.timestamp() * 1000)
MINUTE_MS = 60_000
MINUTE = timedelta(minutes=1)
WARMUP_MINUTES = 1


def exchange_info(folder: Path, count: int) -> tuple[Path, dict[str, str]]:
    """An exchangeInfo with at least `count` markets: the recorded one, plus copies of its
    BTCUSDT entry under ADDED_MARKETS. Returns its path and the first `count` market ids,
    USDT ones first, mapped to their ccxt symbols."""
    info = json.loads(EXCHANGE_INFO_PATH.read_text())
    entries = sorted(info["symbols"], key=lambda s: s["quoteAsset"] != "USDT")
    btc = next(s for s in entries if s["symbol"] == "BTCUSDT")
    for market_id in ADDED_MARKETS[: max(0, count - len(entries))]:
        entries.append({**copy.deepcopy(btc), "symbol": market_id, "baseAsset": market_id[:-4]})
    info["symbols"] = entries
    path = folder / "exchangeInfo.json"
    path.write_text(json.dumps(info))
    return path, {s["symbol"]: f"{s['baseAsset']}/{s['quoteAsset']}" for s in entries[:count]}


def prefill(lake_root: Path, markets: dict[str, Path], symbols: dict[str, str], info: Path):
    """Backfill every market over REST up to the stream's start, then build each month's
    bars and features, as the backfill and the schedules leave the lake."""
    started = time.perf_counter()
    lake = Lake(lake_root)
    span = (STREAM_START.date() - FIRST_DAY).days + 1
    days = [FIRST_DAY + timedelta(days=k) for k in range(span)]
    features = load_feature_set(None)
    bars = BarBuilder(lake, "binance", 0.01)
    builder = FeatureBuilder(lake, "binance", features, 0.01)
    with FakeBinance(markets, now_ms=STREAM_START_MS, exchange_info=info) as rest:
        source = CcxtSource("binance", {**rest.ccxt_config(), "timeout": 30000})
        source.client.milliseconds = lambda: STREAM_START_MS + CLOSE_MARGIN_MS
        for symbol in symbols.values():
            Ingestor(source, lake).ingest(symbol, days)
            for month in sorted({d.replace(day=1) for d in days}):
                for timeframe in BAR_TIMEFRAMES:
                    bars.build(timeframe, symbol_key(symbol), month)
                for timeframe in features.timeframes:
                    builder.build(timeframe, symbol_key(symbol), month)
    print(
        f"lake: {len(symbols)} symbols, {days[0]} to {STREAM_START:%Y-%m-%d %H:%M} UTC, "
        f"bars and features built, in {time.perf_counter() - started:.0f} s"
    )


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def stream(folder: Path, info: Path, symbols: dict[str, str], minutes: int, minute_seconds: float):
    """One collector process streaming `symbols` for WARMUP_MINUTES + `minutes`: its figures."""
    markets = {m: CSVS[k % len(CSVS)] for k, m in enumerate(symbols)}
    worker = subprocess.Popen(
        [sys.executable, __file__, "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # The clock starts with the servers: only once the worker has imported everything.
    assert worker.stdout.readline().strip() == "ready"
    ws = FakeBinanceWS(markets, start_ms=STREAM_START_MS, minute_seconds=minute_seconds)
    with ws, FakeBinance(markets, now_ms=ws.now_ms, exchange_info=info) as rest:
        options = rest.ccxt_config()
        options["urls"]["api"] |= ws.ccxt_config()["urls"]["api"]
        from_ms = STREAM_START_MS + WARMUP_MINUTES * MINUTE_MS
        spec = {
            "env": {
                "CANDLESTACK_SOURCE": "ccxt",
                "CANDLESTACK_SYMBOLS": ",".join(symbols.values()),
                "CANDLESTACK_LAKE": str(folder / "lake"),
                "CANDLESTACK_LIVE_STATUS": str(folder / "status.json"),
                "CANDLESTACK_CCXT_OPTIONS": json.dumps({**options, "timeout": 10000}),
            },
            "from_ms": from_ms,
            "end_ms": from_ms + (minutes - 1) * MINUTE_MS,
        }
        worker.stdin.write(json.dumps(spec) + "\n")
        worker.stdin.flush()
        result = json.loads(worker.stdout.readline())
    worker.wait(30)
    return result


def collect() -> None:
    """The worker: the deployment's collector and hooks, measured from inside."""
    import asyncio

    from candlestack.config import load_settings
    from candlestack.live import serve, wired

    print("ready", flush=True)
    spec = json.loads(sys.stdin.readline())
    os.environ.update(spec["env"])
    collector, recorder, builds = wired(load_settings())
    from_ms, end_ms = spec["from_ms"], spec["end_ms"]
    latencies: list[float] = []
    slowest: dict[int, float] = {}  # minute (open ms) -> its slowest symbol's latency
    done: set[str] = set()
    marks: dict[str, float] = {}

    async def run() -> None:
        stop = asyncio.Event()

        def measure(candle) -> None:
            if candle.ts_ms < from_ms:
                return
            if not marks:
                marks.update(cpu=time.process_time(), wall=time.time())
                marks["builds_before"] = len(builds.build_seconds)
            if candle.ts_ms <= end_ms:
                latencies.append(candle.latency_ms)
                slowest[candle.ts_ms] = max(slowest.get(candle.ts_ms, 0), candle.latency_ms)
            if candle.ts_ms >= end_ms:
                done.add(candle.symbol)
            if len(done) == len(collector.symbols) and "cpu_end" not in marks:
                marks.update(cpu_end=time.process_time(), wall_end=time.time())
                stop.set()

        collector.on_persisted.append(measure)
        await serve(collector, recorder, builds, stop)

    asyncio.run(run())
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    counted = (end_ms - from_ms) // MINUTE_MS + 1
    spans = counted - 1  # minutes between the first counted minute's persist and the last's
    result = {
        "latencies_ms": latencies,
        "slowest_ms": sorted(slowest.items()),
        "build_seconds": list(builds.build_seconds)[int(marks["builds_before"]) :],
        "cpu_per_minute": (marks["cpu_end"] - marks["cpu"]) / spans,
        "wall_per_minute": (marks["wall_end"] - marks["wall"]) / spans,
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
        "closes": counted * len(collector.symbols),
        "reconnects": collector.state.reconnects,
        "repaired": sum(s.repaired for s in collector.state.symbols.values()),
    }
    print(json.dumps(result), flush=True)


def report(n: int, figures: dict, minute_seconds: float, first: tuple[int, float]) -> None:
    """`first`: the symbol count and resident MiB of the first session, for the memory each
    symbol adds."""
    lat, build = figures["latencies_ms"], figures["build_seconds"]
    print(f"{n} symbol(s):")
    print(
        f"  ws->persist ms    p50 {percentile(lat, 50):7.1f}  p95 {percentile(lat, 95):7.1f}  "
        f"p99 {percentile(lat, 99):7.1f}  max {max(lat):7.1f}  ({len(lat)} candles)"
    )
    by_minute = "  ".join(
        f"{datetime.fromtimestamp(ts / 1000, UTC):%H:%M} {ms:.0f}"
        for ts, ms in figures["slowest_ms"]
    )
    print(f"  slowest symbol's ws->persist ms, by minute:  {by_minute}")
    print(
        f"  post-close ms     p50 {percentile(build, 50) * 1000:7.1f}  "
        f"p95 {percentile(build, 95) * 1000:7.1f}  max {max(build) * 1000:7.1f}  "
        f"({len(build)} builds for {figures['closes']} closes)"
    )
    cpu = figures["cpu_per_minute"]
    print(
        f"  cpu s/minute      {cpu:7.3f}  per symbol {cpu / n:6.3f}  "
        f"({cpu / minute_seconds:.0%} of a core at this clock, "
        f"{cpu / 60:.1%} at the real one)"
    )
    rss = figures["rss_mib"]
    added = f"  per added symbol {(rss - first[1]) / (n - first[0]):5.1f}" if n > first[0] else ""
    print(
        f"  memory MiB        rss {rss:6.0f}  peak {figures['hwm_mib']:6.0f}  "
        f"per symbol {rss / n:6.1f}{added}"
    )
    print(
        f"  wall s/minute     {figures['wall_per_minute']:6.2f} (clock {minute_seconds})"
        f"  reconnects {figures['reconnects']}  repaired {figures['repaired']}"
    )


def collector_figures(counts: list[int], minutes: int, minute_seconds: float) -> None:
    """Sections 1-3, for each symbol count."""
    with tempfile.TemporaryDirectory(prefix="bench_live_") as tmp:
        folder = Path(tmp)
        info, symbols = exchange_info(folder, max(counts))
        markets = {m: CSVS[k % len(CSVS)] for k, m in enumerate(symbols)}
        prefill(folder / "lake", markets, symbols, info)
        first = None
        print(
            f"streaming {STREAM_START + timedelta(minutes=WARMUP_MINUTES):%Y-%m-%d %H:%M} UTC "
            f"on: {minutes} minutes counted after a warm-up of {WARMUP_MINUTES}, "
            f"a minute every {minute_seconds} s"
        )
        for n in counts:
            session = folder / f"n{n}"
            shutil.copytree(folder / "lake", session / "lake")
            chosen = dict(list(symbols.items())[:n])
            figures = stream(session, info, chosen, minutes, minute_seconds)
            first = first or (n, figures["rss_mib"])
            report(n, figures, minute_seconds, first)
            shutil.rmtree(session)


def close_to_fill(minutes: float) -> None:
    """A bar's close to its paper fill on the whole live path, on the wall clock: the
    loopback Binance replaying a recorded day as today, `python -m candlestack.live`, and a
    real dagster-daemon with the repository's instance settings running dry_run_bars for the
    1m strategy (tests/integration/live_stack.py). Per stage, from the run's own events."""
    folder = Path(tempfile.mkdtemp(prefix="bench-live-fill-"))
    print(f"\nclose to fill: collector, dagster-daemon and dry_run_bars for {minutes:g} min ...")
    with live_stack(folder) as stack:
        time.sleep(minutes * 60)
    os.environ["DAGSTER_HOME"] = stack.env["DAGSTER_HOME"]
    instance = dg.DagsterInstance.get()
    # The first run waits for the daemon's start-up: left out.
    decisions = Ledger(stack.ledger_url).decisions("btc_scalp").slice(1)
    if decisions.height < 2:
        print("  too few bars decided to measure; run longer")
        return
    stages = {
        "run requested (persist, build, sensor)": None,
        "run launched (queue)": dg.DagsterEventType.RUN_STARTING,
        "run worker up (process, imports)": dg.DagsterEventType.RUN_START,
        "step started": dg.DagsterEventType.STEP_START,
        "decided (fill price, signals)": None,
        "step done (ledger commit, metadata)": dg.DagsterEventType.STEP_SUCCESS,
    }
    since_close: dict[str, list[float]] = {stage: [] for stage in stages}
    for row in decisions.iter_rows(named=True):
        close = (row["bar_ts"] + MINUTE).timestamp()
        run_id = row["run_id"]
        for stage, kind in stages.items():
            if kind is None:
                at = (
                    instance.get_run_record_by_id(run_id).create_timestamp
                    if stage.startswith("run requested")
                    else row["decided_at"]
                ).timestamp()
            else:
                at = instance.get_records_for_run(run_id, of_type=kind).records[0]
                at = at.event_log_entry.timestamp
            since_close[stage].append(at - close)
    print(f"  bars decided: {decisions.height}; seconds after the close, p50 / p95:")
    for stage, values in since_close.items():
        print(f"  {stage:40s} {percentile(values, 50):6.2f} {percentile(values, 95):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, nargs="*", default=[1, 5, 20], help="none: skip")
    parser.add_argument("--minutes", type=int, default=12, help="at least 2")
    parser.add_argument("--minute-seconds", type=float, default=10.0)
    parser.add_argument("--history", type=int, default=500_000)
    parser.add_argument("--skip-history", action="store_true")
    parser.add_argument("--fill-minutes", type=float, default=8, help="0 skips close to fill")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Warnings expected here: the prefill's first days have gaps (the recording starts
    # mid-day), and a new day's first minutes have no 1h bars for its 1h features yet.
    logging.getLogger("candlestack").setLevel(logging.ERROR)
    if args.worker:
        collect()
        return
    if args.symbols:
        collector_figures(args.symbols, args.minutes, args.minute_seconds)
    if args.fill_minutes:
        close_to_fill(args.fill_minutes)
    if not args.skip_history:
        from bench.dry_run_history import WINDOW, measure, print_figures

        # A drift check compares its window (7 days of bars): one full window of decisions
        # is what it costs without history to grow into.
        sizes = sorted({0, min(WINDOW, args.history), args.history})
        print(
            f"dry-run step and drift check, {', '.join(f'{n:,}' for n in sizes)} earlier decisions:"
        )
        print_figures(measure(args.history, 3, sizes), 3)


if __name__ == "__main__":
    main()
