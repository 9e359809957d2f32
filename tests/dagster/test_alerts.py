"""Alerts for real: runs that fail, a blocking check, stale data, drift and kill-switch trips
(dry-run, CLI and job) in a SQLite Dagster instance and ledger, evaluated by the alert
sensors with their cursors, posted to loopback HTTP receivers."""

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
from sqlalchemy import create_engine, text

from assets.dry_run import drift_checks, dry_run_assets, enabled_strategies
from assets.market_data import candles_1m, candles_freshness
from candlestack.config import Settings
from candlestack.dryrun import DryRun
from candlestack.ingest import Ingestor
from candlestack.lake import Lake, write_parquet_atomic
from candlestack.live import CollectorState, SymbolState
from candlestack.live_status import StatusRecorder
from candlestack.sources.synthetic import SyntheticSource
from pipelines.alerts import SYMBOLS, alert_kill_switch, alert_live_feed, alert_runs_and_checks
from pipelines.jobs import kill_switch
from pipelines.sensors import dry_run_bars, live_feed
from resources import (
    AlertResource,
    LakeResource,
    LedgerResource,
    ReplaySourceResource,
    SyntheticSourceResource,
    deployment,
)
from tests.conftest import EXCHANGE_INFO, REPLAY_FILES, isolated_env

STRATEGY = "btc_scalp"
UI = "http://dagster.example:3000"
SLACK_PATH = "/services/T000/B000/slack-token-must-stay-secret"


