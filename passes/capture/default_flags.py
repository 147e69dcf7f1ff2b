"""The flag arguments of a traced forward: captured at their defaults (:func:`default_flags`)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

#: defaults of these types are option flags (``return_dict=None``, ``*, features_only=False``), not inputs
_FLAG_TYPES = (type(None), bool, int, float, str)


def default_flags(model: nn.Module) -> dict[str, Any]:
    """Arguments of ``model.forward`` after the first that default to a flag value (None/bool/number/str):
    the captured graph computes ``forward(input)`` with them at their defaults (a call that passes another
    value fails on an assertion torch.fx puts in the graph, never computes something else). ``use_cache=None``
    (transformers' decoders: "as the config says") is taken as ``False``: the captured model returns no
    key/value cache (an object, not a tensor), and a call asking for one fails on that assertion."""
    try:
        params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    flags = {}
    for i, p in enumerate(params):
        if i == 0 or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if isinstance(p.default, _FLAG_TYPES):
            flags[p.name] = p.default
    if "use_cache" in flags and flags["use_cache"] is None:
        flags["use_cache"] = False  # a key/value cache object is no graph value; a call with use_cache=True fails
    return flags
