"""Alert payloads, delivery order and cursors, secrets kept out, and the alert settings."""

import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from candlestack.alerts import (
    Alert,
    AlertDeliveryError,
    Mark,
    Pending,
    Target,
    deliver,
    post,
    slack_payload,
    webhook_payload,
)
from candlestack.config import Settings
from candlestack.errors import ConfigError

AT = datetime(2026, 3, 4, 12, 31, 5, tzinfo=UTC)
TOKEN_PATH = "/services/T0/B0/the-token"


def alert(n: int, message: str = "run of ingest failed") -> Alert:
    return Alert(
        id=f"run:{n}:0",
        kind="run_failure",
        message=message,
        at=AT,
        job="ingest",
        run_id=f"r{n}",
        partition="2026-03-04|BTC-USDT",
        url=f"http://ui/runs/r{n}",
    )


def test_webhook_and_slack_payloads_say_what_where_and_when():
    assert webhook_payload(alert(1)) == {
        "id": "run:1:0",
        "kind": "run_failure",
        "message": "run of ingest failed",
        "at": "2026-03-04T12:31:05+00:00",
        "where": {"partition": "2026-03-04|BTC-USDT", "job": "ingest", "run_id": "r1"},
        "url": "http://ui/runs/r1",
        "details": {},
    }
    assert slack_payload(alert(1)) == {
        "text": "*candlestack run failure*: run of ingest failed\n"
        "where: partition `2026-03-04|BTC-USDT`, job `ingest`, run_id `r1`\n"
        "when: 2026-03-04T12:31:05+00:00\n"
        "<http://ui/runs/r1|open in Dagster>"
    }


def test_each_target_gets_each_alert_once_in_order_and_resumes_after_a_failure():
    posted: list[tuple[str, str]] = []
    refuse = {("slack", "run:2:0")}

    def send(target, payload, timeout):
        # Slack's payload is text only: the message names the alert.
        alert_id = payload.get("id") or re.search(r"run:\d+:0", payload["text"]).group()
        if (target.name, alert_id) in refuse:
            raise AlertDeliveryError(f"{target.shown}: HTTP 500")
        posted.append((target.name, alert_id))

    targets = [Target("webhook", "http://h/hook"), Target("slack", "http://s/x", "slack")]
    pending = [Pending((n, 0), alert(n, f"alert run:{n}:0")) for n in (3, 2, 1)]
    marks = {"webhook": Mark(0), "slack": Mark(0)}
    first = deliver(pending, 5, targets, marks, timeout=1, send=send)
    # The webhook took all three in order and moved past the events read; Slack stopped at 2.
    assert [k for k in posted if k[0] == "webhook"] == [
        ("webhook", f"run:{n}:0") for n in (1, 2, 3)
    ]
    assert first.marks == {"webhook": Mark(5), "slack": Mark(1, 1)}
    assert first.sent == {"webhook": 3, "slack": 1}
    assert first.errors == [
        "alert run:2:0 not delivered to slack (http://s): HTTP 500; retried next time"
    ]

    refuse.clear()
    posted.clear()
    second = deliver(pending, 5, targets, first.marks, timeout=1, send=send)
    assert second.sent == {"webhook": 0, "slack": 2}
    assert posted == [("slack", "run:2:0"), ("slack", "run:3:0")]
    assert second.marks == {"webhook": Mark(5), "slack": Mark(5)}


def test_secrets_are_masked_in_every_payload():
    seen = []
    leaky = alert(1, "ccxt said: invalid key sk-LIVE-123 for binance")
    deliver(
        [Pending((1, 0), leaky)],
        1,
        [Target("webhook", "http://h/hook"), Target("slack", "http://s/x", "slack")],
        {"webhook": Mark(0), "slack": Mark(0)},
        timeout=1,
        secrets=["sk-LIVE-123", ""],
        send=lambda target, payload, timeout: seen.append(payload),
    )
    assert seen[0]["message"] == "ccxt said: invalid key *** for binance"
    assert "sk-LIVE-123" not in seen[1]["text"] and "invalid key ***" in seen[1]["text"]


def test_a_secret_holding_another_is_masked_whole():
    proxy = "http://trader:proxy-pw@10.0.0.7:3128"
    seen = []
    deliver(
        [Pending((1, 0), alert(1, f"no answer through {proxy} (user trader, proxy-pw)"))],
        1,
        [Target("webhook", "http://h/hook")],
        {"webhook": Mark(0)},
        timeout=1,
        secrets=["proxy-pw", proxy],
        send=lambda target, payload, timeout: seen.append(payload),
    )
    assert seen[0]["message"] == "no answer through *** (user trader, ***)"


@pytest.fixture
def refusing_server():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_failed_post_names_the_target_but_never_the_token_in_its_url(refusing_server):
    with pytest.raises(AlertDeliveryError) as refused:
        post(Target("slack", refusing_server + TOKEN_PATH, "slack"), {"text": "x"}, 5)
    assert str(refused.value) == f"slack ({refusing_server}): HTTP 500"
    # Nothing listens on port 9 of loopback: requests' own message would quote the URL.
    with pytest.raises(AlertDeliveryError) as unreachable:
        post(Target("slack", "http://127.0.0.1:9" + TOKEN_PATH, "slack"), {"text": "x"}, 5)
    assert str(unreachable.value) == "slack (http://127.0.0.1:9): ConnectionError"
    # Nor the credentials of a URL's userinfo.
    basic_auth = Target("webhook", "https://candlestack:hook-pw@alerts.example:8443/hook")
    assert basic_auth.shown == "webhook (https://alerts.example:8443)"


def test_alert_settings_are_urls_and_errors_do_not_quote_them():
    settings = Settings.from_env(
        {
            "CANDLESTACK_SLACK_WEBHOOK_URL": "https://hooks.slack.com" + TOKEN_PATH,
            "CANDLESTACK_UI_URL": "http://dagster.internal:3000/",
        }
    )
    assert settings.alerts_configured and settings.ui_url == "http://dagster.internal:3000"
    assert not Settings.from_env({}).alerts_configured
    with pytest.raises(ConfigError) as bad:
        Settings.from_env({"CANDLESTACK_ALERT_WEBHOOK_URL": "hooks.example" + TOKEN_PATH})
    assert "CANDLESTACK_ALERT_WEBHOOK_URL: Value error, must be an http" in str(bad.value)
    assert "the-token" not in str(bad.value)
