"""The verify command: every file of a lake decoded and its days re-hashed; a planted bad
file named, and only it; moved aside on request."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from candlestack.bars import BarBuilder
from candlestack.ingest import Ingestor
from candlestack.lake import GAPS_KEY, REPORT_KEY, Lake, write_parquet_atomic
from candlestack.sources.synthetic import SyntheticSource
from candlestack.verify import main
from tests.conftest import DAMAGE, quarantined

REPO = Path(__file__).resolve().parents[2]
SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
DAYS = [date(2025, 1, 1) + timedelta(days=i) for i in range(59)]  # January and February
TIMEFRAMES = ("5m", "15m", "1h", "4h", "1d")
FILES = len(SYMBOLS) * 2 * (1 + len(TIMEFRAMES))  # candle and bar month files


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "lake"
    lake = Lake(root)
    source = SyntheticSource(symbols=SYMBOLS, clock=lambda: 2e9)
    builder = BarBuilder(lake, "synthetic", imputed_max_share=0.01)
    for symbol in SYMBOLS:
        Ingestor(source, lake).ingest(symbol, DAYS)
        for timeframe in TIMEFRAMES:
            for month in (date(2025, 1, 1), date(2025, 2, 1)):
                builder.build(timeframe, symbol.replace("/", "-"), month)
    return root


@pytest.fixture
def root(built, tmp_path) -> Path:
    """A copy of the built lake, to damage."""
    return Path(shutil.copytree(built, tmp_path / "lake"))


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def a_file_in_the_middle(root: Path) -> Path:
    return files(root)[FILES // 2]


def verify(root: Path, capsys, *flags: str) -> tuple[int, list[str], str]:
    """Exit status, the BAD lines, and the summary line."""
    status = main(["--lake", str(root), *flags])
    lines = capsys.readouterr().out.splitlines()
    return status, [line for line in lines if line.startswith("BAD ")], lines[-1]


def test_a_whole_lake_passes_and_the_throughput_is_printed(root, capsys):
    status, bad, summary = verify(root, capsys)

    assert status == 0
    assert bad == []
    assert len(files(root)) == FILES >= 30
    assert re.fullmatch(
        rf"{FILES} files, [\d.]+ MB checked in [\d.]+ s \(\d+ files/s, [\d.]+ MB/s\): 0 bad",
        summary,
    )


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_file_among_many_is_named_and_only_it(root, capsys, damage):
    planted = a_file_in_the_middle(root)
    DAMAGE[damage](planted)
    damaged = planted.read_bytes()

    status, bad, summary = verify(root, capsys)

    assert status == 1
    assert [line.split(": ")[0] for line in bad] == [f"BAD {planted}"]
    assert summary.startswith(f"{FILES} files") and summary.endswith(": 1 bad")
    assert planted.read_bytes() == damaged  # only --quarantine moves it


def test_rows_changed_behind_their_footer_are_found_by_their_content_hashes(root, capsys):
    """Every page is valid (rewritten with fresh checksums): only re-hashing the days tells."""
    planted = a_file_in_the_middle(root)
    footer = {
        k: v for k, v in pq.read_schema(planted).metadata.items() if k in (REPORT_KEY, GAPS_KEY)
    }
    rows = pl.read_parquet(planted).with_columns(pl.col("close") * 1.001)
    write_parquet_atomic(planted, rows.to_arrow(), footer)

    status, bad, _ = verify(root, capsys)

    assert status == 1
    assert len(bad) == 1
    assert bad[0].startswith(f"BAD {planted}: the rows of ")
    assert bad[0].endswith("do not hash to the content_hash in its footer")


def test_quarantine_moves_exactly_the_damaged_file_and_a_second_run_passes(root, capsys):
    planted = a_file_in_the_middle(root)
    DAMAGE["data"](planted)
    damaged = planted.read_bytes()

    status, bad, summary = verify(root, capsys, "--quarantine")

    (moved,) = quarantined(root)
    assert status == 1
    assert bad[0].endswith(f"(moved to {moved})")
    assert summary.endswith("1 bad, 1 moved to the quarantine")
    assert moved.read_bytes() == damaged
    assert moved.name.startswith("data.parquet.")
    assert not planted.exists()
    assert verify(root, capsys)[:2] == (0, [])


def test_a_file_that_is_not_a_candlestack_month_file_is_named_but_left(root, capsys):
    foreign = a_file_in_the_middle(root)
    pl.DataFrame({"x": [1, 2]}).write_parquet(foreign)

    status, bad, _ = verify(root, capsys, "--quarantine")

    assert status == 1
    assert bad == [f"BAD {foreign}: {foreign} has no candlestack report in its footer"]
    assert foreign.exists() and not quarantined(root)


def test_the_command_checks_the_configured_lake_by_default(root):
    planted = a_file_in_the_middle(root)
    DAMAGE["truncated"](planted)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")}

    done = subprocess.run(
        [sys.executable, "-m", "candlestack.verify"],
        cwd=REPO, env={**env, "CANDLESTACK_LAKE": str(root)}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip

    assert done.returncode == 1, done.stderr
    assert f"BAD {planted}: its footer cannot be read" in done.stdout
    assert "1 bad" in done.stdout.splitlines()[-1]


def test_no_lake_at_the_path_is_an_error(tmp_path, capsys):
    assert main(["--lake", str(tmp_path / "nowhere")]) == 2
    assert f"no lake at {tmp_path / 'nowhere'}" in capsys.readouterr().err
