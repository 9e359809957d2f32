"""What the ledger stores and how it hashes it: the records the dry-run hands over, the
audit chain's hashing and the names of its events."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# The prev_hash of the first audit event, and the chain head's hash when there is none.
GENESIS_HASH = "0" * 64
# The kill switch scope that stops every strategy.
GLOBAL_SCOPE = "*"

ACTIONS = ("none", "buy", "sell", "blocked")
SIDES = ("buy", "sell")
ORDER_STATUSES = ("filled", "rejected")

AUDIT_DECISION = "decision"
AUDIT_KILL_SWITCH_TRIP = "kill_switch_trip"
AUDIT_KILL_SWITCH_RESET = "kill_switch_reset"
AUDIT_STRATEGY_CONFIG = "strategy_config"
AUDIT_ERROR = "error"
# Binds the rows a ledger held before its state was audited (migration 0003); at most one,
# before any other bound state.
AUDIT_STATE_BASELINE = "state_baseline"
# The payload key of an event's state bindings: [[table, {pk column: value}, digest], ...],
# digest None for a deleted row.
STATE_KEY = "state"
# A bar a run did not decide (catch-up policy "latest"): action none, note starting so.
SKIPPED_PREFIX = "skipped:"
# The note of an entry the data policy skipped (the dry-run's; counted in decision_totals).
ENTRY_SKIPPED_PREFIX = "entry skipped"


# --- pure helpers ---------------------------------------------------------------------------


def require_utc(name: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value!r}")
    return value.astimezone(UTC)


# Built once: json.dumps with options builds an encoder per call, a third of verifying a row.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical_json(payload: Any) -> str:
    """The one text form of an audit payload: what is stored and what is hashed."""
    return _CANONICAL.encode(payload)


def iso_utc(ts: datetime) -> str:
    """A timestamp as hashed in the audit chain: UTC, always with microseconds."""
    return require_utc("ts", ts).isoformat(timespec="microseconds")


def chain_hash(
    prev_hash: str, seq: int, ts_iso: str, kind: str, strategy: str | None, payload: str
) -> str:
    """sha256 of one audit event, chained to the previous event's hash."""
    text_ = "|".join((prev_hash, str(seq), ts_iso, kind, strategy or "", payload))
    return hashlib.sha256(text_.encode()).hexdigest()


def _digest_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # Naive: SQLite's UTC text read without the ledger's UTCDateTime (a migration).
        return iso_utc(value if value.tzinfo else value.replace(tzinfo=UTC))
    return value


def row_digest(table: str, row: Mapping[str, Any]) -> str:
    """sha256 of one state row as the audit chain binds it. NULL columns are left out, so a
    nullable column added later leaves the digests of the rows before it unchanged."""
    body = {name: _digest_value(value) for name, value in row.items() if value is not None}
    return hashlib.sha256(canonical_json({"table": table, "row": body}).encode()).hexdigest()


def decision_key(strategy: str, symbol: str, timeframe: str, bar_ts: datetime) -> str:
    """ "strategy|symbol|timeframe|bar_open_iso": one bar of one strategy, executed once."""
    return f"{strategy}|{symbol}|{timeframe}|{require_utc('bar_ts', bar_ts).isoformat()}"


def client_order_id(key: str, side: str) -> str:
    """Deterministic, so a retried bar names the same order; 35 characters of [a-z0-9-]
    fit the strictest exchange limit we know (Binance: 36)."""
    return "cs-" + hashlib.sha256(f"{key}|{side}".encode()).hexdigest()[:32]


# --- what the dry-run hands over ------------------------------------------------------------


@dataclass(frozen=True)
class OrderRecord:
    """An order built for a bar: filled, or rejected with its reason (execution.py's texts).

    A filled sell carries its exit reason (execution.EXIT_REASONS) in `reason` too.
    """

    side: str
    amount: float
    price: float
    status: str
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"order side must be one of {SIDES}, not {self.side!r}")
        if self.status not in ORDER_STATUSES:
            raise ValueError(f"order status must be one of {ORDER_STATUSES}, not {self.status!r}")
        if self.status == "rejected" and not self.reason:
            raise ValueError("a rejected order needs its reason")


