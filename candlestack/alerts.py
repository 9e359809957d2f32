"""Alerts: what happened, where and when, posted to a webhook (generic JSON) and to Slack.

Sources (pipelines/alerts.py) turn events into `Pending` alerts, each at a position that
only grows: (storage id or audit seq, index within that event). `deliver` posts them in
order to every target and moves that target's cursor past each alert it accepted. A target
that fails keeps its cursor where it is, so the alert is posted again on the next
evaluation, and the targets that accepted it are not posted twice.

Payloads never carry secrets: the webhook URLs are credentials themselves (Slack's path is
its token), so errors name the scheme and host only, and any secret value handed to
`deliver` is masked in every text of a payload.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import polars as pl

from candlestack.errors import CandlestackError

RUN_FAILURE = "run_failure"
CHECK_FAILURE = "check_failure"
STALE_DATA = "stale_data"
DRIFT = "drift"
KILL_SWITCH = "kill_switch"
LIVE_FEED = "live_feed"  # the live collector reconnecting over and over
KINDS = (RUN_FAILURE, CHECK_FAILURE, STALE_DATA, DRIFT, KILL_SWITCH, LIVE_FEED)

# How the dry-run words a kill-switch trip for stale data (candlestack.dryrun).
STALE_REASON = "stale data"
MASK = "***"
# Slack cuts a message at 40,000 characters; a webhook receiver should not need more either.
MAX_TEXT = 3_000


class AlertDeliveryError(CandlestackError):
    """A target did not accept an alert; it is posted again on the next evaluation."""


@dataclass(frozen=True)
class Alert:
    """One alert. `id` is stable, so a receiver may deduplicate on it too."""

    id: str
    kind: str
    message: str
    at: datetime  # when it happened
    asset: str | None = None
    check: str | None = None
    partition: str | None = None
    strategy: str | None = None
    symbol: str | None = None
    scope: str | None = None  # kill-switch scope: a strategy or "*"
    job: str | None = None
    run_id: str | None = None
    url: str | None = None  # the Dagster UI page to open, when its base URL is configured
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"alert kind must be one of {KINDS}, not {self.kind!r}")
        if self.at.tzinfo is None:
            raise ValueError(f"alert {self.id}: time must be timezone-aware, got {self.at!r}")

    @property
    def where(self) -> dict[str, str]:
        names = ("asset", "check", "partition", "strategy", "symbol", "scope", "job", "run_id")
        return {name: value for name in names if (value := getattr(self, name)) is not None}


def webhook_payload(alert: Alert) -> dict[str, Any]:
    """The generic JSON body: {id, kind, message, at, where: {...}, url, details}."""
    return {
        "id": alert.id,
        "kind": alert.kind,
        "message": alert.message,
        "at": alert.at.astimezone(UTC).isoformat(),
        "where": alert.where,
        "url": alert.url,
        "details": dict(alert.details),
    }


def slack_payload(alert: Alert) -> dict[str, str]:
    """Slack's incoming-webhook body: {"text": ...} in its mrkdwn."""
    where = ", ".join(f"{name} `{value}`" for name, value in alert.where.items())
    lines = [
        f"*candlestack {alert.kind.replace('_', ' ')}*: {alert.message}",
        f"where: {where}" if where else None,
        f"when: {alert.at.astimezone(UTC).isoformat()}",
        f"<{alert.url}|open in Dagster>" if alert.url else None,
    ]
    return {"text": clip("\n".join(line for line in lines if line))}


FORMATS: dict[str, Callable[[Alert], dict[str, Any]]] = {
    "json": webhook_payload,
    "slack": slack_payload,
}


@dataclass(frozen=True)
class Target:
    """Where alerts go: a name (the cursor's key), a URL and a payload format."""

    name: str
    url: str
    format: Literal["json", "slack"] = "json"

    @property
    def shown(self) -> str:
        """The URL without userinfo, path or query, which may hold a password or token."""
        parts = urlsplit(self.url)
        return f"{self.name} ({parts.scheme}://{parts.netloc.rpartition('@')[2]})"


Position = tuple[int, int]


@dataclass(frozen=True)
class Pending:
    position: Position  # (event storage id or audit seq, index of the alert in that event)
    alert: Alert


