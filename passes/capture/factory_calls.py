"""Tensor factories and size methods called with traced sizes: ``torch.ones(batch_size, n)``,
``buffer.expand(batch_size, -1, 1)``.

torch's argument parser takes no ``torch.fx`` proxy as a size, so a forward that builds a tensor from its
input's shape (timm's Gemma4 patch embedding: ``torch.ones(batch_size, pH * pW)``) fails to trace with
"ones() takes 1 positional argument but 2 were given". Shape-aware tracing keeps sizes symbolic (a proxy
does not convert to an int, or the batch size would be specialised), so while it traces, the factories
below record a ``call_function`` node when an argument is a proxy, and otherwise run as they are. The
same holds for the size methods of a tensor that is not traced (a buffer torch.fx reads as a constant:
Gemma4's rotary ``inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)``): a ``call_method``
node on that tensor (a constant of the graph).

Random draws (:data:`RANDOM_FACTORIES`) are graph nodes in every trace, shape-aware or not, whatever their
arguments: run while tracing, ``torch.rand(())`` would be one constant of the graph, and a branch on it
(LayerDrop's ``if self.training and torch.rand(()) < p``) one fixed path in every training step. As a node, a
branch on it is refused like any branch on tensor values (that module stays one call), and noise is drawn
anew on every call.

Equivalence: the node calls the same function with the same arguments when the graph runs. Only the
names of ``torch`` and ``torch.Tensor`` below are patched, for the duration of one trace.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import Attribute, Proxy

#: the ``torch`` factories whose size arguments may be traced values
FACTORIES = ("ones", "zeros", "empty", "full", "arange", "rand", "randn", "randint", "eye", "tensor")
#: the ``torch`` factories that draw random values: a graph node in every trace, whatever their arguments
RANDOM_FACTORIES = ("rand", "randn", "randint", "randperm", "normal")
#: the ``torch.Tensor`` methods whose size arguments may be traced values
SIZE_METHODS = ("expand", "view", "reshape", "repeat", "tile", "broadcast_to", "unflatten", "new_ones", "new_zeros",
                "new_full", "new_empty")


def _has_proxy(value: Any) -> bool:
    if isinstance(value, (Proxy, Attribute)):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_proxy(v) for v in value)
    if isinstance(value, dict):
        return any(_has_proxy(v) for v in value.values())
    return False


def _recording(tracer: fx.Tracer, fn: Callable[..., Any], always: bool = False) -> Callable[..., Any]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> Any:
        concrete = getattr(tracer, "concrete", None)
        if (always and not (concrete is not None and concrete.running)) or _has_proxy((args, kwargs)):
            return tracer.create_proxy("call_function", fn, args, kwargs)
        return fn(*args, **kwargs)

    return factory


def _recording_method(tracer: fx.Tracer, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _has_proxy((args, kwargs)):
            return tracer.create_proxy("call_method", name, (self, *args), kwargs)
        return fn(self, *args, **kwargs)

    return method


@contextlib.contextmanager
def recorded_factories(tracer: fx.Tracer, random_only: bool = False) -> Iterator[None]:
    """While the block runs, ``torch.<factory>(...)`` and ``tensor.<size method>(...)`` with a traced
    argument become graph nodes, and every random draw (:data:`RANDOM_FACTORIES`); ``random_only``: only those."""
    names = RANDOM_FACTORIES if random_only else tuple(dict.fromkeys(FACTORIES + RANDOM_FACTORIES))
    functions = {name: getattr(torch, name) for name in names}
    methods = {} if random_only else {name: getattr(torch.Tensor, name) for name in SIZE_METHODS}
    try:
        for name, fn in functions.items():
            setattr(torch, name, _recording(tracer, fn, always=name in RANDOM_FACTORIES))
        for name, fn in methods.items():
            setattr(torch.Tensor, name, _recording_method(tracer, name, fn))
        yield
    finally:
        for name, fn in functions.items():
            setattr(torch, name, fn)
        for name, fn in methods.items():
            setattr(torch.Tensor, name, fn)
