"""Thin Dagster asset and check definitions; the computation lives in candlestack/."""

import warnings

import dagster as dg

# BackfillPolicy is what makes a range backfill one run; Dagster still flags it beta on every
# load, which buries real warnings in each CLI call and run log.
warnings.filterwarnings("ignore", message=".*`backfill_policy`.*", category=dg.BetaWarning)
