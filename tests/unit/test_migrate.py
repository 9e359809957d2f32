"""Migrating a lake of day files to month files: exact, verified, idempotent, resumable, and
refused whole (the lake untouched) when anything in it is not understood."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import polars as pl
import pytest

import candlestack.migrate as migrate_module
from candlestack.errors import LakeError
from candlestack.lake import (
    GAP_TABLE,
    GAPS_KEY,
    REPORT_KEY,
    DayData,
    Lake,
    content_hash,
    month_of,
    write_parquet_atomic,
)
from candlestack.migrate import migrate, survey
from candlestack.resample import minute_bars, resample
from candlestack.schema import MINUTE_MS, day_start_ms
from candlestack.sources.replay import read_candle_file
from tests.conftest import REPLAY_FILES, candle_day

REPO = Path(__file__).resolve().parents[2]
EXCHANGE = "binance"
SYMBOLS = {"BTC-USDT": REPLAY_FILES["BTC/USDT"], "ETH-USDT": REPLAY_FILES["ETH/USDT"]}
# The maintenance gap (04-25), a month boundary (04-30, 05-01) and a day after the
# recordings end, without any candle (05-25): a 0-row day file with a report.
DAYS = (date(2021, 4, 25), date(2021, 4, 30), date(2021, 5, 1), date(2021, 5, 25))
EMPTY_DAY = date(2021, 5, 25)
# A day the new pipeline already wrote into May's month file before the migration.
NEW_DAY = date(2021, 5, 2)

Key = tuple[str, str, str, date]  # dataset, timeframe, symbol, day


def legacy_path(root: Path, dataset: str, timeframe: str, symbol: str, day: date) -> Path:
    return (
        root
        / dataset
        / f"exchange={EXCHANGE}"
        / f"timeframe={timeframe}"
        / f"symbol={symbol}"
        / f"date={day.isoformat()}"
        / "data.parquet"
    )


def write_legacy(path: Path, frame: pl.DataFrame, report: dict, gaps: pl.DataFrame | None):
    """A day file exactly as the day-file lake wrote one: report and gaps in the footer."""
    footer = {
        REPORT_KEY: json.dumps(
            {**report, "content_hash": content_hash(frame)}, sort_keys=True, default=str
        ).encode()
    }
    if gaps is not None:
        footer[GAPS_KEY] = gaps.write_json().encode()
    write_parquet_atomic(path, frame.to_arrow(), footer)


def bars_day(candles: pl.DataFrame, day: date) -> tuple[pl.DataFrame, dict]:
    bars = resample(minute_bars(candles), "5m", day_start_ms(day) + 1440 * MINUTE_MS)
    report = {
        "timeframe": "5m",
        "source_timeframe": "1m",
        "bars": bars.height,
        "expected": 288,
        "complete": int(bars["complete"].sum()),
        "imputed_minutes": int(bars["n_imputed"].sum()),
        "candles_hash": content_hash(candles),
    }
    return bars, report


@pytest.fixture(scope="module")
def days() -> dict[Key, tuple[pl.DataFrame, dict, pl.DataFrame | None]]:
    """Real candles (and their 5m bars) of two symbols: what the legacy lake holds."""
    found = {}
    for symbol, csv in SYMBOLS.items():
        raw = read_candle_file(csv)
        for day in DAYS:
            candles, report, gaps = candle_day(raw, day)
            found["ohlcv", "1m", symbol, day] = candles, report, gaps
            if candles.height:  # a day without candles got no bars
                bars, summary = bars_day(candles, day)
                found["bars", "5m", symbol, day] = bars, summary, None
    assert found["ohlcv", "1m", "BTC-USDT", EMPTY_DAY][0].height == 0
    assert found["ohlcv", "1m", "BTC-USDT", DAYS[0]][2].height > 0  # the gap is there
    return found


@pytest.fixture
def root(tmp_path, days) -> Path:
    """A legacy lake, plus what migration must leave alone or clean up."""
    root = tmp_path / "lake"
    for (dataset, timeframe, symbol, day), (frame, report, gaps) in days.items():
        write_legacy(legacy_path(root, dataset, timeframe, symbol, day), frame, report, gaps)
    # Folders of other kinds stay as they are.
    (root / "markets" / f"exchange={EXCHANGE}" / "date=2021-04-30").mkdir(parents=True)
    (root / "markets" / f"exchange={EXCHANGE}" / "date=2021-04-30" / "data.parquet").write_bytes(
        b"markets"
    )
    (root / "backtests" / "strategy=x").mkdir(parents=True)
    # Left by writes cut short: a temp file beside a day file, a date= folder holding only
    # one, and an empty date= folder.
    day_folder = legacy_path(root, "ohlcv", "1m", "ETH-USDT", DAYS[1]).parent
    (day_folder / ".data.parquet.0123abcd.tmp").write_bytes(b"partial")
    (day_folder.parent / "date=2021-04-26").mkdir()
    (day_folder.parent / "date=2021-04-26" / ".data.parquet.feed.tmp").write_bytes(b"partial")
    (day_folder.parent / "date=2021-04-27").mkdir()
    return root


@pytest.fixture
def new_day(root) -> pl.DataFrame:
    """A day the new pipeline already stored in BTC's May month file."""
    candles, report, gaps = candle_day(read_candle_file(SYMBOLS["BTC-USDT"]), NEW_DAY)
    Lake(root).write_month(
        "ohlcv", EXCHANGE, "1m", "BTC-USDT", NEW_DAY, {NEW_DAY: DayData(candles, report, gaps)}
    )
    return candles


