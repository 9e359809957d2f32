"""One exception hierarchy; every message names the exchange, symbol, day or file at fault."""


class CandlestackError(Exception):
    """Base of every error candlestack raises on purpose."""


class ConfigError(CandlestackError):
    """A setting a user wrote is wrong; raised at load time, not at night."""


class SourceError(CandlestackError):
    """A source cannot deliver candles (after retries, or for a reason retries cannot fix)."""


class SourceFormatError(SourceError):
    """A recorded file cannot be read as candles."""


class LakeError(CandlestackError):
    """The lake cannot be read or written."""


class FeatureInputError(CandlestackError):
    """Bars handed to feature computation cannot be used as they are (nulls, unsorted ts)."""


class LedgerError(CandlestackError):
    """The dry-run ledger cannot be opened, migrated or written as asked."""


class DamagedFileError(LakeError):
    """A lake file cannot be decoded, or its rows are not the ones its footer describes."""

    def __init__(self, path: object, reason: str, identity: tuple | None = None) -> None:
        super().__init__(f"{path} is damaged: {reason}")
        self.path = path
        self.reason = reason
        # What the file was when judged (inode, size, mtime): only that file is moved aside.
        self.identity = identity


class BackupError(LedgerError):
    """A ledger backup cannot be written, read or restored as asked."""


class BrokenChainError(BackupError):
    """A ledger (or its backup) whose audit chain does not verify: refused, never copied."""

    def __init__(self, what: object, problems: list[str]) -> None:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        super().__init__(f"{what}: the audit chain does not verify ({len(problems)}): {shown}")
        self.problems = problems
