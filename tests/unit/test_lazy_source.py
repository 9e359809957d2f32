"""LazySource builds its source on the first call that needs it, and only once."""

from candlestack.sources.base import LazySource
from candlestack.sources.synthetic import SyntheticSource


def test_the_source_is_built_on_first_use_only_once():
    built: list[SyntheticSource] = []

    def open_source() -> SyntheticSource:
        built.append(SyntheticSource(seed=7, symbols=["BTC/USDT"]))
        return built[-1]

    lazy = LazySource(open_source, "synthetic")
    assert lazy.exchange == "synthetic"
    assert not built
    now = lazy.now_ms()
    minute = now - now % 60_000 - 60_000
    assert lazy.open_at("BTC/USDT", minute) == built[0].open_at("BTC/USDT", minute)
    assert lazy.kind == "synthetic"
    assert len(built) == 1
