"""The dry-run ledger as a Dagster resource."""

from functools import cache

import dagster as dg
from pydantic import Field

from candlestack.config import Settings
from candlestack.ledger import Ledger
from resources.env import env_var_or


@cache
def _open(url: str) -> Ledger:
    # One engine (and connection pool) per URL and process; migrated once, on first use.
    ledger = Ledger(url)
    ledger.migrate()
    return ledger


class LedgerResource(dg.ConfigurableResource):
    """Where orders, fills, positions, balances, the kill switch and the audit log live."""

    url: str = Field(
        description="SQLAlchemy URL: sqlite:///... or postgresql+psycopg://...; one with a "
        "password is given as EnvVar"
    )

    def open(self) -> Ledger:
        return _open(self.url)


def ledger_resource(settings: Settings) -> LedgerResource:
    """The ledger of CANDLESTACK_LEDGER_URL, as EnvVar: its password never becomes config."""
    return LedgerResource(url=env_var_or("CANDLESTACK_LEDGER_URL", settings.ledger_url))
