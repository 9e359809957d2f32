"""Finding a strategy class by name: built in, a Python entry point, or `module:Class`."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from candlestack.strategies.base import Strategy
from candlestack.strategies.builtin import BUILTIN

ENTRY_POINT_GROUP = "candlestack.strategies"


def resolve(reference: str) -> type[Strategy]:
    """The Strategy subclass `reference` names; ValueError saying what was tried otherwise.

    Looked up in order: a built-in name (mean_reversion, breakout, ma_cross), an entry point
    of group `candlestack.strategies` in an installed package, then `package.module:Class`
    (or `package.module.Class`) importable from the Python path.
    """
    if reference in BUILTIN:
        return BUILTIN[reference]
    for point in entry_points(group=ENTRY_POINT_GROUP, name=reference):
        return _checked(point.load(), reference)
    module_name, _, attribute = reference.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(
            f"unknown strategy {reference!r}: not built in ({', '.join(BUILTIN)}), "
            f"not an entry point of group {ENTRY_POINT_GROUP!r}, and not a 'module:Class' path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"strategy {reference!r}: cannot import {module_name!r}: {exc}") from exc
    if not hasattr(module, attribute):
        raise ValueError(f"strategy {reference!r}: module {module_name!r} has no {attribute!r}")
    return _checked(getattr(module, attribute), reference)


def _checked(candidate: object, reference: str) -> type[Strategy]:
    if not (isinstance(candidate, type) and issubclass(candidate, Strategy)):
        raise ValueError(
            f"strategy {reference!r} is {candidate!r}, not a subclass of "
            "candlestack.strategies.Strategy"
        )
    return candidate
