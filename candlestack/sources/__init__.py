"""Candle sources: one interface (CandleSource), three implementations."""

from candlestack.sources.base import CandleSource
from candlestack.sources.ccxt_source import CcxtSource
from candlestack.sources.replay import ReplaySource
from candlestack.sources.synthetic import SyntheticSource

__all__ = ["CandleSource", "CcxtSource", "ReplaySource", "SyntheticSource"]
