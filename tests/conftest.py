from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OHLCV = SHARED / "ohlcv"
EXCHANGE_INFO = SHARED / "exchange" / "spot_api_v3_exchangeInfo_2021-03-24_mainnet_subset13.json"
REPLAY_FILES = {
    "BTC/USDT": OHLCV / "tooyipjee_binance_BTCUSDT_1m.csv",
    "ETH/USDT": OHLCV / "tooyipjee_binance_ETHUSDT_1m.csv",
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared test data not found at {SHARED}: clone beside ../shared")
    return SHARED
