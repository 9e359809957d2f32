"""Thin Dagster asset and check definitions; the computation lives in candlestack/."""
