"""Dry-run (paper) execution: a configured strategy on its newest closed bars, into the ledger.

Nothing here, or anywhere in candlestack, sends an order to an exchange: the paper broker
is `decide`, which takes the bar's decision with the step the backtest's loop takes on
every bar (candlestack.execution.step: exits, entries, data policy, fills at the next
bar's open, cash and PnL), under the market rules of the day the order fills; around it
only what is live: the kill switch and drawdown gate, the ledger. Signals come from
`config_signals`, the function the backtest calls.

One bar is one ledger transaction (`Ledger.execute`): the state is read and the decision
written under the ledger's write lock, so a bar is executed once whichever run gets there
first, and runs of the same strategy racing each other still decide bars in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import polars as pl

from candlestack import execution as ex
from candlestack.backtest import config_signals, engine_rules, untradable
from candlestack.backtest_store import load_rules, load_window
from candlestack.config import symbol_key
from candlestack.errors import CandlestackError
from candlestack.lake import Lake
from candlestack.ledger import (
    AUDIT_ERROR,
    ENTRY_SKIPPED_PREFIX,
    SKIPPED_PREFIX,
    Balance,
    DecisionRecord,
    FillRecord,
    Ledger,
    LedgerState,
    OrderRecord,
    Position,
    SeenBar,
    Verification,
)
from candlestack.live_status import StreamedOpens
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.schema import MINUTE_MS
from candlestack.sources.base import CandleSource
from candlestack.strategies.config import StrategyConfig

logger = logging.getLogger(__name__)

SKIPPED_NOTE = f"{SKIPPED_PREFIX} catch-up policy 'latest'"
_EXIT_CODES = {reason: code for code, reason in ex.EXIT_REASONS.items()}
_FILL_POLL_SECONDS = 0.2


class DryRunError(CandlestackError):
    """A bar could not be decided (no bar yet, no next open): nothing was written for it."""


@dataclass(frozen=True)
class FillQuote:
    """The bar an order placed at the decided bar's close fills on."""

    ts: datetime  # its open time
    open: float
    untradable: bool  # imputed or missing minutes; False while it is still forming
    adjacent: bool  # it is the very next period (no day without bars in between)


@dataclass(frozen=True)
class BarDecision:
    """What one bar's evaluation hands to `decide`."""

    bar_ts: datetime
    seen: SeenBar  # without fill_open: `decide` adds it when it fills
    entry: bool
    exit: bool
    fill: FillQuote | None
    rules: ex.Rules  # the strategy's, with the market rules of the day the order would fill
    quality_trip: str | None  # stale or low-quality data: trip the kill switch
    compute_ms: float


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def opening_balance(config: StrategyConfig) -> Balance:
    """A strategy's balance before its first dry-run bar: its capital, nothing realised."""
    return Balance(cash=config.capital, realised_pnl=0.0, fees=0.0, peak_equity=config.capital)


def decide(
    config: StrategyConfig,
    bar: BarDecision,
    state: LedgerState,
    now: datetime,
    run_id: str | None = None,
) -> DecisionRecord:
    """The paper broker: one bar's decision from the strategy's state, `execution.step` as
    the backtest's loop takes it at this bar. `now` is when it is decided and filled."""
    balance = state.balance or opening_balance(config)
    position = state.position
    close = bar.seen.close
    equity = balance.cash + (position.amount * close if position else 0.0)
    peak = max(balance.peak_equity, equity)
    balance = replace(balance, peak_equity=peak)
    trip = bar.quality_trip
    drawdown = 1.0 - equity / peak
    if trip is None and drawdown >= config.dry_run.max_drawdown:
        trip = (
            f"drawdown {drawdown:.2%} reached max_drawdown {config.dry_run.max_drawdown:.2%} "
            f"(equity {equity:.2f}, peak {peak:.2f})"
        )
    blocked = state.tripped or trip
    record = DecisionRecord(
        strategy=config.name,
        symbol=config.symbol,
        timeframe=config.timeframe,
        bar_ts=bar.bar_ts,
        entry_signal=bar.entry,
        exit_signal=bar.exit,
        action="none",
        balance=balance,
        position=position,
        seen=bar.seen,
        compute_ms=bar.compute_ms,
        run_id=run_id,
        trip=trip if state.tripped is None else None,
        decided_at=now,
    )
    # Floats, ints and bools throughout: the types the compiled step was cached for.
    engine_state = ex.State(float(balance.cash), 0.0, 0.0, 0.0, ex.NO_EXIT)
    if position is not None:
        engine_state = ex.State(
            float(balance.cash),
            float(position.amount),
            float(position.entry_price),
            float(position.entry_fee),
            _EXIT_CODES.get(position.refused_exit, ex.NO_EXIT),
        )
    fill = bar.fill
    engine_bar = ex.Bar(
        float(close),
        bool(bar.entry),
        bool(bar.exit),
        bool(bar.seen.untradable),
        # No fill quote yet: an order then raises (or is blocked) in _apply, unfilled.
        float(fill.open) if fill else np.nan,
        bool(fill.untradable) if fill else False,
        bool(fill.adjacent) if fill else True,
    )
    after, event = ex.step(engine_state, engine_bar, bar.rules)
    return _apply(config, bar, record, after, event, blocked)