def snapshot(root: Path) -> dict[str, object]:
    """Every folder and file under root, with each file's bytes and mtime."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_dir():
            found[name] = "dir"
        else:
            found[name] = (path.read_bytes(), path.stat().st_mtime_ns)
    return found


def date_folders(root: Path) -> list[Path]:
    return [p for d in ("ohlcv", "bars", "features") for p in (root / d).rglob("date=*")]


def check_migrated(root: Path, days) -> None:
    """Every day of `days` is in its month file exactly, and no day file is left."""
    assert date_folders(root) == []
    lake = Lake(root)
    for (dataset, timeframe, symbol, day), (frame, report, gaps) in days.items():
        month = lake.read_month(dataset, EXCHANGE, timeframe, symbol, day)
        assert month is not None, (dataset, symbol, day)
        assert month.path.parent.name == f"month={day:%Y-%m}"
        stored = month.day(day)
        assert stored.equals(frame), (dataset, symbol, day)
        assert content_hash(stored) == content_hash(frame)
        assert month.reports[day]["content_hash"] == content_hash(frame)
        # The report as the legacy footer held it (timestamps as their JSON text).
        legacy = json.loads(json.dumps(report, default=str))
        assert {k: v for k, v in month.reports[day].items() if k != "content_hash"} == legacy
        if gaps is None:
            assert month.gaps is None
        else:
            kept = month.gaps.filter(pl.col("gap_start").dt.date() == day)
            assert kept.equals(gaps.match_to_schema(GAP_TABLE))


def test_round_trip(root, days, new_day):
    before = date_folders(root)
    result = migrate(root)

    check_migrated(root, days)
    assert result.day_files == {"ohlcv": 8, "bars": 6}
    # Per symbol: April and May, for candles and bars.
    assert result.month_files == {"ohlcv": 4, "bars": 4}
    assert result.already_held == {"ohlcv": 0, "bars": 0}
    assert len(before) == 8 + 6 + 2  # and the two leftover date= folders went too
    lake = Lake(root)
    for symbol in SYMBOLS:
        months = lake.month_files("ohlcv", EXCHANGE, "1m", symbol)
        assert list(months) == [date(2021, 4, 1), date(2021, 5, 1)]
        assert list(lake.month_files("bars", EXCHANGE, "5m", symbol)) == list(months)
    # The month file's other day is kept beside the migrated ones, in time order.
    may = lake.read_month("ohlcv", EXCHANGE, "1m", "BTC-USDT", NEW_DAY)
    assert list(may.reports) == [date(2021, 5, 1), NEW_DAY, EMPTY_DAY]
    assert may.day(NEW_DAY).equals(new_day)
    assert may.frame["ts"].is_sorted()
    migrated = [days["ohlcv", "1m", "BTC-USDT", d][0] for d in DAYS if d.month == NEW_DAY.month]
    assert may.frame.height == sum(f.height for f in migrated) + new_day.height
    assert may.reports[EMPTY_DAY]["rows"] == 0
    # Nothing outside the three datasets is touched.
    markets = root / "markets" / f"exchange={EXCHANGE}" / "date=2021-04-30" / "data.parquet"
    assert markets.read_bytes() == b"markets"
    assert (root / "backtests" / "strategy=x").is_dir()
    assert "verified: every day's content hash unchanged" in result.summary()
    assert "ohlcv: 8 day files converted into 4 month files" in result.summary()


def test_second_run_changes_nothing(root, days):
    migrate(root)
    before = snapshot(root)

    again = migrate(root)

    assert again.converted == 0
    assert again.month_files == {}
    assert "nothing to migrate" in again.summary()
    assert snapshot(root) == before
    check_migrated(root, days)


def test_resumes_after_a_cut_during_conversion(root, days, monkeypatch):
    real = Lake.write_month
    calls = []

    def cut_after_one(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process killed after the first month file
        calls.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Lake, "write_month", cut_after_one)
    with pytest.raises(KeyboardInterrupt):
        migrate(root)
    monkeypatch.setattr(Lake, "write_month", real)
    first = Lake(root).month_path(*calls[0][:4], calls[0][4])
    assert first.exists()
    written = first.read_bytes()
    assert len(date_folders(root)) == 8 + 6 + 2  # none deleted

    result = migrate(root)

    check_migrated(root, days)
    assert first.read_bytes() == written  # held as it was, not written again
    cut_dataset, _, _, cut_symbol, cut_month, _ = calls[0]
    held = [k for k in days if (k[0], k[2], month_of(k[3])) == (cut_dataset, cut_symbol, cut_month)]
    assert sum(result.already_held.values()) == len(held) > 0
    for (dataset, timeframe, symbol, day), (frame, _, _) in days.items():
        month = Lake(root).read_month(dataset, EXCHANGE, timeframe, symbol, day)
        assert month.frame["ts"].is_unique().all()  # no day stored twice
        assert month.day(day).height == frame.height


def test_resumes_after_a_cut_during_deletion(root, days, monkeypatch):
    real = migrate_module._remove_day_folder
    removed = []

    def cut_after_three(folder):
        if len(removed) == 3:
            # Killed between deleting a day file and its folder.
            raise KeyboardInterrupt
        real(folder)
        removed.append(folder)

    monkeypatch.setattr(migrate_module, "_remove_day_folder", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        migrate(root)
    monkeypatch.setattr(migrate_module, "_remove_day_folder", real)
    assert 0 < len(date_folders(root)) < 8 + 6 + 2

    result = migrate(root)

    check_migrated(root, days)
    assert result.converted == 8 + 6 - 4
    assert sum(result.already_held.values()) == result.converted


def test_a_month_file_holding_a_day_identically_is_kept(root, days):
    """The pipeline (or a run cut short) already stored a day the day file holds."""
    lake = Lake(root)
    frame, report, gaps = days["ohlcv", "1m", "ETH-USDT", DAYS[2]]
    lake.write_month(
        "ohlcv", EXCHANGE, "1m", "ETH-USDT", DAYS[2], {DAYS[2]: DayData(frame, report, gaps)}
    )

    result = migrate(root)

    assert result.already_held == {"ohlcv": 1, "bars": 0}
    check_migrated(root, days)


def write_other_rows(root: Path, days, day: date) -> Path:
    """A day file holding another day's rows (its footer hash matching them)."""
    frame, report, gaps = days["ohlcv", "1m", "BTC-USDT", DAYS[1]]
    path = legacy_path(root, "ohlcv", "1m", "BTC-USDT", day)
    write_legacy(path, frame, report, gaps)
    return path


