"""Candle sources: one interface (CandleSource), three implementations.

CcxtSource lives in candlestack.sources.ccxt_source, imported only where one is built:
ccxt takes ~0.6 s to import, which every run worker loading the code location would pay.
"""

from candlestack.sources.base import CandleSource
from candlestack.sources.replay import ReplaySource
from candlestack.sources.synthetic import SyntheticSource

__all__ = ["CandleSource", "ReplaySource", "SyntheticSource"]
