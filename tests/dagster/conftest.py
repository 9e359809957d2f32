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


def ingest_day_by_day(resources, instance, days, symbol_key: str = "BTC-USDT") -> None:
    """One run a day, so a day failing its blocking checks does not stop the others."""
    for day in days:
        dg.materialize(
            [candles_1m],
            partition_key=f"{day}|{symbol_key}",
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
