"""Dry-run (paper) execution: one asset per enabled strategy, the ledger, and their checks.

`dryrun_<name>` is materialized once per closed bar by the dry-run sensor (run key
strategy|symbol|timeframe|bar open). Its metadata is the bar's decision, the order and fill,
position, balance, kill switch and latency; the UI plots the numbers across bars. Its `drift`
check replays the backtest over the bars the dry-run decided in its trailing window. What a
step reads stays bounded as the ledger grows (running totals, the newest decisions, the
audit events since the verified checkpoint). The `ledger` asset is a
snapshot of the whole ledger with the `audit_chain` check. Nothing here sends a real order.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from assets.backtests import strategies_file, strategy_upstream
from assets.keys import LEDGER_KEY, backtest_key, dry_run_key
from assets.markdown import md_table
from assets.market_data import EXCHANGE_POOL
from assets.tags import STRATEGY_TAG
from candlestack.drift import drift_from_lake
from candlestack.dryrun import LATENCY_WINDOW, DryRun, latency_stats
from candlestack.ledger import GLOBAL_SCOPE, Ledger
from candlestack.resample import TIMEFRAME_MINUTES
from candlestack.sources.base import LazySource
from candlestack.strategies.config import StrategyConfig
from resources import CandleSourceResource, LakeResource, LedgerResource

DRIFT_CHECK = "drift"
AUDIT_CHECK = "audit_chain"

enabled_strategies = [c for c in strategies_file.strategies if c.dry_run.enabled]


class DryRunBar(dg.Config):
    """The closed bar to decide: its open time, ISO 8601 in UTC (the sensor fills it in)."""

    bar_open: str


def _kill_switch_text(ledger: Ledger, strategy: str) -> str:
    reason = ledger.tripped(strategy)
    return f"TRIPPED: {reason}" if reason else "armed (trading allowed)"


def _decision_metadata(ledger: Ledger, strategy: StrategyConfig, outcome) -> dict:
    metadata: dict = {"kill_switch": _kill_switch_text(ledger, strategy.name)}
    if outcome.decisions:
        last = outcome.decisions[-1]
        balance, position = last.balance, last.position
        close = last.seen.close if last.seen else float("nan")
        bar = timedelta(minutes=TIMEFRAME_MINUTES[strategy.timeframe])
        latency = (last.decided_at - last.bar_ts - bar).total_seconds()
        metadata |= {
            "bar_open": last.bar_ts.isoformat(),
            "action": last.action,
            "entry_signal": last.entry_signal,
            "exit_signal": last.exit_signal,
            "note": last.note or "",
            "bars_decided": len(outcome.decisions),
            "close_to_fill_s": latency,
            "decision_compute_ms": last.compute_ms or 0.0,
            # The whole step, not only the strategy's arithmetic: from the run's start
            # (verification, lake reads, signals, fill) to the ledger commit.
            "step_ms": outcome.step_ms,
            "close_to_commit_s": (outcome.committed_at - last.bar_ts - bar).total_seconds(),
            "process_warm_up_ms": outcome.warm_up_ms,
            "position_amount": position.amount if position else 0.0,
            "cash": balance.cash,
            "equity": balance.cash + (position.amount * close if position else 0.0),
            "realised_pnl": balance.realised_pnl,
            "fees": balance.fees,
        }
        if last.order is not None:
            metadata["order"] = (
                f"{last.order.side} {last.order.amount} at {last.order.price}: "
                f"{last.order.status}" + (f" ({last.order.reason})" if last.order.reason else "")
            )
    else:
        metadata["note"] = "already decided by an earlier run: nothing executed twice"
    if (verified := outcome.verification) is not None:
        metadata |= {
            "ledger_verification": "full" if verified.full else "since the checkpoint",
            "ledger_events_verified": verified.events,
        }
    # Bounded reads, whatever the history: one row of running totals, the newest
    # LATENCY_WINDOW decisions.
    summary = ledger.session_totals(strategy.name)
    recent = ledger.newest_decisions(strategy.name, LATENCY_WINDOW, timed=True)
    stats = latency_stats(recent, strategy.timeframe)
    return metadata | {f"session_{k}": v for k, v in summary.items()} | stats


def _dry_run_asset(strategy: StrategyConfig) -> dg.AssetsDefinition:
    key = dry_run_key(strategy.name)

    @dg.asset(
        key=key,
        deps=[*strategy_upstream(strategy), backtest_key(strategy.name)],
        group_name="dry_run",
        kinds={"python", "sql"},
        tags={STRATEGY_TAG: strategy.name},
        pool=EXCHANGE_POOL,  # it fetches the forming candle's open when the stream lacks it
        description=f"Paper trading of {strategy.name} ({strategy.strategy} on {strategy.symbol} "
        f"{strategy.timeframe}), one closed bar per run, into the ledger. No real orders.",
    )
    def dry_run(
        context: dg.AssetExecutionContext,
        config: DryRunBar,
        source: CandleSourceResource,
        lake: LakeResource,
        ledger: LedgerResource,
    ) -> dg.MaterializeResult:
        bar_ts = datetime.fromisoformat(config.bar_open).astimezone(UTC)
        exchange = source.exchange_name()
        # Built only if the live stream lacks the fill's open (ccxt: usually never).
        client = LazySource(source.open, exchange)
        book = ledger.open()
        outcome = DryRun(
            strategy, lake.lake, exchange, client, book, streamed=source.streamed_opens()
        ).run(bar_ts, run_id=context.run_id)
        for decision in outcome.decisions:
            context.log.info(
                "%s %s: %s%s",
                strategy.name,
                decision.bar_ts.isoformat(),
                decision.action,
                f" ({decision.note})" if decision.note else "",
            )
        return dg.MaterializeResult(metadata=_decision_metadata(book, strategy, outcome))

    return dry_run


def _drift_check(strategy: StrategyConfig) -> dg.AssetChecksDefinition:
    tolerance = strategy.dry_run.drift

    @dg.asset_check(
        asset=dry_run_key(strategy.name),
        name=DRIFT_CHECK,
        description=f"The dry-run against its backtest replayed on the same bars over the last "
        f"{tolerance.window_days} days (replayed from the dry-run's last flat bar before them, "
        f"with its cash there: the check reads that window, not the whole session): "
        f"signal agreement >= {tolerance.min_signal_agreement:.0%}, "
        f"fill price within {tolerance.max_fill_price_diff_bps:g} bps, at most "
        f"{tolerance.max_unmatched_fills} unmatched fills, PnL within "
        f"{tolerance.max_pnl_diff:.2%} of capital. Differences are attributed.",
    )
    def drift_check(
        context: dg.AssetCheckExecutionContext,
        source: CandleSourceResource,
        lake: LakeResource,
        ledger: LedgerResource,
    ) -> dg.AssetCheckResult:
        report = drift_from_lake(
            lake.lake, source.exchange_name(), ledger.open(), strategy, datetime.now(UTC)
        )
        causes = report.causes()
        # Observed on the asset too: its Plots tab draws each figure across check runs.
        context.op_execution_context.log_event(
            dg.AssetObservation(
                asset_key=dry_run_key(strategy.name),
                metadata={f"drift_{k}": float(v) for k, v in report.metrics.items()},
            )
        )
        return dg.AssetCheckResult(
            passed=report.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(report.failures) or "within tolerance",
            metadata={
                **{k: float(v) for k, v in report.metrics.items()},
                "window_days": tolerance.window_days,
                "replay_from": report.replay_from.isoformat() if report.replay_from else "",
                **{f"cause_{k.replace(' ', '_').replace('-', '_')}": v for k, v in causes.items()},
                "attributions": dg.MetadataValue.md(md_table(report.attributions, limit=30)),
            },
        )

    return drift_check


@dg.asset(
    key=LEDGER_KEY,
    group_name="dry_run",
    kinds={"sql"},
    deps=[dry_run_key(c.name) for c in enabled_strategies],
    description="Snapshot of the dry-run ledger: balances, positions, kill switch, orders, "
    "latency, and the head of the hash-chained audit log (published here so a rewrite of the "
    "whole chain in the database still shows).",
    check_specs=[
        dg.AssetCheckSpec(
            AUDIT_CHECK,
            asset=LEDGER_KEY,
            description="Every audit event hashes the previous one, the chain head matches, and "
            "every position, balance, fill, order, decision and kill-switch row is the one the "
            "chain bound: fails on any edited, deleted or reordered event or row, and trips the "
            "kill switch of every strategy.",
        )
    ],
)
def ledger_snapshot(context: dg.AssetExecutionContext, ledger: LedgerResource):
    book = ledger.open()
    # Full: every event and state row.
    problems = book.verify_audit_chain()
    verified = book.last_verification
    seq, head = book.audit_head()
    # The head published last time must still be in the chain, with the same hash.
    previous = context.instance.get_latest_materialization_event(LEDGER_KEY)
    if previous is not None and (published := previous.asset_materialization) is not None:
        old_seq = published.metadata.get("audit_events")
        old_hash = published.metadata.get("audit_head_hash")
        if old_seq is not None and old_hash is not None and old_seq.value > 0:
            events = book.audit_events(last=max(seq - old_seq.value + 1, 1))
            match = events.filter(pl.col("seq") == old_seq.value)
            if match.is_empty() or match.item(0, "hash") != old_hash.value:
                problems.append(
                    f"seq {old_seq.value}: no longer carries the hash published at the last "
                    "snapshot (the chain was rewritten)"
                )
    if problems:
        book.trip_on_problems(problems, AUDIT_CHECK)
        seq, head = book.audit_head()  # the trip is the newest event
    else:
        # Intact, and the head published before still in it: the dry-run's per-bar
        # verification may start from what was verified here.
        book.save_checkpoint(verified.head_seq, verified.head_hash)
    orders = book.orders()
    rejected = orders.filter(pl.col("status") == "rejected").height
    yield dg.MaterializeResult(
        metadata={
            "audit_events": seq,
            "audit_head_hash": head,
            "orders": orders.height,
            "rejected_orders": rejected,
            "rejection_rate": rejected / orders.height if orders.height else 0.0,
            "kill_switch": dg.MetadataValue.md(kill_switch_table(book)),
            "balances": dg.MetadataValue.md(md_table(book.balances())),
            "positions": dg.MetadataValue.md(md_table(book.positions())),
            "last_orders": dg.MetadataValue.md(md_table(orders.tail(10).drop("client_order_id"))),
            "ledger": book.url,
        }
    )
    yield dg.AssetCheckResult(
        check_name=AUDIT_CHECK,
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems[:5]) or f"{seq} events verified",
        metadata={"events": seq, "problems": len(problems), "head_hash": head},
    )


def kill_switch_table(book: Ledger) -> str:
    states = book.kill_switch_states()
    scopes = [GLOBAL_SCOPE, *(c.name for c in enabled_strategies)]
    known = {row["scope"]: row for row in states.iter_rows(named=True)}
    rows = []
    for scope in dict.fromkeys([*scopes, *known]):
        row = known.get(scope)
        state = "TRIPPED" if row and row["tripped"] else "armed"
        detail = (
            f"{row['reason']} ({row['changed_by']}, {row['changed_at']:%Y-%m-%d %H:%M:%S})"
            if row
            else ""
        )
        rows.append({"scope": scope, "state": state, "last change": detail})
    return md_table(pl.DataFrame(rows, schema=["scope", "state", "last change"], orient="row"))


dry_run_assets = [_dry_run_asset(c) for c in enabled_strategies]
drift_checks = [_drift_check(c) for c in enabled_strategies]
