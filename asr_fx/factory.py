"""Models built from a ``"package.module:function"`` factory, remembered so a checkpoint can rebuild them.

Every failure is a :class:`FactoryError` naming the factory (``.factory``); a keyword the factory does
not take also names the keyword (``.keyword``), its nearest match (``.suggestion``) and the keywords
it takes (``.accepted``), so a caller can phrase the way out in its own terms.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from asr_fx.errors import FactoryError


def import_factory(spec: str) -> Any:
    """``"package.module:attr"`` -> the object (``attr`` may be dotted)."""
    if ":" not in spec:
        raise FactoryError(f"factory {spec!r} should look like 'package.module:function'", factory=spec)
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise FactoryError(f"cannot import factory {spec!r}: {type(exc).__name__}: {exc} "
                           "(is the package installed, or its folder on PYTHONPATH?)", factory=spec) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise FactoryError(f"cannot import factory {spec!r}: {module_name!r} has no {attr!r}{hint}",
                               factory=spec, suggestion=near[0] if near else None) from None
    return obj


def _accepted(signature: inspect.Signature) -> list[str]:
    return [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_factory_kwargs(factory: str, fn: Any, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments ``fn`` does not take, naming the factory, the keyword and its nearest match."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: let the call say
        return
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    accepted = _accepted(signature)
    wrong = [k for k in kwargs if k not in signature.parameters] if not takes_any else []
    if wrong:
        near = difflib.get_close_matches(wrong[0], accepted, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise FactoryError(
            f"factory {factory!r} does not take the keyword argument {wrong[0]!r}{hint} It takes "
            f"({', '.join(accepted)}): fix factory_kwargs",
            factory=factory, keyword=wrong[0], suggestion=near[0] if near else None, accepted=accepted)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise FactoryError(f"factory {factory!r} cannot be called with {kwargs}: {exc}; it takes "
                           f"({', '.join(accepted)}): fix factory_kwargs",
                           factory=factory, accepted=accepted) from None


def build(factory: str, **kwargs: Any) -> nn.Module:
    """Build a model from ``"package.module:function"`` and remember how, so :func:`save` can record it.

    Raises :class:`FactoryError` (one line, naming the factory) when it cannot be imported, is not
    callable, refuses a keyword, raises, or returns something that is not an ``nn.Module``."""
    fn = import_factory(factory)
    if not callable(fn):
        raise FactoryError(f"factory {factory!r} is a {type(fn).__name__}, not a function or class that builds a "
                           "model", factory=factory)
    check_factory_kwargs(factory, fn, kwargs)
    try:
        model = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the factory is user code: name it and its first line
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise FactoryError(f"factory {factory!r} raised {type(exc).__name__}: {first}".rstrip(": "),
                           factory=factory) from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"factory {factory!r} returned {type(model).__name__}, not an nn.Module", factory=factory)
    model.__dict__["_asr_fx_factory"] = {"factory": factory, "kwargs": kwargs}  # a plain attribute, not a module
    return model
