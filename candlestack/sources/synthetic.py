"""A seeded, deterministic market: realistic enough to exercise gap handling and strategies.

Every value of a minute depends only on (seed, symbol, day), never on the window
asked for, so a re-request returns exactly what a bulk request would have. Prices
follow slow trends (a sum of seeded sine waves in log price, continuous across
days), volatility regimes that last several days, a US-session volume and
volatility bump, and a Brownian bridge inside each day so days join without jumps.
Some minutes are missing on purpose: a few never exist (they are imputed), and a
few are withheld on the first request that covers them (a re-request recovers them).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import polars as pl

from candlestack.schema import DAY_MS, MARKETS, MINUTE_MS, MINUTES_PER_DAY, RAW_CANDLES

_TREND_PERIODS_DAYS = np.array([365.0, 97.0, 29.0, 11.0])
_TREND_AMPLITUDES = np.array([0.45, 0.18, 0.07, 0.03])
_REGIME_VOLS = np.array([0.5, 1.0, 1.8, 3.2])
_REGIME_DAYS = 5
_MINUTE_VOL = 0.0006
_KNOWN_BASES = {"BTC": 30_000.0, "ETH": 2_000.0, "SOL": 100.0, "BNB": 300.0, "XRP": 0.5}


def _symbol_hash(symbol: str) -> int:
    return zlib.crc32(symbol.encode())


class SyntheticSource:
    kind = "synthetic"

    def __init__(
        self,
        seed: int = 7,
        symbols: Sequence[str] = (),
        exchange: str = "synthetic",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.seed = seed
        self.symbols = tuple(symbols)
        self.exchange = exchange
        self._clock = clock
        self._withheld: set[tuple[str, int]] = set()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _base_price(self, symbol: str) -> float:
        base = symbol.split("/")[0]
        if base in _KNOWN_BASES:
            return _KNOWN_BASES[base]
        rng = np.random.default_rng([self.seed, _symbol_hash(symbol)])
        return float(10 ** rng.uniform(-1, 4))

    def _anchor(self, symbol: str, day_number: int) -> float:
        """Log price at the start of a day: slow trends, continuous in the day number."""
        rng = np.random.default_rng([self.seed, _symbol_hash(symbol), 0xA11C])
        phases = rng.uniform(0, 2 * np.pi, _TREND_PERIODS_DAYS.size)
        waves = np.sin(2 * np.pi * day_number / _TREND_PERIODS_DAYS + phases)
        return float(np.log(self._base_price(symbol)) + (_TREND_AMPLITUDES * waves).sum())

    def _decimals(self, symbol: str) -> int:
        # About six significant digits, like real quotes.
        return max(0, 5 - int(np.floor(np.log10(self._base_price(symbol)))))

    def day(self, symbol: str, day_number: int) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
        """All 1440 candles of a day, the open times that never exist, and those withheld once."""
        rng = np.random.default_rng([self.seed, _symbol_hash(symbol), day_number])
        regime_rng = np.random.default_rng(
            [self.seed, _symbol_hash(symbol), day_number // _REGIME_DAYS, 0x5E]
        )
        regime = _REGIME_VOLS[regime_rng.integers(_REGIME_VOLS.size)]
        minutes = np.arange(MINUTES_PER_DAY)
        session = 1.0 + 0.8 * np.exp(-(((minutes - 14.5 * 60) / 120.0) ** 2))
        sigma = _MINUTE_VOL * regime * session

        start, end = self._anchor(symbol, day_number), self._anchor(symbol, day_number + 1)
        walk = np.concatenate(([0.0], np.cumsum(rng.normal(0.0, sigma))))
        fraction = np.arange(MINUTES_PER_DAY + 1) / MINUTES_PER_DAY
        log_path = start + walk - fraction * walk[-1] + fraction * (end - start)
        path = np.exp(log_path)
        open_, close = path[:-1], path[1:]
        wick = np.abs(rng.normal(0.0, 0.5 * sigma, (2, MINUTES_PER_DAY)))
        high = np.maximum(open_, close) * np.exp(wick[0])
        low = np.minimum(open_, close) * np.exp(-wick[1])
        decimals = self._decimals(symbol)
        # Rounding is monotonic, so low <= open, close <= high still holds afterwards.
        open_, high, low, close = (np.round(a, decimals) for a in (open_, high, low, close))
        moves = np.abs(np.diff(log_path)) / sigma
        volume = np.round(
            (1e5 / self._base_price(symbol))
            * regime
            * session
            * (0.5 + moves)
            * rng.lognormal(0.0, 0.6, MINUTES_PER_DAY),
            6,
        )
        day_start = day_number * DAY_MS
        ts = day_start + minutes * MINUTE_MS
        frame = pl.DataFrame(
            {"ts": ts, "open": open_, "high": high, "low": low, "close": close, "volume": volume},
            schema=RAW_CANDLES,
        )
        never = self._gap(rng, day_start, probability=0.4, longest=3)
        withheld = self._gap(rng, day_start, probability=0.6, longest=6)
        return frame, never, withheld

    @staticmethod
    def _gap(rng: np.random.Generator, day_start: int, probability: float, longest: int):
        if rng.random() >= probability:
            return np.empty(0, dtype=np.int64)
        first = int(rng.integers(1, MINUTES_PER_DAY - longest))
        length = int(rng.integers(1, longest + 1))
        return day_start + (first + np.arange(length)) * MINUTE_MS

    def fetch_candles(self, symbol: str, start_ms: int, end_ms: int) -> pl.DataFrame:
        end_ms = min(end_ms, self.now_ms() // MINUTE_MS * MINUTE_MS)
        frames = []
        for day_number in range(start_ms // DAY_MS, -(-end_ms // DAY_MS)):
            frame, never, withheld = self.day(symbol, day_number)
            first_time = [
                ts
                for ts in withheld.tolist()
                if start_ms <= ts < end_ms and (symbol, ts) not in self._withheld
            ]
            self._withheld.update((symbol, ts) for ts in first_time)
            hidden = np.concatenate((never, np.asarray(first_time, dtype=np.int64)))
            frames.append(
                frame.filter(pl.col("ts").is_between(start_ms, end_ms, closed="left")).filter(
                    ~pl.col("ts").is_in(hidden.tolist())
                )
            )
        return pl.concat(frames) if frames else pl.DataFrame(schema=RAW_CANDLES)

    def open_at(self, symbol: str, ts_ms: int) -> float | None:
        if ts_ms > self.now_ms() or ts_ms % MINUTE_MS:
            return None
        frame, never, _ = self.day(symbol, ts_ms // DAY_MS)
        if ts_ms in never:
            return None
        return float(frame.item((ts_ms % DAY_MS) // MINUTE_MS, "open"))

    def load_markets(self) -> pl.DataFrame:
        rows = []
        for symbol in self.symbols:
            base, quote = symbol.split("/")[:2]
            # Lots worth about a tenth of a dollar, ticks at the fifth significant digit.
            step = 10.0 ** np.floor(np.log10(0.1 / self._base_price(symbol)))
            rows.append(
                {
                    "symbol": symbol,
                    "market_id": symbol.replace("/", ""),
                    "base": base,
                    "quote": quote.split(":")[0],
                    "active": True,
                    "amount_step": step,
                    "price_tick": 10.0 ** -self._decimals(symbol),
                    "min_amount": step,
                    "max_amount": 9_000_000.0,
                    "min_cost": 5.0,
                    "maker_fee": 0.001,
                    "taker_fee": 0.001,
                }
            )
        return pl.DataFrame(rows, schema=MARKETS)
