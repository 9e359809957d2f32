"""The dry-run in Dagster: the sensor's requests and cursor, a bar executed once, the kill
switch job, and the audit and drift checks, on today's synthetic candles."""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest
from sqlalchemy import create_engine, text

from assets.dry_run import AUDIT_CHECK, DRIFT_CHECK, drift_checks, dry_run_assets, ledger_snapshot
from candlestack.dryrun import LATENCY_WINDOW, latency_stats, session_summary
from candlestack.errors import ConfigError
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.ledger import (
    Balance,
    DecisionRecord,
    FillRecord,
    Ledger,
    OrderRecord,
    Position,
)
from candlestack.live_status import StreamedOpens
from candlestack.sources.synthetic import SyntheticSource
from pipelines.jobs import kill_switch
from pipelines.sensors import dry_run_bars
from resources import CcxtSourceResource, LakeResource, LedgerResource, SyntheticSourceResource

STRATEGY = "btc_scalp"  # the built-in 1m strategy: bars close every minute
SYMBOLS = ["BTC/USDT"]


@pytest.fixture
def live(tmp_path):
    """Yesterday's and today's closed BTC minutes and market rules, as the live schedule
    leaves them, plus resources pointing there."""
    lake = Lake(tmp_path / "lake")
    source = SyntheticSource(seed=7, symbols=SYMBOLS)
    today = datetime.now(UTC).date()
    if datetime.now(UTC) - datetime.combine(today, datetime.min.time(), UTC) < timedelta(minutes=5):
        pytest.skip("too close to midnight UTC for a session of today's bars")
    Ingestor(source, lake).ingest("BTC/USDT", [today - timedelta(days=1), today])
    for day in (today - timedelta(days=1), today):
        write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    resources = {
        "source": SyntheticSourceResource(symbols=SYMBOLS),
        "lake": LakeResource(
            root=str(lake.root),
            catalog_path=str(tmp_path / "c.duckdb"),
            reports_path=str(tmp_path / "reports"),
        ),
        "ledger": LedgerResource(url=url),
    }
    return resources, Ledger(url)


def asset(name: str) -> dg.AssetsDefinition:
    return next(a for a in dry_run_assets if a.key == dg.AssetKey(f"dryrun_{name}"))


