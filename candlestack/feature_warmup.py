"""How many bars each TA-Lib function needs to forget where its input started: the
horizons behind `features.warmup_bars`. A feature's value agrees with a computation over
the full history within WARMUP_TOLERANCE (1e-9) relative after

    warmup = lookback + horizon

`lookback` is TA-Lib's (`talib.abstract.Function(...).lookback`): the bars before its
first number, e.g. 19 for SMA(20), 199 for EMA(200), 14 for RSI(14) and ATR(14), 33 for
MACD(12, 26, 9). A finite-window function (SMA, BBANDS with SMA, WMA, ...) is exact once
its window is full: horizon = 0.

A recursive smoother y[t] = (1 - a) * y[t-1] + a * x[t] still carries (1 - a)^k of its
seed after k bars, so it forgets it to 1e-9 after

    k(a) = ceil(log(1e-9) / log(1 - a))

with a = 2 / (n + 1) for an EMA of period n. Wilder's smoothing (a = 1 / n: RSI, ATR,
ADX's DM/TR) averages moves, whose size changes with volatility: a seed's error counts
against the average where the output is read, so its seed must fade below 1e-9 / 100
(a seed up to 100 times that average). An output that is a ratio of two smoothed
averages (RSI, CMO, +DI, -DI, DX, RVI) adds their relative errors, so those averages
forget their seeds to half that again:

    k(a) = ceil(log(1e-9 / 100) / log(1 - a))      Wilder
    k(a) = ceil(log(1e-9 / 200) / log(1 - a))      Wilder, in a ratio

Smoothers chained one after another add their horizons (MACD: the slower of its EMAs
plus the signal EMA; DEMA twice, T3 six times; ADX: DX's ratio, then its own smoothing);
side by side the slower one counts. Adaptive ones take their slowest alpha (KAMA
(2/31)^2, MAMA its slowlimit). So EMA(200): a = 2/201, k = 2,073, warm-up 199 + 2,073 =
2,272 bars; ATR(14): 14 + 342 = 356; RSI(14): 14 + 352 = 366; MACD(12, 26, 9): 33 + 270
+ 93 = 396.

The bound holds while volatility stays within those two orders of magnitude over the
warm-up (on the real series here the seed was at most ~16 times the average). A
stretch of flat bars (an imputed outage) holds a Wilder average of moves still, and the
seed's share with it: flat bars do not count towards forgetting, so a window whose
warm-up overlaps one agrees less.

Functions whose output depends on the start forever (OBV, AD, SAR, ...) are refused when
the feature is loaded. The horizon assumes TA-Lib's default unstable periods (0) and
compatibility mode; a different global setting is already in `lookback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

WARMUP_TOLERANCE = 1e-9


def convergence_bars(alpha: float, tolerance: float = WARMUP_TOLERANCE) -> int:
    """Bars after which a recursive smoother's seed weighs less than `tolerance`.

    An exponential smoother y[t] = (1 - alpha) * y[t-1] + alpha * x[t] carries (1 - alpha)^k of
    its seed after k bars, so k = ceil(log(tolerance) / log(1 - alpha)).
    """
    if alpha >= 1.0:
        return 0
    return math.ceil(math.log(tolerance) / math.log1p(-alpha))


def _ema(period: int) -> int:
    return convergence_bars(2.0 / (period + 1))


# Wilder's averages smooth moves (gains, losses, true ranges, directional moves), and a
# seed's error counts relative to the average where the output is read: a seed 30x the
# size of a quiet stretch's average weighs 30x more there. The warm-up assumes the seed is
# at most this many times the average it is read against (volatility within two orders of
# magnitude over ~350 bars; measured on the real series here: up to 16x).
_MOVE_RANGE = 100
_WILDER_TOLERANCE = WARMUP_TOLERANCE / _MOVE_RANGE


def _wilder(period: int) -> int:
    return convergence_bars(1.0 / period, _WILDER_TOLERANCE)


# An output that is a ratio of two smoothed averages (RSI = 100 G / (G + L), +DI = 100 DM / TR,
# DX, CMO, RVI) adds their relative errors: d ln(G / (G + L)) = L / (G + L) * (dG/G - dL/L),
# so |error| <= |dG/G| + |dL/L|. Each average must then forget its seed to half the
# tolerance for the output to stay within it.
_RATIO_TOLERANCE = _WILDER_TOLERANCE / 2


def _wilder_ratio(period: int) -> int:
    return convergence_bars(1.0 / period, _RATIO_TOLERANCE)


# The Hilbert-transform family smooths its I/Q components, Re/Im and the period with alpha 0.2
# and the smoothed period with 0.33 (Ehlers); chained, so the horizons add up.
_HILBERT = 3 * convergence_bars(0.2) + convergence_bars(0.33)
# KAMA's smoothing constant is (ER * (2/3 - 2/31) + 2/31)^2: at worst (2/31)^2.
_KAMA = convergence_bars((2.0 / 31.0) ** 2)
# MACDFIX uses TA-Lib's fixed 12/26 constants 0.15 and 0.075.
_MACDFIX_SLOW = convergence_bars(0.075)


def _ma(matype: int, period: int) -> int:
    """Convergence horizon of TA-Lib moving average `matype` (talib.MA_Type) over `period`."""
    match matype:
        case 1 | 12:  # EMA, ZLEMA
            return _ema(period)
        case 3:  # DEMA: two EMAs in a chain
            return 2 * _ema(period)
        case 4:  # TEMA
            return 3 * _ema(period)
        case 6:  # KAMA
            return _KAMA
        case 7:  # MAMA with TA-Lib's default limits (0.5, 0.05)
            return _HILBERT + convergence_bars(0.05) + convergence_bars(0.025)
        case 8:  # T3: six EMAs in a chain
            return 6 * _ema(period)
        case 13:  # Wilder
            return _wilder(period)
        case _:  # SMA, WMA, TRIMA, HMA, none: finite windows, inside TA-Lib's lookback
            return 0


def _mama(p: Mapping[str, Any]) -> int:
    # MAMA's alpha stays within [slowlimit, fastlimit]; FAMA runs at half of it.
    slow = float(p["slowlimit"])
    return _HILBERT + convergence_bars(slow) + convergence_bars(slow / 2)


# Bars beyond TA-Lib's lookback that each recursive function needs to forget its seed, from its
# parameters. Stages in a chain add up; stages side by side take the slower one. A function
# TA-Lib flags as unstable must be listed here or it is refused at load time; the unit tests
# check every listed horizon against the full history on real data.
SMOOTHING: dict[str, Callable[[Mapping[str, Any]], int]] = {
    "EMA": lambda p: _ema(p["timeperiod"]),
    "ZLEMA": lambda p: _ema(p["timeperiod"]),
    "DEMA": lambda p: 2 * _ema(p["timeperiod"]),
    "TEMA": lambda p: 3 * _ema(p["timeperiod"]),
    "TRIX": lambda p: 3 * _ema(p["timeperiod"]),
    "T3": lambda p: 6 * _ema(p["timeperiod"]),
    "RMA": lambda p: _wilder(p["timeperiod"]),
    "KAMA": lambda p: _KAMA,
    "MAMA": _mama,
    "HT_DCPERIOD": lambda p: _HILBERT,
    "HT_DCPHASE": lambda p: _HILBERT,
    "HT_PHASOR": lambda p: _HILBERT,
    "HT_SINE": lambda p: _HILBERT,
    "HT_TRENDLINE": lambda p: _HILBERT,
    "HT_TRENDMODE": lambda p: _HILBERT,
    "MA": lambda p: _ma(p["matype"], p["timeperiod"]),
    "BBANDS": lambda p: _ma(p["matype"], p["timeperiod"]),
    "MAVP": lambda p: _ma(p["matype"], p["maxperiod"]),
    # MACD: the slower of its two EMAs, then the signal EMA over their difference.
    "MACD": lambda p: max(_ema(p["fastperiod"]), _ema(p["slowperiod"])) + _ema(p["signalperiod"]),
    "MACDFIX": lambda p: _MACDFIX_SLOW + _ema(p["signalperiod"]),
    "MACDEXT": lambda p: (
        max(_ma(p["fastmatype"], p["fastperiod"]), _ma(p["slowmatype"], p["slowperiod"]))
        + _ma(p["signalmatype"], p["signalperiod"])
    ),
    "APO": lambda p: max(_ma(p["matype"], p["fastperiod"]), _ma(p["matype"], p["slowperiod"])),
    "PPO": lambda p: max(_ma(p["matype"], p["fastperiod"]), _ma(p["matype"], p["slowperiod"])),
    "PVO": lambda p: max(_ma(p["matype"], p["fastperiod"]), _ma(p["matype"], p["slowperiod"])),
    "RSI": lambda p: _wilder_ratio(p["timeperiod"]),
    "CMO": lambda p: _wilder_ratio(p["timeperiod"]),
    "STOCHRSI": lambda p: (
        _wilder_ratio(p["timeperiod"]) + _ma(p["fastd_matype"], p["fastd_period"])
    ),
    "STOCH": lambda p: (
        _ma(p["slowk_matype"], p["slowk_period"]) + _ma(p["slowd_matype"], p["slowd_period"])
    ),
    "STOCHF": lambda p: _ma(p["fastd_matype"], p["fastd_period"]),
    "KDJ": lambda p: (
        _ma(p["slowk_matype"], p["slowk_period"]) + _ma(p["slowd_matype"], p["slowd_period"])
    ),
    "ATR": lambda p: _wilder(p["timeperiod"]),
    "NATR": lambda p: _wilder(p["timeperiod"]),
    "PLUS_DM": lambda p: _wilder(p["timeperiod"]),
    "MINUS_DM": lambda p: _wilder(p["timeperiod"]),
    "PLUS_DI": lambda p: _wilder_ratio(p["timeperiod"]),
    "MINUS_DI": lambda p: _wilder_ratio(p["timeperiod"]),
    "DX": lambda p: _wilder_ratio(p["timeperiod"]),
    # ADX smooths DX, itself a ratio of smoothed DMs.
    "ADX": lambda p: _wilder_ratio(p["timeperiod"]) + _wilder(p["timeperiod"]),
    "ADXR": lambda p: _wilder_ratio(p["timeperiod"]) + _wilder(p["timeperiod"]),
    "RVI": lambda p: _wilder_ratio(p["timeperiod"]),
    "KC": lambda p: max(_ema(p["timeperiod"]), _wilder(p["atrperiod"])),
    "CVI": lambda p: _ema(p["timeperiod"]),
    "MASSI": lambda p: 2 * _ema(p["fastperiod"]),
    "EFI": lambda p: _ema(p["timeperiod"]),
    "ERI": lambda p: _ema(p["timeperiod"]),
    "TSI": lambda p: _ema(p["firstperiod"]) + _ema(p["secondperiod"]),
    "SMI": lambda p: _ema(p["slowperiod"]) + _ema(p["fastperiod"]) + _ema(p["signalperiod"]),
    "HA": lambda p: convergence_bars(0.5),  # HA open averages the previous HA open and close
}