def _apply(
    config: StrategyConfig,
    bar: BarDecision,
    record: DecisionRecord,
    after: ex.State,
    event: ex.Event,
    blocked: str | None,
) -> DecisionRecord:
    """The step's event as the ledger records it, unless the kill switch holds it back."""
    if event.kind == ex.NOTHING:
        return record
    if event.kind == ex.SELL and blocked:
        reason = ex.EXIT_REASONS[event.reason]
        return replace(record, action="blocked", note=f"sell ({reason}) not sent: {blocked}")
    fill = _require_fill(config, bar)
    if event.kind == ex.SKIPPED:
        # The backtest's data policy, counted there as skipped_entries.
        note = f"{ENTRY_SKIPPED_PREFIX}: {ex.SKIP_REASONS[event.reason]}"
        return replace(record, note=note)
    if blocked:
        return replace(record, action="blocked", note=f"buy not sent: {blocked}")
    side = "buy" if event.kind == ex.BUY else "sell"
    seen = replace(bar.seen, fill_open=fill.open)
    balance, position = record.balance, record.position
    if event.rejected != ex.ACCEPTED:
        why = ex.REJECTION_REASONS[event.rejected]
        if position is not None:
            position = replace(position, refused_exit=ex.EXIT_REASONS[after.refused_exit])
        order = OrderRecord(side, event.amount, event.price, "rejected", why)
        return replace(record, action=side, order=order, seen=seen, position=position)
    filled = FillRecord(event.price, event.amount, event.fee, record.decided_at, fill.ts)
    balance = replace(balance, cash=after.cash, fees=balance.fees + event.fee)
    if side == "buy":
        order = OrderRecord("buy", event.amount, event.price, "filled")
        position = Position(event.amount, event.price, event.fee, fill.ts)
    else:
        reason = ex.EXIT_REASONS[event.reason]
        order = OrderRecord("sell", event.amount, event.price, "filled", reason)
        position = None
        balance = replace(balance, realised_pnl=balance.realised_pnl + event.pnl)
    return replace(
        record,
        action=side,
        order=order,
        fill=filled,
        position=position,
        seen=seen,
        balance=balance,
    )


def _require_fill(config: StrategyConfig, bar: BarDecision) -> FillQuote:
    if bar.fill is None:
        raise DryRunError(
            f"{config.name}: the open of the bar after {bar.bar_ts.isoformat()} is not "
            f"available yet, so an order on it cannot be filled"
        )
    return bar.fill


# --- one run: the bars it decides -----------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    decisions: list[DecisionRecord]  # written by this run, oldest first
    already_decided: bool  # the requested bar was decided before (by another run)
    signals_ms: float  # features and signals over the window, once per run
    warm_up_ms: float = 0.0  # first calls in this process (see warm_up)
    # The whole step: from the run's start to the commit of its last decision (verification,
    # lake reads, signals, fill wait, decisions and their ledger writes).
    step_ms: float = 0.0
    committed_at: datetime | None = None  # wall clock just after that commit
    verification: Verification | None = None  # what the pre-trade verification read


_warmed_up: set[str] = set()