class Receiver:
    """A loopback HTTP endpoint that records every POST and answers with `statuses` in
    turn (then 200)."""

    def __init__(self, path: str = "/hook") -> None:
        self.path = path
        self.posts: list[tuple[int, dict]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.posts.append((status, body))
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"

    @property
    def accepted(self) -> list[dict]:
        return [body for status, body in self.posts if status == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    webhook, slack = Receiver(), Receiver(SLACK_PATH)
    yield webhook, slack
    webhook.close()
    slack.close()


@pytest.fixture
def instance(tmp_path):
    # SQLite storage sharded per run, as dagster.yaml configures it, not an in-memory one.
    home = tmp_path / "instance"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture
def live(tmp_path):
    """Yesterday's and today's closed BTC minutes and market rules, and resources there."""
    lake = Lake(tmp_path / "lake")
    source = SyntheticSource(seed=7, symbols=["BTC/USDT"])
    today = datetime.now(UTC).date()
    if datetime.now(UTC) - datetime.combine(today, datetime.min.time(), UTC) < timedelta(
        minutes=40
    ):
        pytest.skip("too close to midnight UTC for a session of today's bars")
    Ingestor(source, lake).ingest("BTC/USDT", [today - timedelta(days=1), today])
    for day in (today - timedelta(days=1), today):
        write_parquet_atomic(
            lake.markets_path("synthetic", day), source.load_markets().to_arrow(), {}
        )
    return {
        "source": SyntheticSourceResource(symbols=["BTC/USDT"]),
        "lake": LakeResource(
            root=str(lake.root),
            catalog_path=str(tmp_path / "c.duckdb"),
            reports_path=str(tmp_path / "reports"),
        ),
        "ledger": LedgerResource(url=f"sqlite:///{tmp_path / 'ledger.sqlite'}"),
    }


def alert_resource(receivers) -> AlertResource:
    webhook, slack = receivers
    return AlertResource(webhook_url=webhook.url, slack_webhook_url=slack.url, ui_url=UI)


def evaluate(sensor, instance, resources, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    assert not result.run_requests
    return result


def said(result: dg.SensorResult) -> str:
    return result.skip_reason.skip_message


def dry_run_asset() -> dg.AssetsDefinition:
    return next(a for a in dry_run_assets if a.key == dg.AssetKey(f"dryrun_{STRATEGY}"))


def assert_when(alert: dict, before: datetime) -> None:
    at = datetime.fromisoformat(alert["at"])
    assert at.utcoffset() == timedelta(0)
    assert before <= at <= datetime.now(UTC)


def test_failed_runs_and_checks_alert_once_each_and_a_refused_post_is_retried(
    live, receivers, instance, tmp_path
):
    webhook, slack = receivers
    resources = {"alerts": alert_resource(receivers)}
    strategy = dry_run_asset()
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(second=0, microsecond=0)

    def fail_a_dry_run() -> dg.ExecuteInProcessResult:
        # A bar of a day not in the lake yet: the dry-run raises, the run fails.
        return dg.materialize(
            [strategy],
            run_config={"ops": {strategy.op.name: {"config": {"bar_open": tomorrow.isoformat()}}}},
            resources=live,
            instance=instance,
            tags={"candlestack/strategy": STRATEGY},
            raise_on_error=False,
        )

    # History before the sensor's first tick is not alerted.
    assert not fail_a_dry_run().success
    first = evaluate(alert_runs_and_checks, instance, resources, None)
    assert "started at the newest event" in said(first)
    assert not webhook.posts and not slack.posts
    started = datetime.now(UTC)

    failed_run = fail_a_dry_run()
    # A check that really fails (ERROR severity): Binance's 284-minute maintenance on
    # 2021-04-25. It blocks that day's bars, not the run: the month's other days build.
    replay = {
        "source": ReplaySourceResource(
            files={s: str(p) for s, p in REPLAY_FILES.items()}, markets_file=str(EXCHANGE_INFO)
        ),
        "lake": LakeResource(root=str(tmp_path / "replay_lake")),
    }
    blocked = dg.materialize(
        [candles_1m], partition_key="2021-04-01|BTC-USDT", resources=replay, instance=instance
    )
    # Stale data: the freshness check finds no candle of today for ETH and SOL.
    stale = dg.materialize(
        [candles_1m, candles_freshness],
        selection=dg.AssetSelection.checks(candles_freshness),
        resources=live,
        instance=instance,
    )
    # Drift: 30 bars paper-traded, then the ledger's signals no longer match the backtest's.
    cursor = dry_run_bars(dg.build_sensor_context(instance=instance, resources=live)).cursor
    newest = datetime.fromisoformat(json.loads(cursor)[STRATEGY])
    behind = json.dumps({STRATEGY: (newest - timedelta(minutes=30)).isoformat()})
    context = dg.build_sensor_context(instance=instance, cursor=behind, resources=live)
    for request in dry_run_bars(context).run_requests:
        dg.materialize([strategy], run_config=request.run_config, resources=live, instance=instance)
    engine = create_engine(live["ledger"].url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE decisions SET entry_signal = NOT entry_signal"))
    engine.dispose()
    drift_check = next(
        c for c in drift_checks if any(k.asset_key == strategy.key for k in c.check_keys)
    )
    drifted = dg.materialize(
        [strategy, drift_check],
        selection=dg.AssetSelection.checks(drift_check),
        resources=live,
        instance=instance,
    )
    assert not drifted.get_asset_check_evaluations()[0].passed

    # The webhook refuses its first post: Slack gets everything, the webhook nothing yet.
    webhook.statuses = [500]
    second = evaluate(alert_runs_and_checks, instance, resources, first.cursor)
    assert "HTTP 500" in said(second) and webhook.url.split("/hook")[0] in said(second)
    assert len(webhook.posts) == 1 and not webhook.accepted
    # The next tick delivers to the webhook what it refused, and nothing twice to Slack.
    third = evaluate(alert_runs_and_checks, instance, resources, second.cursor)
    assert "HTTP 500" not in said(third)
    fourth = evaluate(alert_runs_and_checks, instance, resources, third.cursor)
    assert said(fourth) == "nothing new"

    alerts = webhook.accepted
    assert len({a["id"] for a in alerts}) == len(alerts) == len(slack.accepted)
    assert webhook.posts[0][1] == alerts[0]  # the refused alert, posted again
    kinds = [(a["kind"], a["where"].get("check")) for a in alerts]
    assert kinds == [
        ("run_failure", None),  # the dry-run of a bar not closed yet
        ("check_failure", "gaps"),
        ("stale_data", "freshness"),
        ("drift", "drift"),
    ]
    for alert in alerts:
        assert alert["url"] == f"{UI}/runs/{alert['where']['run_id']}"
        assert_when(alert, started)

    dry_run_failure, gaps, freshness, drift = alerts
    assert dry_run_failure["where"] == {
        "job": "__ephemeral_asset_job__",
        "run_id": failed_run.run_id,
        "asset": f"dryrun_{STRATEGY}",
        "strategy": STRATEGY,
        "symbol": "BTC/USDT",
    }
    assert dry_run_failure["message"] == (
        f"run of __ephemeral_asset_job__ failed: dryrun_{STRATEGY}: candlestack.errors."
        f"LakeError: strategy '{STRATEGY}': no 1m bars of BTC/USDT between {tomorrow.date()} "
        f"and {tomorrow.date() + timedelta(days=1)} (stored: "
        f"{tomorrow.date() - timedelta(days=2)} to {tomorrow.date() - timedelta(days=1)})"
    )
    assert gaps["where"] == {
        "job": "__ephemeral_asset_job__",
        "asset": "candles_1m",
        "check": "gaps",
        "partition": "2021-04-01|BTC-USDT",
        "run_id": blocked.run_id,
    }
    assert gaps["message"].startswith("check gaps on candles_1m failed (error)")
    assert gaps["details"]["days_failed"] == 1
    assert "2021-04-25" in gaps["details"]["failures"]
    assert freshness["where"]["run_id"] == stale.run_id
    assert freshness["details"]["stale_symbols"] == 2
    assert drift["where"]["strategy"] == STRATEGY and drift["where"]["symbol"] == "BTC/USDT"
    assert drift["where"]["run_id"] == drifted.run_id
    assert "signal agreement" in drift["message"]
    assert drift["details"]["signal_agreement"] == 0.0

    # Slack gets its own shape: one mrkdwn text with what, where, when and the link.
    first_slack = slack.accepted[0]
    assert list(first_slack) == ["text"]
    assert first_slack["text"].startswith("*candlestack run failure*: run of ")
    assert f"run_id `{failed_run.run_id}`" in first_slack["text"]
    assert f"when: {dry_run_failure['at']}" in first_slack["text"]
    assert f"<{UI}/runs/{failed_run.run_id}|open in Dagster>" in first_slack["text"]
    assert all(SLACK_PATH not in json.dumps(body) for _, body in webhook.posts + slack.posts)


def test_every_kill_switch_trip_alerts_once_and_a_partial_delivery_resumes(
    live, receivers, instance, tmp_path
):
    webhook, slack = receivers
    resources = {"alerts": alert_resource(receivers), "ledger": live["ledger"]}
    first = evaluate(alert_kill_switch, instance, resources, None)
    assert not webhook.posts
    started = datetime.now(UTC)
    book = live["ledger"].open()

    # Stale data: the dry-run decides the newest bar an hour after it closed.
    scalp = next(c for c in enabled_strategies if c.name == STRATEGY)
    cursor = dry_run_bars(dg.build_sensor_context(instance=instance, resources=live)).cursor
    newest = datetime.fromisoformat(json.loads(cursor)[STRATEGY])
    source = live["source"].open()
    late = DryRun(
        scalp, live["lake"].lake, source.exchange, source, book, clock=lambda: time.time() + 3600
    )
    late.run(newest)
    assert book.tripped(STRATEGY).startswith("stale data")

    # By hand, from the shell and from the kill_switch job.
    env = isolated_env(tmp_path, ledger_url=live["ledger"].url)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "candlestack.kill_switch",
            "trip",
            "--scope",
            "btc_ma_cross",
            "--reason",
            "exchange maintenance",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    job = kill_switch.execute_in_process(
        run_config={
            "ops": {
                "change_kill_switch": {
                    "config": {"action": "trip", "scope": "*", "reason": "all stop"}
                }
            }
        },
        resources={"ledger": live["ledger"]},
        instance=instance,
    )

    # Slack takes the first trip and refuses the second: it resumes from there.
    slack.statuses = [200, 500]
    second = evaluate(alert_kill_switch, instance, resources, first.cursor)
    assert len(slack.accepted) == 1 and len(webhook.accepted) == 3
    third = evaluate(alert_kill_switch, instance, resources, second.cursor)
    assert said(evaluate(alert_kill_switch, instance, resources, third.cursor)) == "nothing new"
    stale, cli, manual = webhook.accepted
    assert len({a["id"] for a in webhook.accepted}) == 3
    assert len(slack.accepted) == 3  # the refused one once more, none twice
    assert [s["text"].split(":")[0] for s in slack.accepted] == [
        "*candlestack stale data*",
        "*candlestack kill switch*",
        "*candlestack kill switch*",
    ]

    assert stale["kind"] == "stale_data"
    assert stale["message"].startswith(f"kill switch tripped for {STRATEGY} by dry-run: stale")
    assert stale["where"] == {
        "asset": f"dryrun_{STRATEGY}",
        "strategy": STRATEGY,
        "symbol": SYMBOLS[STRATEGY],
        "scope": STRATEGY,
    }
    assert stale["url"] == f"{UI}/assets/dryrun_{STRATEGY}"
    assert cli["kind"] == "kill_switch"
    assert cli["where"]["scope"] == "btc_ma_cross" and cli["where"]["symbol"] == "BTC/USDT"
    assert cli["details"]["by"].startswith("cli:")
    assert cli["details"]["reason"] == "exchange maintenance"
    assert manual["where"] == {"asset": "ledger", "scope": "*"}
    assert manual["details"]["by"] == f"dagster run {job.run_id}"
    assert manual["message"] == f"kill switch tripped for * by dagster run {job.run_id}: all stop"
    for alert in webhook.accepted:
        assert_when(alert, started)


def test_a_delayed_live_buffer_and_a_reconnect_storm_alert_once_each(
    tmp_path, instance, receivers, monkeypatch
):
    """The live_feed sensor reads the collector's status file; each episode it records on
    candles_1m is posted once by alert_live_feed (the daemon stores a sensor's observations:
    here they are reported to the instance as it would)."""
    status_path = tmp_path / "live" / "status.json"
    settings = Settings(live_status=status_path, live_reconnect_storm=3)
    monkeypatch.setattr(deployment, "settings", settings)
    webhook, slack = receivers
    alerts = alert_resource(receivers)

    def tick(cursor):
        result = live_feed(dg.build_sensor_context(instance=instance, cursor=cursor))
        for observation in result.asset_events:
            instance.report_runless_asset_event(observation)
        return result

    def episodes(result) -> dict[str, dg.AssetObservation]:
        events = [e for e in result.asset_events if "live_event" in e.metadata]
        return {e.metadata["live_event"].value: e for e in events}

    result = tick(None)
    assert "no live collector status" in said(result) and not result.asset_events

    recorder = StatusRecorder(status_path)
    btc, eth = SymbolState("BTC/USDT"), SymbolState("ETH/USDT")
    state = CollectorState({"BTC/USDT": btc, "ETH/USDT": eth}, connected=True)
    minute_ms = 60_000
    now_minute = int(time.time() * 1000) // minute_ms * minute_ms
    btc.newest_closed_ts = eth.newest_closed_ts = now_minute - minute_ms
    recorder.write(state)
    result = tick(None)
    (feed,) = result.asset_events  # the feed's state, no episode
    assert feed.metadata["live_collector_up"].value is True
    assert "BTC/USDT" in feed.metadata["live_symbols"].value
    alert_cursor = evaluate(alert_live_feed, instance, {"alerts": alerts}, None).cursor

    # BTC's stream stops delivering, and the connection flaps: both alerted, once.
    btc.newest_closed_ts = now_minute - 5 * minute_ms
    state.reconnects = 3
    recorder.write(state)
    result = tick(result.cursor)
    kinds = {
        e.metadata["live_event"].value: e
        for e in result.asset_events
        if e.metadata.get("live_event")
    }
    assert set(kinds) == {"delayed_buffer", "reconnect_storm"}
    assert kinds["delayed_buffer"].metadata["symbol"].value == "BTC/USDT"
    result = tick(result.cursor)  # the same episodes: nothing new
    assert episodes(result) == {}
    for _ in range(2):  # the second evaluation has nothing new to post
        alert_cursor = evaluate(alert_live_feed, instance, {"alerts": alerts}, alert_cursor).cursor
    posted = [(a["kind"], a["where"].get("symbol")) for a in webhook.accepted]
    assert sorted(posted) == [("live_feed", None), ("stale_data", "BTC/USDT")]
    (stale,) = [a for a in webhook.accepted if a["kind"] == "stale_data"]
    assert "BTC/USDT: newest streamed candle closed" in stale["message"]
    assert stale["url"] == f"{UI}/assets/candles_1m"
    assert len(slack.accepted) == 2

    # BTC catches up: recorded, not alerted.
    btc.newest_closed_ts = now_minute - minute_ms
    recorder.write(state)
    result = tick(result.cursor)
    assert set(episodes(result)) == {"buffer_recovered"}
    evaluate(alert_live_feed, instance, {"alerts": alerts}, alert_cursor)
    assert len(webhook.accepted) == 2
