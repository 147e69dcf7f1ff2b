"""``leaf_modules`` as plain data: what :func:`asr_fx.instrument` records in the config, so :func:`asr_fx.fuse`,
``fuse(..., into=)`` and the CLI trace the model with the same opaque modules without being told again.

A module path stays a string; a class is written ``"package.module:Class"`` and imported back. A predicate
(a function) cannot be recorded: it is left out, and ``fuse`` needs ``leaf_modules=`` again for it.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from asr_fx.config import asr_config


def record_leaves(leaf_modules: Any) -> list[str] | None:
    """``leaf_modules`` as strings (paths, and ``"package.module:Class"`` for classes), or ``None``."""
    if leaf_modules is None or (callable(leaf_modules) and not isinstance(leaf_modules, type)):
        return None
    items = [leaf_modules] if isinstance(leaf_modules, (str, type)) else list(leaf_modules)
    recorded = []
    for item in items:
        if isinstance(item, str):
            recorded.append(item)
        elif isinstance(item, type):
            recorded.append(f"{item.__module__}:{item.__qualname__}")
    return recorded or None


def _resolve(item: str) -> str | type:
    if ":" not in item:
        return item
    module_name, _, qualname = item.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return item  # not importable here (a class defined in a script): kept by name, matches nothing
    return found


def recorded_leaves(model: nn.Module) -> list[str | type] | None:
    """The ``leaf_modules`` :func:`asr_fx.instrument` recorded on ``model`` (classes imported), or ``None``."""
    config = asr_config(model)
    recorded = getattr(config, "leaf_modules", None) if config is not None else None
    return [_resolve(item) for item in recorded] if recorded else None


__all__ = ["record_leaves", "recorded_leaves"]
