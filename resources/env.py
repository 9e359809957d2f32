"""Settings that may hold credentials reach resources as dg.EnvVar."""

import os

import dagster as dg


def env_var_or(name: str, default: str | None) -> str | None:
    """dg.EnvVar(name) when the environment sets `name`: Dagster then records and shows the
    variable's name, never its value (a password, a proxy's credentials, a token). Otherwise
    `default`, the settings' own default, which holds no secret: an EnvVar of an unset
    variable would fail the resource's initialisation."""
    return dg.EnvVar(name) if os.environ.get(name) else default
