"""The dry-run against the backtest: a live session minute by minute on the synthetic market
(ingest, decide, fill at the forming candle's open), then drift, the kill switch and recovery."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from candlestack.backtest_store import load_rules, load_window
from candlestack.drift import IMPUTED, REVISED, drift, drift_from_lake
from candlestack.dryrun import SKIPPED_NOTE, DryRun, DryRunError
from candlestack.execution import EXIT_REASONS
from candlestack.ingest import Ingestor
from candlestack.lake import DayData, Lake, write_parquet_atomic
from candlestack.ledger import Ledger, decision_key
from candlestack.live_status import StreamedOpens
from candlestack.sources.synthetic import SyntheticSource
from candlestack.strategies.config import StrategyConfig

SYMBOL = "BTC/USDT"
SESSION_START = datetime(2024, 3, 5, 9, 0, tzinfo=UTC)
SESSION_BARS = 150
MINUTE = timedelta(minutes=1)


def strategy(**dry_run) -> StrategyConfig:
    return StrategyConfig.model_validate(
        {
            "name": "btc_fast_cross",
            "strategy": "ma_cross",
            "symbol": SYMBOL,
            "timeframe": "1m",
            "order_value": 1000,
            "capital": 10000,
            "params": {"fast": 3, "slow": 12, "average": "ema"},
            "dry_run": {"enabled": True, **dry_run},
        }
    )


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


@dataclass
class Session:
    root: Path
    lake: Lake
    ledger: Ledger
    source: SyntheticSource
    clock: Clock

    def ingest(self) -> None:
        today = self.clock.now.date()
        Ingestor(self.source, self.lake).ingest(SYMBOL, [today - timedelta(days=1), today])

    def dry_run(self, config: StrategyConfig) -> DryRun:
        return DryRun(config, self.lake, "synthetic", self.source, self.ledger, self.clock)

    def live(self, config: StrategyConfig, bars: int, lag: timedelta = timedelta(seconds=2)):
        """Minute by minute: the bar closes, the candles land, the dry-run decides it."""
        for _ in range(bars):
            bar_ts = self.clock.now.replace(second=0, microsecond=0)
            self.clock.now = bar_ts + MINUTE + lag
            self.ingest()
            self.dry_run(config).run(bar_ts)

    def copy(self, root: Path) -> Session:
        shutil.copytree(self.root, root)
        return open_session(root, self.clock.now)


def open_session(root: Path, now: datetime) -> Session:
    clock = Clock(now)
    source = SyntheticSource(seed=7, symbols=[SYMBOL], clock=clock)
    lake = Lake(root / "lake")
    for day in (date(2024, 3, 4), date(2024, 3, 5)):
        path = lake.markets_path("synthetic", day)
        if not path.exists():
            write_parquet_atomic(path, source.load_markets().to_arrow(), {})
    ledger = Ledger(f"sqlite:///{root / 'ledger.sqlite'}")
    ledger.migrate()
    return Session(root, lake, ledger, source, clock)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Session:
    """One live session of SESSION_BARS minutes, shared read-only; tests copy it to change it."""
    session = open_session(tmp_path_factory.mktemp("session"), SESSION_START)
    session.ingest()
    session.live(strategy(), SESSION_BARS)
    session.ledger.close()
    return session


@pytest.fixture
def session(recorded: Session, tmp_path: Path) -> Session:
    return recorded.copy(tmp_path / "copy")


def backtest_trades(session: Session, config: StrategyConfig) -> pl.DataFrame:
    from candlestack.backtest import backtest

    window = load_window(session.lake, "synthetic", config)
    rules = load_rules(session.lake, "synthetic", SYMBOL)
    end = SESSION_START + SESSION_BARS * MINUTE
    bars = window.bars.filter(pl.col("ts") <= end)
    return backtest(config, bars, rules, start=SESSION_START).trades


def test_a_live_session_trades_like_the_backtest(session: Session):
    config = strategy()
    decisions = session.ledger.decisions(config.name)
    assert decisions.height == SESSION_BARS
    assert decisions.get_column("bar_ts").to_list() == [
        SESSION_START + i * MINUTE for i in range(SESSION_BARS)
    ]
    fills = session.ledger.fills(config.name)
    trades = backtest_trades(session, config).filter(
        pl.col("exit_reason") != EXIT_REASONS[4]  # the backtest sells at its window's end
    )
    assert trades.height >= 5, "the session should trade"
    buys = fills.filter(pl.col("side") == "buy")
    sells = fills.filter(pl.col("side") == "sell")
    assert buys.get_column("bar_ts").to_list()[: trades.height] == trades["entry_ts"].to_list()
    assert buys.get_column("price").to_list()[: trades.height] == trades["entry_price"].to_list()
    assert sells.get_column("bar_ts").to_list() == trades["exit_ts"].to_list()
    assert sells.get_column("price").to_list() == trades["exit_price"].to_list()
    # The fill is persisted seconds after the close (the lag plus compute), not a bar later.
    latency = (decisions["decided_at"] - decisions["bar_ts"]).dt.total_seconds() - 60
    assert latency.max() < 30
    assert decisions.get_column("compute_ms").max() < 1000
    balance = session.ledger.balance(config.name)
    assert balance.realised_pnl == pytest.approx(float(trades["pnl"].sum()))


def test_identical_inputs_give_zero_drift(session: Session):
    report = drift_from_lake(
        session.lake, "synthetic", session.ledger, strategy(), session.clock.now
    )
    assert report.passed, report.failures
    assert report.metrics["bars_compared"] == SESSION_BARS
    assert report.metrics["signal_agreement"] == 1.0
    assert report.metrics["unmatched_fills"] == 0
    assert report.metrics["fill_price_diff_bps_max"] == 0.0
    assert report.metrics["pnl_diff"] == pytest.approx(0.0, abs=1e-9)  # float sums only
    assert report.metrics["revised_bars"] == 0
    assert report.attributions.is_empty()


def test_drift_reads_its_window_from_the_last_flat_bar_and_equals_the_whole_replay(
    session: Session, monkeypatch: pytest.MonkeyPatch
):
    """The check runs a week after the session's middle: its window holds the second half.
    It reads the ledger from the dry-run's last flat bar before the window only, and finds
    what the replay of the whole session finds."""
    config = strategy()
    ledger = session.ledger
    now = SESSION_START + SESSION_BARS // 2 * MINUTE + timedelta(days=7)
    since = now - timedelta(days=7)
    window = load_window(session.lake, "synthetic", config)
    rules = load_rules(session.lake, "synthetic", SYMBOL)
    whole = drift(
        config,
        ledger.decisions(config.name),
        ledger.orders(config.name),
        ledger.fills(config.name),
        window.bars,
        rules,
        now,
    )
    fetched: list[int] = []
    frame = Ledger._frame

    def counting_frame(self, query, schema):
        result = frame(self, query, schema)
        fetched.append(result.height)
        return result

    monkeypatch.setattr(Ledger, "_frame", counting_frame)
    report = drift_from_lake(session.lake, "synthetic", ledger, config, now)
    monkeypatch.undo()

    last_sell = ledger.fills(config.name).filter(
        (pl.col("side") == "sell") & (pl.col("bar_ts") <= since)
    )
    assert not last_sell.is_empty(), "the session should have sold before its middle"
    assert report.replay_from == last_sell.get_column("bar_ts").max()
    assert SESSION_START < report.replay_from <= since
    assert max(fetched) < SESSION_BARS - SESSION_BARS // 3, fetched
    assert whole.metrics["bars_compared"] == SESSION_BARS - SESSION_BARS // 2
    assert report.metrics == whole.metrics
    assert report.passed and report.attributions.equals(whole.attributions)


def test_a_fill_whose_bar_is_not_stored_yet_is_compared_later(session: Session):
    """The check runs right after a buy decision: its fill is the forming bar's open, which
    the lake does not hold yet, so the replay has not filled there either."""
    config = strategy()
    fills = session.ledger.fills(config.name)
    buy = fills.filter(pl.col("side") == "buy").row(0, named=True)
    signal_ts = buy["bar_ts"] - MINUTE
    bars = load_window(session.lake, "synthetic", config).bars
    report = drift(
        config,
        session.ledger.decisions(config.name).filter(pl.col("bar_ts") <= signal_ts),
        session.ledger.orders(config.name),
        fills.filter(pl.col("bar_ts") <= buy["bar_ts"]),
        bars.filter(pl.col("ts") <= signal_ts),
        load_rules(session.lake, "synthetic", SYMBOL),
        session.clock.now,
    )
    assert report.passed, report.failures
    assert report.metrics["unmatched_fills"] == 0
    # Once the bar is stored, the same fill is compared and matches.
    report = drift(
        config,
        session.ledger.decisions(config.name).filter(pl.col("bar_ts") <= buy["bar_ts"]),
        session.ledger.orders(config.name),
        fills.filter(pl.col("bar_ts") <= buy["bar_ts"]),
        bars.filter(pl.col("ts") <= buy["bar_ts"]),
        load_rules(session.lake, "synthetic", SYMBOL),
        session.clock.now,
    )
    assert report.passed, report.failures
    assert report.metrics["fill_price_diff_bps_max"] == 0.0


def edit_stored_day(session: Session, day: date, *changes: pl.Expr) -> None:
    """Store one day of the month file with `changes` applied, its report and gaps kept."""
    lake = session.lake
    stored = lake.read_month("ohlcv", "synthetic", "1m", "BTC-USDT", day)
    gaps = stored.gaps.filter(pl.col("gap_start").dt.date() == day)
    candles = stored.day(day).with_columns(*changes)
    data = DayData(candles, stored.reports[day], gaps)
    lake.write_month("ohlcv", "synthetic", "1m", "BTC-USDT", day, {day: data})


def revise_candle(session: Session, ts: datetime, factor: float) -> None:
    """The exchange revised one stored candle: every price of that minute moves by `factor`."""
    edit_stored_day(
        session,
        ts.date(),
        *(
            pl.when(pl.col("ts") == ts).then(pl.col(c) * factor).otherwise(pl.col(c)).alias(c)
            for c in ("open", "high", "low", "close")
        ),
    )


def test_a_revised_candle_is_reported_and_attributed(session: Session):
    config = strategy()
    buy = session.ledger.fills(config.name).filter(pl.col("side") == "buy").row(0, named=True)
    revise_candle(session, buy["bar_ts"], 1.002)
    report = drift_from_lake(session.lake, "synthetic", session.ledger, config, session.clock.now)
    assert not report.passed
    assert report.metrics["revised_bars"] >= 1
    assert report.metrics["fill_price_diff_bps_max"] == pytest.approx(20, abs=1)
    price_rows = report.attributions.filter(pl.col("what") == "buy fill price")
    assert price_rows.get_column("cause").to_list()[0] == REVISED
    assert price_rows.get_column("bar_ts").to_list()[0] == buy["bar_ts"] - MINUTE
    assert any("fill price difference" in f for f in report.failures)


def test_an_imputed_fill_bar_is_attributed(session: Session):
    """The live dry-run filled at a forming candle that the lake later holds as imputed."""
    config = strategy()
    buy = session.ledger.fills(config.name).filter(pl.col("side") == "buy").row(0, named=True)
    edit_stored_day(
        session,
        buy["bar_ts"].date(),
        (pl.col("imputed") | (pl.col("ts") == buy["bar_ts"])).alias("imputed"),
    )
    drifted = drift_from_lake(session.lake, "synthetic", session.ledger, config, session.clock.now)
    causes = drifted.attributions.filter(pl.col("bar_ts") == buy["bar_ts"] - MINUTE)
    assert IMPUTED in causes.get_column("cause").to_list()
    assert drifted.metrics["unmatched_fills"] >= 1


def test_a_repeated_bar_and_a_restart_execute_nothing_twice(session: Session):
    config = strategy()
    before = session.ledger.decisions(config.name).height, session.ledger.audit_count()
    last = SESSION_START + (SESSION_BARS - 1) * MINUTE
    outcome = session.dry_run(config).run(last)
    assert outcome.already_decided and not outcome.decisions
    reopened = Ledger(session.ledger.url.replace("sqlite:///", "sqlite:///"))
    assert (reopened.decisions(config.name).height, reopened.audit_count()) == before
    assert reopened.verify_audit_chain() == []


def test_missed_bars_are_caught_up_in_order_or_skipped_by_policy(session: Session):
    config = strategy()
    start = session.clock.now.replace(second=0, microsecond=0)
    session.clock.now = start + 10 * MINUTE + timedelta(seconds=2)  # down for ten minutes
    session.ingest()
    outcome = session.dry_run(config).run(start + 9 * MINUTE)
    assert [d.bar_ts for d in outcome.decisions] == [start + i * MINUTE for i in range(10)]

    latest = strategy(catch_up="latest")
    session.clock.now += 5 * MINUTE
    session.ingest()
    outcome = session.dry_run(latest).run(start + 14 * MINUTE)
    notes = [d.note for d in outcome.decisions]
    assert notes[:4] == [SKIPPED_NOTE] * 4 and notes[4] != SKIPPED_NOTE
    report = drift_from_lake(session.lake, "synthetic", session.ledger, latest, session.clock.now)
    assert report.metrics["skipped_bars"] == 4


def test_kill_switch_trips_on_drawdown_and_blocks_until_reset(session: Session):
    config = strategy(max_drawdown=0.0001)  # any loss trips it
    session.live(config, 60)
    ledger = session.ledger
    reason = ledger.tripped(config.name)
    assert reason and reason.startswith("drawdown")
    # The audit log orders the trip and the decisions: none after it placed an order.
    events = ledger.audit_events()
    trip_seq = events.filter(pl.col("kind") == "kill_switch_trip").item(0, "seq")
    after = [
        json.loads(payload)["action"]
        for payload in events.filter(
            (pl.col("seq") > trip_seq) & (pl.col("kind") == "decision")
        ).get_column("payload")
    ]
    assert "blocked" in after and not {"buy", "sell"} & set(after)

    assert ledger.reset(config.name, "reviewed the drawdown", "test")
    session.live(strategy(), 40)
    assert ledger.tripped(config.name) is None
    resumed = ledger.decisions(config.name).tail(40)
    assert resumed.filter(pl.col("action") == "blocked").is_empty()
    assert resumed.filter(pl.col("action").is_in(["buy", "sell"])).height >= 1


def test_stale_data_trips_the_kill_switch(session: Session):
    config = strategy(stale_after_seconds=120)
    bar_ts = session.clock.now.replace(second=0, microsecond=0)
    # The candle feed stopped: the bar is stored, but nothing newer for five minutes.
    session.clock.now = bar_ts + MINUTE + timedelta(seconds=2)
    session.ingest()
    session.clock.now += 5 * MINUTE
    session.dry_run(config).run(bar_ts)
    reason = session.ledger.tripped(config.name)
    assert reason and reason.startswith("stale data") and "BTC/USDT" in reason


def test_an_error_burst_trips_the_kill_switch(session: Session):
    config = strategy(error_burst=2)
    future = session.clock.now + timedelta(hours=1)  # a bar the lake does not have
    for _ in range(2):
        with pytest.raises(DryRunError, match="no closed 1m bar"):
            session.dry_run(config).run(future)
    reason = session.ledger.tripped(config.name)
    assert reason and reason.startswith("error burst: 2 failed bars")


def test_decision_keys_are_the_sensor_run_keys(session: Session):
    config = strategy()
    keys = session.ledger.decisions(config.name).get_column("key").to_list()
    assert keys[0] == decision_key(config.name, SYMBOL, "1m", SESSION_START)


def test_kill_switch_cli_trips_and_resets_with_a_reason(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    env = {**os.environ, "CANDLESTACK_LEDGER_URL": url}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "candlestack.kill_switch", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    refused = cli("trip", "--scope", "btc_scalp")
    assert refused.returncode == 2 and "trip needs --reason" in refused.stderr
    tripped = cli("trip", "--scope", "btc_scalp", "--reason", "fat finger on the exchange")
    assert tripped.returncode == 0, tripped.stderr
    assert "btc_scalp: tripped" in tripped.stdout
    ledger = Ledger(url)
    assert ledger.tripped("btc_scalp") == "fat finger on the exchange"
    assert cli("reset", "--scope", "btc_scalp", "--reason", "checked").returncode == 0
    assert ledger.tripped("btc_scalp") is None
    payloads = [json.loads(p) for p in ledger.audit_events().get_column("payload")]
    assert [p["by"].startswith("cli:") for p in payloads] == [True, True]


def test_a_kill_switch_scope_that_is_no_strategy_is_refused_naming_the_known_ones(
    tmp_path: Path,
):
    """Reported: `trip --scope btc_scalpp` said "tripped", and btc_scalp kept trading."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    env = {**os.environ, "CANDLESTACK_LEDGER_URL": url}
    typo = subprocess.run(
        [sys.executable, "-m", "candlestack.kill_switch", "trip", "--scope", "btc_scalpp",
         "--reason", "maintenance"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert typo.returncode == 2
    assert "unknown kill-switch scope 'btc_scalpp' (did you mean 'btc_scalp'?)" in typo.stderr
    assert "'*', btc_ma_cross, btc_mean_reversion, btc_scalp, eth_breakout" in typo.stderr
    ledger = Ledger(url)
    ledger.migrate()
    assert ledger.kill_switch_states().is_empty()  # nothing tripped, nothing audited
    assert ledger.audit_events().is_empty()


def test_an_order_under_the_min_notional_is_rejected_with_its_reason_never_filled(
    session: Session,
):
    config = strategy(catch_up="all").model_copy(update={"name": "tiny", "order_value": 2.0})
    session.live(config, 40)
    orders = session.ledger.orders("tiny")
    assert orders.height >= 1
    assert set(orders.get_column("status")) == {"rejected"}
    assert set(orders.get_column("reason")) == {"notional below the market's minimum (min cost)"}
    assert session.ledger.fills("tiny").is_empty()
    assert session.ledger.position("tiny", SYMBOL) is None
    report = drift_from_lake(session.lake, "synthetic", session.ledger, config, session.clock.now)
    assert report.passed, report.failures  # the backtest refuses the same orders
    assert report.metrics["rejected_orders"] == orders.height


class AskedNothing:
    """A source the dry-run must not ask: the stream has shown every forming minute."""

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        raise AssertionError(f"asked the exchange for the open of {ts_ms}")


def test_the_fill_is_the_streamed_open_without_asking_the_exchange(
    session: Session, tmp_path: Path
):
    """With the live collector up, the forming minute's open comes from its stream; the fills
    are the ones the exchange's open would have made."""
    config = strategy()
    streamed = StreamedOpens(tmp_path / "opens")
    from_rest = session.copy(tmp_path / "rest")
    before = session.ledger.fills(config.name).height
    for _ in range(40):
        bar_ts = session.clock.now.replace(second=0, microsecond=0)
        next_ms = int((bar_ts + MINUTE).timestamp() * 1000)
        for each in (session, from_rest):
            each.clock.now = bar_ts + MINUTE + timedelta(seconds=2)
            each.ingest()
        streamed.record(SYMBOL, next_ms, session.source.open_at(SYMBOL, next_ms))
        DryRun(
            config, session.lake, "synthetic", AskedNothing(), session.ledger, session.clock,
            streamed=streamed,
        ).run(bar_ts)  # fmt: skip
        from_rest.dry_run(config).run(bar_ts)
    fills = session.ledger.fills(config.name)
    assert fills.height > before, "the session should trade meanwhile"
    columns = ["bar_ts", "side", "price", "amount", "fee"]
    assert fills.select(columns).equals(from_rest.ledger.fills(config.name).select(columns))
