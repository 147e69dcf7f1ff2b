"""Models built from a ``"package.module:function"`` factory, remembered so a checkpoint can rebuild them."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from torch import nn

from asr_fx.errors import CheckpointError


def import_factory(spec: str) -> Any:
    """``"package.module:attr"`` -> the object (``attr`` may be dotted)."""
    if ":" not in spec:
        raise CheckpointError(f"factory {spec!r} should look like 'package.module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"cannot import factory {spec!r}: {type(exc).__name__}: {exc} "
                              "(is the package installed, or its folder on PYTHONPATH?)") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise CheckpointError(f"cannot import factory {spec!r}: {module_name!r} has no {attr!r}{hint}") from None
    return obj


def _check_factory_kwargs(factory: str, fn: Any, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments ``fn`` does not take, naming the factory, the keyword and the way out."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call say
        return
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        params = [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        wrong = [k for k in kwargs if k not in signature.parameters]
        near = {k: difflib.get_close_matches(k, params, n=1) for k in wrong}
        hints = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in near.items() if m)
        raise CheckpointError(
            f"factory {factory!r} does not accept the keyword arguments {kwargs}: {exc}{hints}; it takes "
            f"({', '.join(params)}): fix --factory-args (factory_kwargs=)"
        ) from None


def build(factory: str, **kwargs: Any) -> nn.Module:
    """Build a model from ``"package.module:function"`` and remember how, so :func:`save` can record it."""
    fn = import_factory(factory)
    _check_factory_kwargs(factory, fn, kwargs)
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"factory {factory!r} returned {type(model).__name__}, not an nn.Module")
    model._asr_fx_factory = {"factory": factory, "kwargs": kwargs}
    return model