def warm_up(config: StrategyConfig, bars: pl.DataFrame) -> float:
    """Make the first calls of a fresh process before the timed decision; the ms it took.

    A run is a new process: its first compiled call loads numba's registries and the cached
    kernels (~0.7 s here) and its first feature pass sets up polars and TA-Lib (~0.2 s).
    Paying that here keeps a decision's compute_ms what the computation costs; the
    warm-up is still inside the close-to-fill latency, and reported beside it.
    """
    if config.name in _warmed_up:
        return 0.0
    started = time.perf_counter()
    ex.rules_row(np.zeros(1, dtype=np.int64), 0, 0)
    market = ex.MarketRules(amount_step=0.01, price_tick=0.01)
    bar = ex.Bar(1.0, True, False, False, 1.0, False, True)
    ex.step(ex.State(1.0, 0.0, 0.0, 0.0, ex.NO_EXIT), bar, engine_rules(config, market))
    config_signals(config, bars.tail(50))
    _warmed_up.add(config.name)
    return (time.perf_counter() - started) * 1000


def _imputed_minutes(bars: pl.DataFrame) -> np.ndarray:
    column = "n_imputed" if "n_imputed" in bars.columns else "imputed"
    return bars.get_column(column).cast(pl.Float64).fill_null(0).to_numpy()


def load_live_bars(
    lake: Lake, exchange: str, config: StrategyConfig, bar_ts: datetime, since: datetime | None
) -> pl.DataFrame:
    """The strategy's bars from the day of `since` (the last decided bar, to catch up from)
    or of `bar_ts` through the day after `bar_ts` (the fill bar may be stored already),
    with the warm-up history its features need."""
    first = min(since.date(), bar_ts.date()) if since else bar_ts.date()
    update = {"start": first, "end": bar_ts.date() + timedelta(days=1)}
    return load_window(lake, exchange, config.model_copy(update=update)).bars


def newest_candle_close_ms(lake: Lake, exchange: str, symbol: str) -> int | None:
    """Close time of the newest stored 1-minute candle of `symbol`: from the newest month
    that holds a candle (a day the exchange had nothing for stores none)."""
    last = lake.newest_ts("ohlcv", exchange, "1m", symbol_key(symbol))
    return None if last is None else _ms(last) + MINUTE_MS


