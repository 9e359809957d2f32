"""The dry-run ledger as a Dagster resource."""

from functools import cache

import dagster as dg
from pydantic import Field

from candlestack.ledger import Ledger


@cache
def _open(url: str) -> Ledger:
    # One engine (and connection pool) per URL and process; migrated once, on first use.
    ledger = Ledger(url)
    ledger.migrate()
    return ledger


class LedgerResource(dg.ConfigurableResource):
    """Where orders, fills, positions, balances, the kill switch and the audit log live."""

    url: str = Field(description="SQLAlchemy URL: sqlite:///... or postgresql+psycopg://...")

    def open(self) -> Ledger:
        return _open(self.url)