@dataclass(frozen=True)
class Mark:
    """How far a target got: every alert of events before `event` was delivered, and the
    first `sent` alerts of `event` (None: all of them)."""

    event: int
    sent: int | None = None

    def covers(self, position: Position) -> bool:
        event, index = position
        return event < self.event or (
            event == self.event and (self.sent is None or index < self.sent)
        )

    def to_json(self) -> list[int | None]:
        return [self.event, self.sent]

    @classmethod
    def from_json(cls, value: list[int | None]) -> Mark:
        return cls(int(value[0]), value[1])


@dataclass
class Delivery:
    marks: dict[str, Mark]
    sent: dict[str, int]
    errors: list[str]


def post(target: Target, payload: Mapping[str, Any], timeout: float) -> None:
    """POST one payload as JSON; raises AlertDeliveryError naming the target, never its
    full URL (requests' own messages carry it, so they are not passed on)."""
    # Imported here: ~0.1 s that every run worker loading the code location would pay, and
    # only the alert sensors post.
    import requests

    try:
        response = requests.post(target.url, json=payload, timeout=timeout)
    except requests.RequestException as exc:
        raise AlertDeliveryError(f"{target.shown}: {type(exc).__name__}") from None
    if not response.ok:
        raise AlertDeliveryError(f"{target.shown}: HTTP {response.status_code}")


def mask(value: Any, secrets: Sequence[str]) -> Any:
    """`value` with every secret replaced by MASK in each of its texts."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {key: mask(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mask(item, secrets) for item in value]
    return value


def deliver(
    pending: Sequence[Pending],
    scanned: int,
    targets: Sequence[Target],
    marks: Mapping[str, Mark],
    *,
    timeout: float,
    secrets: Sequence[str] = (),
    send: Callable[[Target, Mapping[str, Any], float], None] = post,
) -> Delivery:
    """Post each pending alert, in position order, to every target whose mark does not
    cover it yet. A target stops at its first failure; one that delivered everything moves
    past `scanned`, the newest event looked at, so events without alerts are not read again.
    """
    # Longest first: a secret holding another (a URL and its password) is masked whole.
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
    new_marks, sent, errors = dict(marks), {t.name: 0 for t in targets}, []
    for target in targets:
        mark = new_marks[target.name]
        failed = False
        for item in sorted(pending, key=lambda p: p.position):
            if mark.covers(item.position):
                continue
            payload = mask(FORMATS[target.format](item.alert), secrets)
            try:
                send(target, payload, timeout)
            except AlertDeliveryError as exc:
                errors.append(f"alert {item.alert.id} not delivered to {exc}; retried next time")
                failed = True
                break
            event, index = item.position
            mark = Mark(event, index + 1)
            sent[target.name] += 1
        if not failed and scanned >= mark.event:
            mark = Mark(scanned)
        new_marks[target.name] = mark
    return Delivery(new_marks, sent, errors)


def kill_switch_alerts(
    trips: pl.DataFrame, symbols: Mapping[str, str], ui_url: str | None
) -> list[Pending]:
    """One alert per kill-switch trip in the ledger's audit events (ledger.AUDIT rows of
    kind kill_switch_trip), at position (seq, 0). A trip for stale data is a stale-data
    alert; `symbols` maps strategy names to their symbols."""
    pending = []
    for row in trips.iter_rows(named=True):
        payload = json.loads(row["payload"])
        scope, reason, by = payload["scope"], payload["reason"], payload["by"]
        strategy = row["strategy"]
        page = f"dryrun_{strategy}" if strategy else "ledger"
        alert = Alert(
            id=f"ledger:{row['seq']}",
            kind=STALE_DATA if reason.startswith(STALE_REASON) else KILL_SWITCH,
            message=f"kill switch tripped for {scope} by {by}: {reason}",
            at=row["ts"],
            asset=page,
            strategy=strategy,
            symbol=symbols.get(strategy) if strategy else None,
            scope=scope,
            url=f"{ui_url}/assets/{page}" if ui_url else None,
            details={"audit_seq": row["seq"], "reason": reason, "by": by},
        )
        pending.append(Pending((row["seq"], 0), alert))
    return pending


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
