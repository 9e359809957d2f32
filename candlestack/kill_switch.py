"""The dry-run kill switch from a shell:

    python -m candlestack.kill_switch status
    python -m candlestack.kill_switch trip  --scope btc_scalp --reason "exchange maintenance"
    python -m candlestack.kill_switch reset --scope '*' --reason "reviewed, resuming"

The ledger is CANDLESTACK_LEDGER_URL's (default sqlite:///data/ledger.sqlite). A trip or
reset is audited with the reason and the operating-system user; a reset is the only way
back. Scope "*" (the default) is every strategy at once; any other scope must be a strategy
of the strategies file (CANDLESTACK_STRATEGIES), so a typo is refused, never tripped.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import sys
from collections.abc import Sequence

import polars as pl

from candlestack.config import Settings
from candlestack.errors import CandlestackError, ConfigError
from candlestack.ledger import GLOBAL_SCOPE, Ledger
from candlestack.strategies.config import load_strategies


def known_scope(scope: str, strategies: Sequence[str]) -> str:
    """`scope` if it is "*" or a configured strategy; else ConfigError naming the known
    ones (a trip of a strategy that does not exist would leave the meant one trading)."""
    if scope == GLOBAL_SCOPE or scope in strategies:
        return scope
    close = difflib.get_close_matches(scope, strategies, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join([repr(GLOBAL_SCOPE), *sorted(strategies)])
    raise ConfigError(f"unknown kill-switch scope {scope!r}{hint}; known scopes: {known}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m candlestack.kill_switch")
    parser.add_argument("action", choices=("status", "trip", "reset"))
    parser.add_argument("--scope", default=GLOBAL_SCOPE, help='a strategy name, or "*" (all)')
    parser.add_argument("--reason", help="why (required to trip or reset)")
    args = parser.parse_args(argv)
    if args.action != "status" and not (args.reason or "").strip():
        parser.error(f"{args.action} needs --reason")
    try:
        settings = Settings.from_env()
        if args.action != "status":
            names = [s.name for s in load_strategies(settings.strategies).strategies]
            known_scope(args.scope, names)
        ledger = Ledger(settings.ledger_url)
        ledger.migrate()
        if args.action != "status":
            change = ledger.trip if args.action == "trip" else ledger.reset
            by = f"cli:{getpass.getuser()}"
            changed = change(args.scope, args.reason, by)
            verb = "tripped" if args.action == "trip" else "reset"
            print(f"{args.scope}: {verb}" if changed else f"{args.scope}: already {verb}")
        with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            states = ledger.kill_switch_states()
            print(states if not states.is_empty() else "no kill switch was ever tripped")
    except CandlestackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