@dataclass(frozen=True)
class FillRecord:
    price: float
    amount: float
    fee: float
    filled_at: datetime
    bar_ts: datetime  # open time of the bar whose open price filled the order

    def __post_init__(self) -> None:
        require_utc("filled_at", self.filled_at)
        require_utc("bar_ts", self.bar_ts)


@dataclass(frozen=True)
class Position:
    amount: float
    entry_price: float
    entry_fee: float
    opened_at: datetime
    refused_exit: str | None = None  # an exit the exchange refused: retried on the next bar

    def __post_init__(self) -> None:
        require_utc("opened_at", self.opened_at)


@dataclass(frozen=True)
class Balance:
    cash: float
    realised_pnl: float
    fees: float
    peak_equity: float


@dataclass(frozen=True)
class AuditEvent:
    kind: str
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class SeenBar:
    """The closed bar as the dry-run saw it when it decided, and the next bar's open it
    filled at (None: no order), so the drift check can tell revised data from drift."""

    open: float
    high: float
    low: float
    close: float
    volume: float
    untradable: bool  # imputed or missing minutes (the backtest's data policy)
    fill_open: float | None = None


@dataclass(frozen=True)
class LedgerState:
    """What a strategy holds when its next bar is decided, read under the write lock."""

    position: Position | None
    balance: Balance | None
    tripped: str | None  # why the kill switch stops its orders; None: it may trade
    last_bar_ts: datetime | None  # the newest bar already decided for this symbol/timeframe


@dataclass(frozen=True)
class Verification:
    """What a verification of the ledger found and how much it read."""

    problems: list[str]
    head_seq: int
    head_hash: str
    full: bool  # every event and state row (verify_audit_chain), or a bounded window
    events: int = 0  # audit events hash-checked
    rows: int | None = None  # state rows compared (None: all of them)


@dataclass(frozen=True)
class DecisionRecord:
    """Everything one executed bar leaves behind, written in one transaction.

    `position` is the position after the bar (None: flat) and `balance` the balance after
    it. The ledger audits the record itself (kind "decision"); `events` are appended after
    it, in order, with the record's strategy.
    """

    strategy: str
    symbol: str
    timeframe: str
    bar_ts: datetime  # open time of the closed bar the strategy decided on
    entry_signal: bool
    exit_signal: bool
    action: str  # none | buy | sell | blocked (the kill switch stopped an order)
    balance: Balance
    position: Position | None = None
    order: OrderRecord | None = None
    fill: FillRecord | None = None
    note: str | None = None
    events: tuple[AuditEvent, ...] = ()
    decided_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seen: SeenBar | None = None
    compute_ms: float | None = None  # the decision step alone: features, signals, order
    run_id: str | None = None
    trip: str | None = None  # trip the strategy's kill switch for this reason, first

    def __post_init__(self) -> None:
        require_utc("bar_ts", self.bar_ts)
        require_utc("decided_at", self.decided_at)
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")
        trades = self.action in SIDES
        if trades != (self.order is not None) or (trades and self.order.side != self.action):
            raise ValueError(f"action {self.action!r} does not match order {self.order!r}")
        filled = self.order is not None and self.order.status == "filled"
        if filled != (self.fill is not None):
            raise ValueError("a fill goes with a filled order, and a filled order needs one")
        if self.trip is not None and self.order is not None:
            raise ValueError("a decision that trips the kill switch cannot place an order")

    @property
    def key(self) -> str:
        return decision_key(self.strategy, self.symbol, self.timeframe, self.bar_ts)

    @property
    def client_order_id(self) -> str | None:
        return client_order_id(self.key, self.order.side) if self.order else None

    def audit_payload(self) -> dict[str, Any]:
        order = (
            asdict(self.order) | {"client_order_id": self.client_order_id} if self.order else None
        )
        return {
            "key": self.key,
            "action": self.action,
            "entry_signal": self.entry_signal,
            "exit_signal": self.exit_signal,
            "note": self.note,
            "order": order,
            "fill": asdict(self.fill) if self.fill else None,
            "position": asdict(self.position) if self.position else None,
            "balance": asdict(self.balance),
            "seen": asdict(self.seen) if self.seen else None,
        }
