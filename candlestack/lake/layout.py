"""Where each file of the lake lives: the one place that knows the path layout (hive
folders by dataset, exchange, timeframe, symbol and UTC month), and the month files'
read-modify-write locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
from datetime import date, timedelta
from pathlib import Path

from upath import UPath

from candlestack.lake.files import FILE_NAME, LakePath
from candlestack.lake.s3 import S3_SCHEME, S3Store, s3_root

# Lock files of the month files' read-modify-writes, apart from the data; removed after use.
LOCK_FOLDER = "_locks"

# Every file of a kind, as a glob under a lake root (what the catalog's views read).
FILES = {
    **{
        dataset: f"{dataset}/exchange=*/timeframe=*/symbol=*/month=*/{FILE_NAME}"
        for dataset in ("ohlcv", "bars", "features")
    },
    "markets": f"markets/exchange=*/date=*/{FILE_NAME}",
    # Backtest and sweep outputs: one folder per run, named by the hash of its inputs.
    "trades": "backtests/strategy=*/run=*/trades.parquet",
    "backtest_metrics": "backtests/strategy=*/run=*/metrics.parquet",
    "sweep_results": "sweeps/sweep=*/run=*/results.parquet",
}


class LakeLayout:
    """The paths of one lake root: a local folder, or an s3://bucket/prefix."""

    def __init__(self, root: LakePath | str) -> None:
        text = str(root)
        self.root: LakePath = s3_root(text) if text.startswith(S3_SCHEME) else Path(root)

    @property
    def filesystem(self) -> S3Store | None:
        """The object store's fsspec filesystem (DuckDB needs it registered to read the
        lake); None for a local folder."""
        return self.root.fs if isinstance(self.root, UPath) else None

    @property
    def location(self) -> str:
        """The root as DuckDB and polars address it: an absolute folder, or the s3:// URL."""
        return str(self.root) if isinstance(self.root, UPath) else str(self.root.resolve())

    def holds(self, kind: str) -> bool:
        """Whether the lake has any file of a kind (a key of FILES)."""
        return any(self.root.glob(FILES[kind]))

    def files_url(self, kind: str) -> str:
        """The glob of every file of a kind, as DuckDB and polars address it."""
        return f"{self.location}/{FILES[kind]}"

    def markets_path(self, exchange: str, day: date) -> LakePath:
        return (
            self.root / "markets" / f"exchange={exchange}" / f"date={day.isoformat()}" / FILE_NAME
        )

    def _symbol_folder(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str
    ) -> LakePath:
        return (
            self.root
            / dataset
            / f"exchange={exchange}"
            / f"timeframe={timeframe}"
            / f"symbol={symbol_key}"
        )

    def month_path(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str, month: date
    ) -> LakePath:
        """The file of one dataset ("ohlcv", "bars", "features"), exchange, timeframe, symbol
        and UTC month (any day of it)."""
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return folder / f"month={month:%Y-%m}" / FILE_NAME

    @contextlib.contextmanager
    def month_lock(self, dataset: str, exchange: str, timeframe: str, symbol_key: str, month: date):
        """Hold a month file's lock across a read-modify-write of it: the live collector and
        the minutely REST top-up both rewrite the open month, and without it the second
        writer would replace the first one's minutes with its older copy. An advisory
        flock, across the processes of a host; an object store has no such lock, so there one
        writer of the open month (the collector, or the schedule) must run at a time."""
        if isinstance(self.root, UPath):
            yield
            return
        folder = self.root / LOCK_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / f"{dataset}.{exchange}.{timeframe}.{symbol_key}.{month:%Y-%m}.lock"
        while True:
            handle = open(lock, "a")  # noqa: SIM115 -- held until the lock is released
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            # The holder before us removed the file after its write: lock the new one.
            handle.close()
        try:
            yield
        finally:
            # Removed while still held, so the lake keeps no lock files between writes.
            lock.unlink(missing_ok=True)
            handle.close()

    def month_files(
        self, dataset: str, exchange: str, timeframe: str, symbol_key: str
    ) -> dict[date, LakePath]:
        """Every stored month: first day of the month -> file, in month order."""
        folder = self._symbol_folder(dataset, exchange, timeframe, symbol_key)
        return {
            month_of(path.parent.name.removeprefix("month=")): path
            for path in sorted(folder.glob(f"month=*/{FILE_NAME}"))
        }

    def symbol_keys(self, dataset: str, exchange: str, timeframe: str) -> list[str]:
        base = self.root / dataset / f"exchange={exchange}" / f"timeframe={timeframe}"
        return sorted(p.name.removeprefix("symbol=") for p in base.glob("symbol=*"))

    def backtest_folder(self, strategy: str, run_id: str) -> LakePath:
        return self.root / "backtests" / f"strategy={strategy}" / f"run={run_id}"

    def sweep_path(self, sweep: str, run_id: str) -> LakePath:
        return self.root / "sweeps" / f"sweep={sweep}" / f"run={run_id}" / "results.parquet"

    def files(self) -> list[LakePath]:
        """Every Parquet file of the lake, in path order (moved-aside and temp files are
        not named *.parquet)."""
        return sorted(self.root.glob("**/*.parquet"))


def month_of(day: date | str) -> date:
    """The first day of the UTC month of `day` (a date, or ISO text: 2021-04 or 2021-04-25)."""
    if isinstance(day, str):
        day = date.fromisoformat(day if len(day) > 7 else f"{day}-01")
    return day.replace(day=1)


def month_days(month: date) -> list[date]:
    """Every day of the month of `month`."""
    first = month_of(month)
    following = (first + timedelta(days=32)).replace(day=1)
    return [first + timedelta(days=i) for i in range((following - first).days)]
