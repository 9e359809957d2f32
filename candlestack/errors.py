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
