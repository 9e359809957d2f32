"""The ccxt source is configured by the user's options without touching the network."""

import pytest

from candlestack.errors import ConfigError
from candlestack.sources.ccxt_source import CcxtSource


def test_unknown_exchange_id_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="'binanse'"):
        CcxtSource("binanse")


def test_constructor_options_reach_ccxt_with_rate_limiting_on_by_default():
    source = CcxtSource(
        "kraken", {"timeout": 1234, "urls": {"api": {"public": "http://127.0.0.1:9/0"}}}
    )
    assert source.client.timeout == 1234
    assert source.client.urls["api"]["public"] == "http://127.0.0.1:9/0"
    assert source.client.enableRateLimit is True
    assert CcxtSource("binance", {"enableRateLimit": False}).client.enableRateLimit is False


def test_sandbox_mode_switches_to_the_testnet_urls():
    live = CcxtSource("binance").client.urls["api"]["public"]
    test = CcxtSource("binance", sandbox=True).client.urls["api"]["public"]
    assert "testnet" in test
    assert test != live


def test_page_size_is_the_exchanges_maximum():
    assert CcxtSource("binance").page_limit == 1000
