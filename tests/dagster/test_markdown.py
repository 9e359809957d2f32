"""Tables the UI renders from markdown metadata keep each value in its own column."""

import re

import polars as pl
from markdown_it import MarkdownIt

from assets.markdown import md_table


def test_a_value_with_pipes_stays_in_its_cell():
    key = "btc_scalp|BTC/USDT|1m|2026-11-23T21:58:00+00:00"
    frame = pl.DataFrame({"id": [1], "decision_key": [key], "side": ["buy"]})
    html = MarkdownIt("commonmark").enable("table").render(md_table(frame))
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells == ["1", key, "buy"]