class DryRun:
    """Executes one strategy's pending bars into the ledger (the dry-run job's body)."""

    def __init__(
        self,
        config: StrategyConfig,
        lake: Lake,
        exchange: str,
        source: CandleSource,
        ledger: Ledger,
        clock: Callable[[], float] = time.time,
        streamed: StreamedOpens | None = None,
    ) -> None:
        self.config = config
        self.lake = lake
        self.exchange = exchange
        self.source = source
        self.ledger = ledger
        self.streamed = streamed
        self.clock = clock
        self.bar_ms = TIMEFRAME_MINUTES[config.timeframe] * MINUTE_MS

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def run(self, bar_ts: datetime, run_id: str | None = None) -> RunOutcome:
        """Decide every bar of the strategy after its last decided one up to `bar_ts`, in
        order (or, with catch_up "latest", `bar_ts` alone and the others as skipped).
        An error is audited, may trip the kill switch (error_burst), and is raised."""
        try:
            return self._run(bar_ts, run_id)
        except Exception as exc:
            self._record_error(bar_ts, exc)
            raise

    def _run(self, bar_ts: datetime, run_id: str | None) -> RunOutcome:
        config = self.config
        run_started = time.perf_counter()
        last = self.ledger.last_decided(config.name, config.symbol, config.timeframe)
        if last is not None and last >= bar_ts:
            return RunOutcome([], already_decided=True, signals_ms=0.0)
        # Before reading any position or balance: an edit outside the ledger of what the bar
        # reads trips "*", and the bars below are decided but blocked (bounded work: see
        # Ledger.verify_for_trading; the audit_chain check verifies everything).
        verification = self.ledger.verify_for_trading(config.name, config.symbol, "dry-run")
        bars = load_live_bars(self.lake, self.exchange, config, bar_ts, last)
        ts = bars.get_column("ts").dt.epoch("ms").to_numpy()
        target = int(np.searchsorted(ts, _ms(bar_ts)))
        if target == len(ts) or ts[target] != _ms(bar_ts):
            raise DryRunError(
                f"{config.name}: no closed {config.timeframe} bar of {config.symbol} opening "
                f"at {bar_ts.isoformat()} in the lake yet"
            )
        warm_up_ms = warm_up(config, bars)
        started = time.perf_counter()
        entry, exit_ = config_signals(config, bars.slice(0, target + 1))
        signals_ms = (time.perf_counter() - started) * 1000
        first = target
        if last is not None:
            first = int(np.searchsorted(ts, _ms(last), side="right"))
        first_day = _utc(int(ts[first])).date()
        rules = load_rules(self.lake, self.exchange, config.symbol, since=first_day)
        context = _Window(bars, ts, untradable(bars), _imputed_minutes(bars), rules)
        quality = self._quality_trip(context, target)
        decisions = []
        for index in range(first, target + 1):
            if config.dry_run.catch_up == "latest" and index < target:
                record = self._skip(context, index, run_id)
            else:
                bar = self._bar(context, index, bool(entry[index]), bool(exit_[index]), quality)
                bar = replace(bar, compute_ms=bar.compute_ms + signals_ms)
                record = self.ledger.execute(
                    config.name,
                    config.symbol,
                    config.timeframe,
                    bar.bar_ts,
                    lambda state, bar=bar: decide(config, bar, state, self._now(), run_id),
                )
            if record is not None:
                decisions.append(record)
        step_ms = (time.perf_counter() - run_started) * 1000
        return RunOutcome(
            decisions,
            not decisions,
            signals_ms,
            warm_up_ms,
            step_ms,
            self._now(),
            verification,
        )

    def _bar(
        self, window: _Window, index: int, entry: bool, exit_: bool, quality: str | None
    ) -> BarDecision:
        started = time.perf_counter()
        row = window.bars.row(index, named=True)
        seen = SeenBar(
            open=row["open"],
            high=row["high"],
            low=row["low"],
            close=row["close"],
            volume=row["volume"],
            untradable=bool(window.untradable[index]),
        )
        fetching = time.perf_counter()
        fill = self._fill(window, index)  # I/O, maybe waiting: not compute
        started += time.perf_counter() - fetching
        fill_ms = _ms(fill.ts) if fill else int(window.ts[index]) + self.bar_ms
        days = window.rules.snapshot_days
        market = window.rules.at(ex.rules_row(days, fill_ms, len(days) - 1))
        return BarDecision(
            bar_ts=row["ts"],
            seen=seen,
            entry=entry,
            exit=exit_,
            fill=fill,
            rules=engine_rules(self.config, market),
            quality_trip=quality,
            compute_ms=(time.perf_counter() - started) * 1000,
        )

    def _fill(self, window: _Window, index: int) -> FillQuote | None:
        """The next bar from the lake when it is stored, else the forming candle's open: from
        the live collector's stream when it has shown it, else from the source (waiting up to
        fill_wait_seconds for it to exist)."""
        if index + 1 < len(window.ts):
            next_ms = int(window.ts[index + 1])
            return FillQuote(
                ts=_utc(next_ms),
                open=float(window.bars.item(index + 1, "open")),
                untradable=bool(window.untradable[index + 1]),
                adjacent=next_ms - int(window.ts[index]) == self.bar_ms,
            )
        next_ms = int(window.ts[index]) + self.bar_ms
        deadline = time.monotonic() + self.config.dry_run.fill_wait_seconds
        while True:
            price = None
            if self.streamed is not None:
                price = self.streamed.open_at(self.config.symbol, next_ms)
            if price is None:
                price = self.source.open_at(self.config.symbol, next_ms)
            if price is not None:
                return FillQuote(_utc(next_ms), price, untradable=False, adjacent=True)
            if time.monotonic() >= deadline:
                return None
            time.sleep(_FILL_POLL_SECONDS)

    def _quality_trip(self, window: _Window, index: int) -> str | None:
        """Why the data is too stale or too imputed to trade on, or None."""
        config = self.config
        now_ms = int(self.clock() * 1000)
        newest = newest_candle_close_ms(self.lake, self.exchange, config.symbol)
        limit = config.dry_run.stale_after_seconds
        if newest is None or (now_ms - newest) / 1000 > limit:
            age = "none stored" if newest is None else f"closed {(now_ms - newest) // 1000} s ago"
            return f"stale data: newest 1m candle of {config.symbol} {age} (limit {limit:.0f} s)"
        lookback = config.dry_run.quality_window_bars
        recent = window.imputed_minutes[max(0, index + 1 - lookback) : index + 1]
        minutes = len(recent) * TIMEFRAME_MINUTES[config.timeframe]
        share = float(recent.sum()) / minutes if minutes else 0.0
        if share > config.dry_run.max_imputed_share:
            return (
                f"low-quality data: {share:.1%} of the last {len(recent)} bars' minutes imputed "
                f"(limit {config.dry_run.max_imputed_share:.1%})"
            )
        return None

    def _skip(self, window: _Window, index: int, run_id: str | None) -> DecisionRecord | None:
        bar_ts = _utc(int(window.ts[index]))

        def skipped(state: LedgerState) -> DecisionRecord:
            balance = state.balance or opening_balance(self.config)
            return DecisionRecord(
                strategy=self.config.name,
                symbol=self.config.symbol,
                timeframe=self.config.timeframe,
                bar_ts=bar_ts,
                entry_signal=False,
                exit_signal=False,
                action="none",
                balance=balance,
                position=state.position,
                note=SKIPPED_NOTE,
                run_id=run_id,
                decided_at=self._now(),
            )

        config = self.config
        return self.ledger.execute(config.name, config.symbol, config.timeframe, bar_ts, skipped)

    def _record_error(self, bar_ts: datetime, exc: Exception) -> None:
        config = self.config
        try:
            self.ledger.append_audit(
                AUDIT_ERROR,
                config.name,
                {"bar_ts": bar_ts.isoformat(), "error": f"{type(exc).__name__}: {exc}"},
            )
            window = timedelta(minutes=config.dry_run.error_window_minutes)
            # Audit events carry wall-clock times.
            errors = self.ledger.recent_errors(config.name, datetime.now(UTC) - window)
            if errors >= config.dry_run.error_burst:
                self.ledger.trip(
                    config.name,
                    f"error burst: {errors} failed bars within "
                    f"{config.dry_run.error_window_minutes:g} min (last: {exc})",
                    "dry-run",
                )
        except Exception:
            # The ledger itself may be what failed: the original error is the one to raise.
            logger.exception("could not record the dry-run error of %s", config.name)


