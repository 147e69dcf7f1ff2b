"""Custom ``torch.autograd.Function`` calls stay opaque calls in a traced graph (never inlined).

torch.fx traces ``MyFunction.apply(x)`` by running ``MyFunction.forward`` on the proxies, which
records the forward's operations and drops the Function's ``backward``: a straight-through
estimator (forward ``w.sign()``, backward the identity) would then train with zero gradient,
a gradient reversal layer would stop reversing. While :func:`functions_kept_opaque` is active, a
``Function.apply`` that receives a proxy becomes one ``call_function`` node whose target calls
``MyFunction.apply``, so the captured graph runs the Function itself: its forward and its backward.

Equivalence: the node computes exactly what the Function computes (the same ``apply``), values and
gradients. Functions whose arguments torch.fx cannot put in a graph (a callable, as
``torch.utils.checkpoint`` passes) are traced through as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

#: per Function class, the callable a graph node targets (one object per class: graphs compare targets)
_CALLS: dict[type, Callable[..., Any]] = {}
#: attribute of such a callable naming its Function class
FUNCTION_ATTR = "asr_fx_autograd_function"


def function_call(cls: type) -> Callable[..., Any]:
    """The graph target that calls ``cls.apply`` (named ``<Class>_apply`` in generated code)."""
    call = _CALLS.get(cls)
    if call is None:
        def call(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)  # type: ignore[attr-defined]

        call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
        call.__module__ = __name__
        setattr(call, FUNCTION_ATTR, cls)
        _CALLS[cls] = call
    return call


def autograd_function_of(target: Any) -> type | None:
    """The ``torch.autograd.Function`` class a ``call_function`` target calls, or ``None``."""
    return getattr(target, FUNCTION_ATTR, None)


@contextlib.contextmanager
def functions_kept_opaque() -> Iterator[None]:
    """Inside the block, ``Function.apply`` on proxies records one node instead of tracing the forward."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        return original.__get__(None, cls)(*args, **kwargs)

    def opaque_apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)]
        if not proxies:
            return apply(cls, *args, **kwargs)
        try:
            return proxies[0].tracer.create_proxy("call_function", function_call(cls), args, kwargs)
        except NotImplementedError:  # an argument a graph cannot hold (a callable): trace through
            return apply(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(opaque_apply)  # type: ignore[assignment, method-assign]
    try:
        yield
    finally:
        torch.autograd.Function.apply = original  # type: ignore[method-assign]
