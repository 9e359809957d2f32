"""Backtest report rendering: the equity PNG, its markdown embedding and the HTML page."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from candlestack.report import _minmax_downsample, equity_png, html_report, markdown_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
YEAR_OF_MINUTES = 525_600
START_MS = 1_609_459_260_000  # 2021-01-01 00:01 UTC, the first 1m bar close of the year


def random_walk(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = START_MS + np.arange(n, dtype=np.int64) * 60_000
    equity = 10_000.0 * np.exp(np.cumsum(rng.normal(0.0, 0.0005, n)))
    return ts, equity


def pixels(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return imread(io.BytesIO(png), format="png")


def test_equity_png_is_an_800x450_image() -> None:
    ts, equity = random_walk(1_000)
    image = pixels(equity_png(ts, equity, benchmark=equity * 0.9, title="BTC/USDT sma 20/50"))
    assert image.shape[:2] == (450, 800)
    # Something was drawn: not a blank white canvas.
    assert image[..., :3].min() < 0.5


@pytest.mark.parametrize("n", [0, 1])
def test_equity_png_without_enough_points_still_renders(n: int) -> None:
    ts, equity = random_walk(n)
    image = pixels(equity_png(ts, equity, title="empty"))
    assert image.shape[:2] == (450, 800)


def test_title_with_dollar_signs_is_not_parsed_as_math() -> None:
    ts, equity = random_walk(100)
    # An even number of "$" would otherwise be parsed as mathtext and can raise.
    assert equity_png(ts, equity, title=r"$5 to $10 \frac{").startswith(PNG_SIGNATURE)


def test_mismatched_lengths_are_rejected() -> None:
    ts, equity = random_walk(100)
    with pytest.raises(ValueError, match="length mismatch"):
        equity_png(ts, equity[:-1])


def test_a_year_of_minutes_gives_a_small_png() -> None:
    ts, equity = random_walk(YEAR_OF_MINUTES)
    png = equity_png(ts, equity, benchmark=random_walk(YEAR_OF_MINUTES, seed=1)[1], title="1y")
    assert len(png) < 150_000
    assert pixels(png).shape[:2] == (450, 800)


def test_downsampler_keeps_a_one_minute_crash_and_spike() -> None:
    _, equity = random_walk(YEAR_OF_MINUTES)
    crash, spike = 300_001, 123_457
    equity[crash] = 1.0
    equity[spike] = 1e9
    keep = _minmax_downsample(equity, n_buckets=2_000)
    assert crash in keep and spike in keep
    assert keep[0] == 0 and keep[-1] == YEAR_OF_MINUTES - 1
    assert len(keep) <= 2 * 2_000 + 2
    assert np.all(np.diff(keep) > 0)
    assert equity[keep].min() == 1.0 and equity[keep].max() == 1e9


def test_downsampler_leaves_short_series_alone() -> None:
    y = np.array([3.0, 1.0, 2.0])
    assert _minmax_downsample(y, n_buckets=2_000).tolist() == [0, 1, 2]


def test_one_minute_drawdown_is_visible_in_the_png() -> None:
    ts, _ = random_walk(YEAR_OF_MINUTES)
    flat = np.full(YEAR_OF_MINUTES, 10_000.0)
    crashed = flat.copy()
    crashed[300_001] = 5_000.0  # -50% for a single minute, then back
    # Red drawdown pixels exist only if the trough survived downsampling (flat has none).
    assert red_pixel_count(equity_png(ts, flat)) == 0
    assert red_pixel_count(equity_png(ts, crashed)) > 20


def red_pixel_count(png: bytes) -> int:
    rgb = pixels(png)[..., :3]
    return int(np.sum((rgb[..., 0] > 0.6) & (rgb[..., 1] < 0.5) & (rgb[..., 2] < 0.5)))


def test_importing_the_module_does_not_import_matplotlib() -> None:
    code = "import sys, candlestack.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_markdown_image_round_trips_the_png() -> None:
    png = PNG_SIGNATURE + bytes(range(256))
    text = markdown_image(png, "equity curve")
    match = re.fullmatch(r"!\[equity curve\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert match is not None
    assert base64.b64decode(match.group(1)) == png


def trades_frame(n: int, side: str = "buy") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "trade_id": list(range(n)),
            "side": [side] * n,
            "price": [100.0 + i for i in range(n)],
        }
    )


METRICS = [("total return", "12.3%"), ("max drawdown", "-4.5%")]
CONFIG = {"symbol": "BTC/USDT", "fast": 20, "slow": 50, "start": np.datetime64("2021-01-01")}


def test_html_report_escapes_titles_and_trade_values() -> None:
    png = equity_png(*random_walk(100))
    page = html_report(
        "<script>alert(1)</script> report", METRICS, png, trades_frame(3, "<script>x</script>"), {}
    )
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; report" in page
    assert "<td>&lt;script&gt;x&lt;/script&gt;</td>" in page
    assert page.startswith("<!DOCTYPE html>")


def test_html_report_is_self_contained() -> None:
    png = equity_png(*random_walk(100))
    page = html_report("sma", METRICS, png, trades_frame(3), CONFIG)
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "<td>total return</td><td>12.3%</td>" in page
    assert "<th>trade_id</th><th>side</th><th>price</th>" in page
    # Sorted keys, and default=str for values json cannot encode.
    assert '"fast": 20,\n  "slow": 50,\n  "start": "2021-01-01",\n  "symbol": "BTC/USDT"' in (
        page.replace("&quot;", '"')
    )
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    assert "3 trades" in page


def test_html_report_truncates_long_trade_lists() -> None:
    png = equity_png(*random_walk(100))
    page = html_report("sma", METRICS, png, trades_frame(1_234), CONFIG)
    assert "showing 500 of 1234 trades" in page
    assert page.count("<tr><td>") == len(METRICS) + 500
    assert "<td>499</td>" in page and "<td>500</td>" not in page


def test_html_report_is_byte_identical_for_identical_inputs() -> None:
    ts, equity = random_walk(5_000)
    first = html_report("sma", METRICS, equity_png(ts, equity), trades_frame(10), CONFIG)
    second = html_report("sma", METRICS, equity_png(ts, equity), trades_frame(10), dict(CONFIG))
    assert first.encode() == second.encode()