def write_impossible_date(root: Path, days) -> Path:
    frame, report, gaps = days["ohlcv", "1m", "BTC-USDT", DAYS[1]]
    path = root / SYMBOL / "date=2021-13-45" / "data.parquet"
    write_legacy(path, frame, report, gaps)
    return path.parent


def write_null_ts(root: Path, days) -> Path:
    frame, report, gaps = days["ohlcv", "1m", "ETH-USDT", DAYS[0]]
    ts = pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise("ts").alias("ts")
    path = legacy_path(root, "ohlcv", "1m", "ETH-USDT", DAYS[0])
    write_legacy(path, frame.with_columns(ts), report, gaps)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 this is no parquet file")
    return path


def write_without_report(root: Path, days) -> Path:
    frame = days["bars", "5m", "ETH-USDT", DAYS[2]][0]
    path = legacy_path(root, "bars", "5m", "ETH-USDT", DAYS[2])
    write_parquet_atomic(path, frame.to_arrow(), {})
    return path


def write_without_hash(root: Path, days) -> Path:
    frame = days["bars", "5m", "ETH-USDT", DAYS[2]][0]
    path = legacy_path(root, "bars", "5m", "ETH-USDT", DAYS[2])
    write_parquet_atomic(path, frame.to_arrow(), {REPORT_KEY: b'{"bars": 288}'})
    return path


