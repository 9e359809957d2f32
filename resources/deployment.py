"""The deployment's settings, loaded once for the code location: the one place it reads them.

What Dagster needs when the definitions load (the partitions, the feature set's timeframes,
the exchange pool, the strategies) is read from `settings` here; pipelines/definitions.py
builds the resources from the same object, and assets read run-time values only through
those resources.
"""

from candlestack.config import load_settings

settings = load_settings()