@dataclass(frozen=True)
class _Window:
    bars: pl.DataFrame
    ts: np.ndarray  # epoch ms
    untradable: np.ndarray
    imputed_minutes: np.ndarray
    rules: ex.RuleBook


def session_summary(decisions: pl.DataFrame, orders: pl.DataFrame) -> dict[str, Any]:
    """Counts a person checks first (a strategy's ledger decisions and orders): decisions,
    orders, rejections, fills, blocked orders, skipped entries. The ledger keeps the same
    counts as running totals (Ledger.session_totals), which a bar's metadata reads instead
    of the whole history; this is their definition over the frames."""
    return {
        "decisions": decisions.height,
        "orders": orders.height,
        "rejected": orders.filter(pl.col("status") == "rejected").height,
        "fills": orders.filter(pl.col("status") == "filled").height,
        "blocked": decisions.filter(pl.col("action") == "blocked").height,
        "skipped_entries": decisions.filter(
            pl.col("note").str.starts_with(ENTRY_SKIPPED_PREFIX)
        ).height,
    }


# Latency figures cover this many of the newest decisions.
LATENCY_WINDOW = 500


def latency_stats(decisions: pl.DataFrame, timeframe: str) -> dict[str, float]:
    """Decision compute time and close-to-fill latency, p50 and p95, over the newest
    LATENCY_WINDOW of a strategy's ledger decisions with a compute time (the dry-run reads
    just those: Ledger.newest_decisions(strategy, LATENCY_WINDOW, timed=True)); latency only
    of bars decided live (within one bar of their close: catch-up bars were late by
    definition). Latency runs to the decision's `decided_at`, taken just before its ledger
    write: the step's own metadata adds step_ms and close_to_commit_s, measured after the
    commit."""
    bar = timedelta(minutes=TIMEFRAME_MINUTES[timeframe])
    recent = (
        decisions.filter(pl.col("compute_ms").is_not_null())
        .tail(LATENCY_WINDOW)
        .with_columns(
            ((pl.col("decided_at") - pl.col("bar_ts") - bar).dt.total_milliseconds() / 1000).alias(
                "latency_s"
            )
        )
    )
    if recent.is_empty():
        return {}
    stats = {
        "decision_compute_p50_ms": float(recent["compute_ms"].quantile(0.5, "linear")),
        "decision_compute_p95_ms": float(recent["compute_ms"].quantile(0.95, "linear")),
    }
    live = recent.filter(pl.col("latency_s") < bar.total_seconds())
    if not live.is_empty():
        stats["close_to_fill_p50_s"] = float(live["latency_s"].quantile(0.5, "linear"))
        stats["close_to_fill_p95_s"] = float(live["latency_s"].quantile(0.95, "linear"))
    return stats
