import dagster as dg
import pytest

from assets.market_data import candles_1m
from resources import LakeResource, ReplaySourceResource
from tests.conftest import EXCHANGE_INFO, REPLAY_FILES


@pytest.fixture
def resources(tmp_path, shared_data):
    """The recorded Binance candles as the source, a lake and catalog under tmp_path."""
    return {
        "source": ReplaySourceResource(
            files={s: str(p) for s, p in REPLAY_FILES.items()},
            markets_file=str(EXCHANGE_INFO),
        ),
        "lake": LakeResource(
            root=str(tmp_path / "lake"),
            catalog_path=str(tmp_path / "c.duckdb"),
            reports_path=str(tmp_path / "reports"),
        ),
    }


def ingest_months(resources, instance, months, symbol_key: str = "BTC-USDT") -> None:
    """One run a month (of the replay's whole days: 2021-04-21..2021-05-19); a month whose
    2021-04-25 fails its blocking checks is still stored."""
    for month in months:
        dg.materialize(
            [candles_1m],
            partition_key=f"{month}-01|{symbol_key}",
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