def tick(instance, resources, cursor=None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return dry_run_bars(context)


def run(request: dg.RunRequest, resources, instance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [asset(STRATEGY)],
        run_config=request.run_config,
        resources=resources,
        instance=instance,
        tags=request.tags,
    )


def test_sensor_requests_each_new_bar_once_and_the_run_executes_it_once(live):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    first = tick(instance, resources)
    # A strategy seen for the first time starts at its newest closed bar; strategies whose
    # bars are not built yet request nothing.
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    cursor = json.loads(first.cursor)
    newest = datetime.fromisoformat(cursor[STRATEGY])
    assert request.run_key == f"{STRATEGY}|BTC/USDT|1m|{newest.isoformat()}"
    assert request.asset_selection == [dg.AssetKey(f"dryrun_{STRATEGY}")]
    # The same tick again: nothing new.
    assert not tick(instance, resources, first.cursor).run_requests

    # Three bars closed while nothing ran: requested in order.
    behind = json.dumps({STRATEGY: (newest - timedelta(minutes=3)).isoformat()})
    caught_up = tick(instance, resources, behind).run_requests
    assert [r.tags["candlestack/bar_open"] for r in caught_up] == [
        (newest - timedelta(minutes=k)).isoformat() for k in (2, 1, 0)
    ]
    for earlier in caught_up:
        result = run(earlier, resources, instance)
        assert result.success
    decisions = ledger.decisions(STRATEGY)
    assert decisions.get_column("bar_ts").to_list() == [
        newest - timedelta(minutes=k) for k in (2, 1, 0)
    ]
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["kill_switch"].value.startswith("armed")
    assert metadata["session_decisions"].value == 3
    assert "close_to_fill_s" in metadata

    # The newest bar again (a repeated tick or a restarted daemon): nothing executed twice.
    again = run(request, resources, instance)
    metadata = again.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["note"].value.startswith("already decided")
    assert ledger.decisions(STRATEGY).height == 3


def test_a_dry_run_filling_at_the_streamed_open_builds_no_exchange_client(live, tmp_path):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    (request,) = tick(instance, resources).run_requests
    bar_open = datetime.fromisoformat(request.tags["candlestack/bar_open"]).astimezone(UTC)
    next_ms = int((bar_open + timedelta(minutes=1)).timestamp() * 1000)
    opens = StreamedOpens(tmp_path / "opens")
    opens.record("BTC/USDT", next_ms, 64_000.0)
    # ccxt has no exchange "synthetic" (the lake's): building its client would raise.
    unbuildable = CcxtSourceResource(exchange="synthetic", live_opens=str(tmp_path / "opens"))
    with pytest.raises(ConfigError, match="unknown ccxt exchange id 'synthetic'"):
        unbuildable.open()
    result = dg.materialize(
        [asset(STRATEGY)],
        run_config=request.run_config,
        resources={**resources, "source": unbuildable},
        instance=instance,
        tags=request.tags,
    )
    assert result.success
    assert ledger.decisions(STRATEGY).get_column("bar_ts").to_list() == [bar_open]


def test_kill_switch_job_trips_and_resets_with_an_audited_reason(live):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()

    def change(action: str, reason: str) -> dg.ExecuteInProcessResult:
        config = {"action": action, "scope": STRATEGY, "reason": reason}
        return kill_switch.execute_in_process(
            run_config={"ops": {"change_kill_switch": {"config": config}}},
            resources={"ledger": resources["ledger"]},
            instance=instance,
        )

    tripped = change("trip", "exchange maintenance")
    assert ledger.tripped(STRATEGY) == "exchange maintenance"
    observed = tripped.asset_observations_for_node("change_kill_switch")[0]
    assert "TRIPPED" in observed.metadata["kill_switch"].value
    assert observed.metadata["change"].value.startswith("trip btc_scalp: exchange maintenance")

    request = tick(instance, resources).run_requests[0]
    result = run(request, resources, instance)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["kill_switch"].value == "TRIPPED: exchange maintenance"
    assert ledger.orders(STRATEGY).is_empty()

    change("reset", "maintenance over")
    assert ledger.tripped(STRATEGY) is None
    events = ledger.audit_events()
    kinds = events.get_column("kind").to_list()
    assert kinds.count("kill_switch_trip") == kinds.count("kill_switch_reset") == 1
    by = json.loads(events.filter(pl.col("kind") == "kill_switch_reset").item(0, "payload"))["by"]
    assert by.startswith("dagster run ")


def test_the_kill_switch_job_refuses_a_scope_that_is_no_strategy(live):
    resources, ledger = live
    config = {"action": "trip", "scope": f"{STRATEGY}p", "reason": "exchange maintenance"}
    result = kill_switch.execute_in_process(
        run_config={"ops": {"change_kill_switch": {"config": config}}},
        resources={"ledger": resources["ledger"]},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.cause.message
    assert f"unknown kill-switch scope '{STRATEGY}p' (did you mean '{STRATEGY}'?)" in message
    ledger.migrate()
    assert ledger.kill_switch_states().is_empty()


def audit_check(resources, instance) -> dg.AssetCheckEvaluation:
    result = dg.materialize([ledger_snapshot], resources=resources, instance=instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == AUDIT_CHECK
    return evaluation


def test_audit_check_fails_on_an_edited_or_deleted_event(live):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    for request in tick(instance, resources).run_requests:
        run(request, resources, instance)
    ledger.trip(STRATEGY, "test", "test")
    assert audit_check(resources, instance).passed

    engine = create_engine(resources["ledger"].url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET payload = '{}' WHERE seq = 1"))
    edited = audit_check(resources, instance)
    assert not edited.passed and "seq 1: hash mismatch" in edited.description

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 1"))
    deleted = audit_check(resources, instance)
    assert not deleted.passed and "seq 1: missing" in deleted.description
    engine.dispose()


def hold(ledger: Ledger, bar_ts: datetime) -> None:
    """A filled buy of the strategy on `bar_ts`: an order, a fill, a position, a balance."""
    fill_at = bar_ts + timedelta(minutes=1)
    ledger.migrate()
    ledger.record_decision(
        DecisionRecord(
            strategy=STRATEGY,
            symbol="BTC/USDT",
            timeframe="1m",
            bar_ts=bar_ts,
            entry_signal=True,
            exit_signal=False,
            action="buy",
            order=OrderRecord(side="buy", amount=0.01, price=60_000.0, status="filled"),
            fill=FillRecord(60_000.0, 0.01, 0.6, filled_at=fill_at, bar_ts=fill_at),
            position=Position(0.01, 60_000.0, 0.6, opened_at=fill_at),
            balance=Balance(cash=9_399.4, realised_pnl=0.0, fees=0.6, peak_equity=10_000.0),
        )
    )


LEDGER_EDITS = {
    "kill_switch": "UPDATE kill_switch SET tripped = false WHERE scope = 'btc_scalp'",
    "fills": "UPDATE fills SET price = price * 0.5",
    "balances": "UPDATE balances SET cash = cash + 100000",
    "positions": "UPDATE positions SET amount = amount * 2",
}


@pytest.mark.parametrize("table", LEDGER_EDITS)
def test_an_edited_ledger_table_fails_the_audit_check_and_blocks_the_next_bar(live, table):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    (request,) = tick(instance, resources).run_requests
    newest = datetime.fromisoformat(request.tags["candlestack/bar_open"])
    hold(ledger, newest - timedelta(minutes=3))
    if table == "kill_switch":
        ledger.trip(STRATEGY, "exchange maintenance", "operator")
    assert audit_check(resources, instance).passed

    engine = create_engine(resources["ledger"].url)
    with engine.begin() as conn:
        conn.execute(text(LEDGER_EDITS[table]))
    engine.dispose()
    evaluation = audit_check(resources, instance)
    assert not evaluation.passed
    assert evaluation.description.startswith(f"{table} row "), evaluation.description
    assert "edited outside the ledger" in evaluation.description
    assert ledger.tripped(STRATEGY).startswith(f"ledger verification failed: {table} row ")

    result = run(request, resources, instance)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["kill_switch"].value.startswith("TRIPPED: ledger verification failed")
    assert ledger.orders(STRATEGY).height == 1  # the seeded buy alone
    assert ledger.decisions(STRATEGY).get_column("bar_ts").max() == newest


def test_the_dry_run_refuses_a_ledger_it_cannot_verify(live):
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    (request,) = tick(instance, resources).run_requests
    newest = datetime.fromisoformat(request.tags["candlestack/bar_open"])
    hold(ledger, newest - timedelta(minutes=3))
    engine = create_engine(resources["ledger"].url)
    with engine.begin() as conn:
        conn.execute(text(LEDGER_EDITS["balances"]))
    engine.dispose()

    # No audit check ran: the dry-run verifies the ledger before it reads a balance.
    run(request, resources, instance)
    reason = ledger.tripped(STRATEGY)
    assert reason.startswith("ledger verification failed: balances row strategy=btc_scalp")
    trips = ledger.kill_switch_states().filter(pl.col("tripped"))
    assert trips.select("scope", "changed_by").rows() == [("*", "dry-run")]
    assert ledger.orders(STRATEGY).height == 1


def test_drift_check_passes_on_identical_inputs(live):
    resources, _ = live
    instance = dg.DagsterInstance.ephemeral()
    first = tick(instance, resources)
    newest = datetime.fromisoformat(json.loads(first.cursor)[STRATEGY])
    behind = json.dumps({STRATEGY: (newest - timedelta(minutes=30)).isoformat()})
    for request in tick(instance, resources, behind).run_requests:
        run(request, resources, instance)
    key = dg.AssetKey(f"dryrun_{STRATEGY}")
    check = next(c for c in drift_checks if any(k.asset_key == key for k in c.check_keys))
    result = dg.materialize(
        [asset(STRATEGY), check],
        selection=dg.AssetSelection.checks(check),
        resources=resources,
        instance=instance,
    )
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == DRIFT_CHECK
    assert evaluation.passed, evaluation.description
    assert evaluation.metadata["bars_compared"].value == 30
    assert evaluation.metadata["signal_agreement"].value == 1.0
    # The figures are observed on the asset as well, so the UI plots drift over time.
    (observation,) = result.asset_observations_for_node(check.node_def.name)
    assert observation.metadata["drift_pnl_diff"].value == pytest.approx(0.0, abs=1e-9)


def history(ledger: Ledger, newest: datetime, bars: int) -> None:
    """`bars` decided bars before `newest`, the way the dry-run leaves them: a filled buy and
    a filled sell every 40 bars, a rejected buy, a blocked one and a skipped entry among
    them, each with its compute time and its fill two seconds after the close."""
    ledger.migrate()
    cash = 10_000.0
    flat = Balance(cash=cash, realised_pnl=0.0, fees=0.0, peak_equity=cash)
    for n in range(bars):
        bar_ts = newest - (bars - n) * timedelta(minutes=1)
        fill_at = bar_ts + timedelta(minutes=1)
        common = {
            "strategy": STRATEGY,
            "symbol": "BTC/USDT",
            "timeframe": "1m",
            "bar_ts": bar_ts,
            "entry_signal": False,
            "exit_signal": False,
            "action": "none",
            "balance": flat,
            "compute_ms": 1.0 + n % 7,
            "decided_at": fill_at + timedelta(seconds=2 + n % 3),
        }
        step = n % 40
        position = Position(0.01, 60_000.0, 0.6, opened_at=bar_ts) if 0 < step < 10 else None
        if step == 0:
            record = DecisionRecord(
                **common | {"action": "buy", "entry_signal": True},
                order=OrderRecord("buy", 0.01, 60_000.0, "filled"),
                fill=FillRecord(60_000.0, 0.01, 0.6, filled_at=fill_at, bar_ts=fill_at),
                position=Position(0.01, 60_000.0, 0.6, opened_at=fill_at),
            )
        elif step == 10:
            record = DecisionRecord(
                **common | {"action": "sell", "exit_signal": True},
                order=OrderRecord("sell", 0.01, 60_000.0, "filled", reason="exit signal"),
                fill=FillRecord(60_000.0, 0.01, 0.6, filled_at=fill_at, bar_ts=fill_at),
            )
        elif step == 20:
            reason = "amount under the minimum"
            order = OrderRecord("buy", 0.0001, 60_000.0, "rejected", reason)
            record = DecisionRecord(**common | {"action": "buy"}, order=order)
        elif step == 25:
            record = DecisionRecord(**common | {"action": "blocked", "note": "buy not sent: x"})
        elif step == 30:
            record = DecisionRecord(**common | {"note": "entry skipped: imputed minutes"})
        else:
            record = DecisionRecord(**common, position=position)
        assert ledger.record_decision(record)


def test_a_step_reads_a_bounded_window_of_a_long_history(live, monkeypatch):
    """With more decisions than LATENCY_WINDOW in the ledger, the step fetches no frame
    longer than that and no full verification runs, and its session counts and latency
    figures still equal those over the whole history."""
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    (request,) = tick(instance, resources).run_requests
    newest = datetime.fromisoformat(request.tags["candlestack/bar_open"])
    bars = LATENCY_WINDOW + 140
    if newest - bars * timedelta(minutes=1) < datetime.combine(
        newest.date() - timedelta(days=1), datetime.min.time(), UTC
    ):
        pytest.skip("the history would start before the lake's first day")
    history(ledger, newest, bars)
    assert audit_check(resources, instance).passed  # the periodic full verification

    fetched: list[int] = []
    full: list[bool] = []
    frame, verify = Ledger._frame, Ledger.verify_audit_chain

    def counting_frame(self, query, schema):
        result = frame(self, query, schema)
        fetched.append(result.height)
        return result

    def counting_verify(self, *args, **kwargs):
        full.append(True)
        return verify(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Ledger, "_frame", counting_frame)
        patch.setattr(Ledger, "verify_audit_chain", counting_verify)
        result = run(request, resources, instance)
    assert result.success
    assert max(fetched) <= LATENCY_WINDOW, fetched
    assert not full
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["ledger_verification"].value == "since the checkpoint"
    assert metadata["ledger_events_verified"].value <= 3

    decisions, orders = ledger.decisions(STRATEGY), ledger.orders(STRATEGY)
    assert decisions.height == bars + 1
    counts = session_summary(decisions, orders)
    assert counts["blocked"] > 0 and counts["skipped_entries"] > 0 and counts["rejected"] > 0
    for name, value in counts.items():
        assert metadata[f"session_{name}"].value == value, name
    for name, value in latency_stats(decisions, "1m").items():
        assert metadata[name].value == pytest.approx(value), name
    # The SLO figure covers the whole step, of which the decision's arithmetic is a part.
    assert metadata["step_ms"].value >= metadata["decision_compute_ms"].value
    assert metadata["close_to_commit_s"].value >= metadata["close_to_fill_s"].value


def test_a_recent_fill_edited_between_two_bars_blocks_the_next_one(live):
    """No audit check between the bars: the per-bar verification, reading only the events
    since its checkpoint, finds the edited fill and trips every strategy."""
    resources, ledger = live
    instance = dg.DagsterInstance.ephemeral()
    first = tick(instance, resources)
    newest = datetime.fromisoformat(json.loads(first.cursor)[STRATEGY])
    behind = json.dumps({STRATEGY: (newest - timedelta(minutes=3)).isoformat()})
    earlier, later, _ = tick(instance, resources, behind).run_requests
    assert run(earlier, resources, instance).success  # verified: the checkpoint is set
    hold(ledger, newest - timedelta(minutes=6))
    # The earlier bar may have traded too, depending on the synthetic minutes of the hour.
    orders_before = ledger.orders(STRATEGY).height
    engine = create_engine(resources["ledger"].url)
    with engine.begin() as conn:
        conn.execute(text(LEDGER_EDITS["fills"]))
    engine.dispose()

    result = run(later, resources, instance)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["ledger_verification"].value == "since the checkpoint"
    assert metadata["kill_switch"].value.startswith(
        "TRIPPED: ledger verification failed: fills row id=1: edited outside the ledger"
    )
    assert ledger.orders(STRATEGY).height == orders_before  # the tripped bar placed none
