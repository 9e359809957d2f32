"""Check every file of a lake whole, and name the damaged ones:

    python -m candlestack.verify [--lake PATH] [--quarantine]

PATH defaults to the configured lake (CANDLESTACK_LAKE: a folder or s3://bucket/prefix).
Every Parquet file is read and decoded whole, its pages' checksums checked; a month file
(ohlcv, bars, features) also has its footer's report parsed and every day's rows re-hashed
against the content_hash stored for that day, so damage that decodes without an error (a
file written before page checksums) is found too. Each bad file is printed with why, then
the throughput. Exit status: 0 when every file is whole, 1 when any is bad, 2 when the lake
cannot be checked at all.

With --quarantine, damaged files are moved aside, never deleted, to
`{lake}/_quarantine/<their path under the lake>.<UTC time>`, as the pipeline's own reads do:
the next materialization of their partitions rebuilds them from the source. Files are
otherwise only read, so the pipeline may keep running.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from candlestack.config import load_settings
from candlestack.errors import CandlestackError, DamagedFileError, LakeError
from candlestack.lake import Lake, LakePath

MB = 1_000_000


@dataclass
class Verification:
    files: int = 0
    bytes: int = 0  # of the files read whole
    seconds: float = 0.0
    bad: dict[LakePath, str] = field(default_factory=dict)  # file -> why
    moved: dict[LakePath, LakePath] = field(default_factory=dict)  # file -> where it went

    def summary(self) -> str:
        seconds = max(self.seconds, 1e-9)
        moved = f", {len(self.moved)} moved to the quarantine" if self.moved else ""
        return (
            f"{self.files} files, {self.bytes / MB:.1f} MB checked in {self.seconds:.2f} s "
            f"({self.files / seconds:.0f} files/s, {self.bytes / MB / seconds:.1f} MB/s): "
            f"{len(self.bad)} bad{moved}"
        )


def verify(root: Path | str, quarantine: bool = False, out=print) -> Verification:
    """Check every Parquet file under `root`, printing each bad one through `out` as it is
    found; with `quarantine`, move the damaged ones aside."""
    lake = Lake(root)
    if isinstance(lake.root, Path) and not lake.root.is_dir():
        raise LakeError(f"no lake at {lake.root}: not a folder")
    result = Verification()
    started = time.perf_counter()
    for path in lake.files():
        result.files += 1
        try:
            result.bytes += lake.check_file(path)
            continue
        except DamagedFileError as damage:
            result.bad[path] = damage.reason
            target = lake.quarantine(damage) if quarantine else None
        except LakeError as exc:  # unreadable, or not a candlestack file: named, left alone
            result.bad[path] = str(exc)
            target = None
        if target is not None:
            result.moved[path] = target
        out(f"BAD {path}: {result.bad[path]}" + (f" (moved to {target})" if target else ""))
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m candlestack.verify",
        description="Decode every file of a lake and re-check its content hashes; name "
        "each damaged file.",
    )
    parser.add_argument(
        "--lake", help="a lake folder or s3://bucket/prefix (default: CANDLESTACK_LAKE)"
    )
    parser.add_argument(
        "--quarantine",
        action="store_true",
        help="move damaged files aside to <lake>/_quarantine/ (never deleted) so the next "
        "materialization rebuilds them",
    )
    args = parser.parse_args(argv)
    try:
        root = args.lake if args.lake is not None else load_settings().lake
        result = verify(root, args.quarantine)
    except CandlestackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 1 if result.bad else 0


if __name__ == "__main__":
    sys.exit(main())
