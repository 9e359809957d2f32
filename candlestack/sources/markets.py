"""ccxt market structures to the MARKETS frame."""

from __future__ import annotations

import polars as pl

from candlestack.schema import MARKETS


def _step(value: float | None, as_step: bool) -> float | None:
    # Exchanges report precision either as a step (TICK_SIZE) or as a number of digits.
    if value is None:
        return None
    if as_step:
        return float(value)
    return 10.0 ** -float(value)


def markets_frame(markets: dict | list, precision_mode: int) -> pl.DataFrame:
    """One row per market from ccxt's parsed markets (load_markets() or parse_markets())."""
    # Imported here: ccxt takes ~0.6 s to import, and the code location imports this module.
    from ccxt import TICK_SIZE

    as_step = precision_mode == TICK_SIZE
    entries = markets.values() if isinstance(markets, dict) else markets
    rows = []
    for m in entries:
        limits = m.get("limits") or {}
        precision = m.get("precision") or {}
        rows.append(
            {
                "symbol": m["symbol"],
                "market_id": str(m.get("id")),
                "base": m.get("base"),
                "quote": m.get("quote"),
                "active": m.get("active"),
                "amount_step": _step(precision.get("amount"), as_step),
                "price_tick": _step(precision.get("price"), as_step),
                "min_amount": (limits.get("amount") or {}).get("min"),
                "max_amount": (limits.get("amount") or {}).get("max"),
                "min_cost": (limits.get("cost") or {}).get("min"),
                "maker_fee": m.get("maker"),
                "taker_fee": m.get("taker"),
            }
        )
    return pl.DataFrame(rows, schema=MARKETS).sort("symbol")
