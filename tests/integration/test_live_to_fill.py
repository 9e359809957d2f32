"""End to end on the wall clock: a candle streamed by the live collector closes, the real
dagster-daemon's dry_run_bars sensor launches the dry-run run for the bar, and the run fills
on paper at the next minute's open as the stream showed it, into the ledger with its audit
event. No REST schedule runs: the candles came through the collector only."""

import json
import time
from datetime import timedelta

import dagster as dg
import polars as pl
import pytest

from candlestack.ledger import AUDIT_DECISION, Ledger, decision_key
from tests.integration.live_stack import live_stack, recorded_open, tail

TIMEOUT_S = 420  # a 2/5 EMA cross on 1m bars trades within a few minutes
SLIPPAGE = 0.0005  # the strategy's default, buys up and sells down


def test_a_streamed_close_is_filled_on_paper_by_the_sensor_s_run(tmp_path, monkeypatch):
    with live_stack(tmp_path) as stack:
        ledger = Ledger(stack.ledger_url)
        deadline = time.monotonic() + TIMEOUT_S
        while ledger.fills("btc_scalp").is_empty():
            if time.monotonic() > deadline or stack.collector.poll() is not None:
                pytest.fail(
                    f"no fill within {TIMEOUT_S} s; collector:\n{tail(tmp_path / 'live.log')}"
                )
            time.sleep(2)
        rest_requests = stack.rest.requests_to()

    fill = ledger.fills("btc_scalp").row(0, named=True)
    order = ledger.orders("btc_scalp").filter(pl.col("id") == fill["order_id"])
    decision = ledger.decisions("btc_scalp").filter(pl.col("key") == order["decision_key"][0])
    assert decision.height == 1
    bar_ts = decision["bar_ts"][0]
    # At the open of the minute after the bar (plus slippage and the price tick), as the
    # stream showed it: the run asked REST for no minute's open.
    assert fill["bar_ts"] == bar_ts + timedelta(minutes=1)
    open_ = recorded_open(stack, fill["bar_ts"])
    assert abs(fill["price"] / open_ - 1) <= SLIPPAGE + 1e-4
    assert not [q for q in rest_requests if q.get("limit") == "1"]

    # Decided by the sensor's run for that bar, audited, on an intact chain.
    monkeypatch.setenv("DAGSTER_HOME", stack.env["DAGSTER_HOME"])
    run = dg.DagsterInstance.get().get_run_by_id(decision["run_id"][0])
    assert run is not None and run.job_name == "dry_run"
    assert run.tags["candlestack/bar_open"] == bar_ts.isoformat()
    key = decision_key("btc_scalp", "BTC/USDT", "1m", bar_ts)
    audited = [
        json.loads(payload)
        for payload in ledger.audit_events(kinds=[AUDIT_DECISION])["payload"]
        if json.loads(payload)["key"] == key
    ]
    assert len(audited) == 1 and audited[0]["fill"]["price"] == fill["price"]
    assert ledger.verify_audit_chain() == []
    # Seconds from the close to the fill, not the REST path's 17-19.
    latency = (decision["decided_at"][0] - fill["bar_ts"]).total_seconds()
    print(f"\nclose of the {bar_ts:%H:%M} bar to its fill: {latency:.1f} s")
    assert latency < 30