def write_tampered(root: Path, days) -> Path:
    """Rows that are not the ones its footer's content hash describes."""
    frame, report, _ = days["ohlcv", "1m", "ETH-USDT", DAYS[1]]
    path = legacy_path(root, "ohlcv", "1m", "ETH-USDT", DAYS[1])
    footer = {
        REPORT_KEY: json.dumps(
            {**report, "content_hash": content_hash(frame)}, default=str
        ).encode()
    }
    write_parquet_atomic(path, frame.with_columns(pl.col("close") * 1.0001).to_arrow(), footer)
    return path


def write_conflicting_month(root: Path, days) -> Path:
    """May's month file already holds 05-01 with other rows than its day file."""
    frame, report, gaps = days["ohlcv", "1m", "ETH-USDT", DAYS[2]]
    Lake(root).write_month(
        "ohlcv", EXCHANGE, "1m", "ETH-USDT", DAYS[2],
        {DAYS[2]: DayData(frame.with_columns(pl.col("close") * 2), report, gaps)},
    )  # fmt: skip
    return legacy_path(root, "ohlcv", "1m", "ETH-USDT", DAYS[2])


def write_other_columns(root: Path, days) -> Path:
    """Two feature days of one month whose columns differ: one month file cannot hold both."""
    bars = days["bars", "5m", "BTC-USDT", DAYS[0]][0].select("ts", "close")
    report = {"timeframe": "5m", "rows": bars.height}
    write_legacy(legacy_path(root, "features", "5m", "BTC-USDT", DAYS[0]), bars, report, None)
    other = days["bars", "5m", "BTC-USDT", DAYS[1]][0].select("ts", "close", "volume")
    path = legacy_path(root, "features", "5m", "BTC-USDT", DAYS[1])
    write_legacy(path, other, report, None)
    return path


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def write_text(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("hello")
    return path


SYMBOL = Path("ohlcv", f"exchange={EXCHANGE}", "timeframe=1m", "symbol=BTC-USDT")
STRAYS = {
    "impossible date": write_impossible_date,
    "date not spelled YYYY-MM-DD": lambda root, days: mkdir(root / SYMBOL / "date=20210428"),
    "a row without ts": write_null_ts,
    "rows of another day": lambda root, days: write_other_rows(root, days, date(2021, 4, 28)),
    "no report in the footer": write_without_report,
    "no content hash in the report": write_without_hash,
    "rows differ from the footer's hash": write_tampered,
    "unreadable parquet": lambda root, days: write_garbage(
        legacy_path(root, "bars", "5m", "BTC-USDT", date(2021, 5, 3))
    ),
    "unknown folder in a symbol": lambda root, days: mkdir(root / SYMBOL / "weird"),
    "date folder without its data file": lambda root, days: write_text(
        root / SYMBOL / "date=2021-04-28" / "notes.txt"
    ),
    "other file beside a day file": lambda root, days: write_text(
        legacy_path(root, "bars", "5m", "ETH-USDT", DAYS[0]).with_name("data.parquet.bak")
    ),
    "file in a dataset folder": lambda root, days: write_text(root / "features" / "README"),
    "unknown level": lambda root, days: mkdir(root / "bars" / f"exchange={EXCHANGE}" / "tf=5m"),
    "bad month folder": lambda root, days: mkdir(root / SYMBOL / "month=2021-13"),
    "month file with another version of a day": write_conflicting_month,
    "columns differ within a month": write_other_columns,
}


@pytest.mark.parametrize("stray", STRAYS)
def test_refuses_a_lake_it_does_not_understand_and_changes_nothing(root, days, stray):
    culprit = STRAYS[stray](root, days)
    before = snapshot(root)

    with pytest.raises(LakeError) as refused:
        migrate(root)

    # The culprit first, then what is wrong with it.
    assert str(refused.value).startswith(f"cannot migrate: {culprit}: ")
    assert str(refused.value).endswith("; nothing was changed")
    assert snapshot(root) == before


def test_refuses_a_root_that_does_not_exist(tmp_path):
    with pytest.raises(LakeError, match="no such folder"):
        migrate(tmp_path / "nowhere")


def test_a_root_without_datasets_has_nothing_to_migrate(tmp_path):
    (tmp_path / "lake" / "markets").mkdir(parents=True)
    result = migrate(tmp_path / "lake")
    assert result.converted == 0
    assert "nothing to migrate" in result.summary()


def test_a_mismatch_after_writing_keeps_the_day_files(root, monkeypatch):
    real = Lake.write_month

    def lossy(self, dataset, exchange, timeframe, symbol, month, days):
        # A month file that loses a day's last row.
        day = max(days)
        cut = {**days, day: DayData(days[day].frame.head(-1), days[day].report, days[day].gaps)}
        return real(self, dataset, exchange, timeframe, symbol, month, cut)

    monkeypatch.setattr(Lake, "write_month", lossy)
    before = date_folders(root)
    with pytest.raises(LakeError, match="content hash") as failed:
        migrate(root)
    assert "date=2021-04-30" in str(failed.value)
    assert date_folders(root) == before


def test_survey_writes_nothing(root):
    before = snapshot(root)
    found = survey(root)
    assert sum(len(plan.days) for plan in found.months) == 8 + 6
    assert snapshot(root) == before


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLESTACK_")}
    return {**env, **extra}


def test_cli(root, days):
    done = subprocess.run(
        [sys.executable, "-m", "candlestack.migrate", str(root)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ohlcv: 8 day files converted into 4 month files" in done.stdout
    assert "bars: 6 day files converted into 4 month files" in done.stdout
    assert "verified: every day's content hash unchanged" in done.stdout
    check_migrated(root, days)

    # The configured lake by default; a second run has nothing to do.
    again = subprocess.run(
        [sys.executable, "-m", "candlestack.migrate"],
        cwd=REPO, env=cli_env(CANDLESTACK_LAKE=str(root)), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "nothing to migrate" in again.stdout


def test_cli_refuses_a_bad_lake(root):
    culprit = mkdir(root / SYMBOL / "weird")
    before = snapshot(root)
    done = subprocess.run(
        [sys.executable, "-m", "candlestack.migrate", str(root)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert str(culprit) in done.stderr
    assert done.stdout == ""
    assert snapshot(root) == before
