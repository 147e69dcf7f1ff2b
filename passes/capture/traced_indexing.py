"""Python on traced values that torch rejects, made traceable: indexing a buffer by a traced size, and
``torch.finfo``/``torch.iinfo`` of a traced dtype.

Indexing a real tensor (a buffer) with traced sizes records a graph node instead of failing.

torch.fx keeps buffers read in ``forward`` as real tensors, so ``self.position_ids[:, :seq_length]``
with a traced ``seq_length`` (BERT's embeddings) calls ``Tensor.__getitem__`` with a proxy inside a
slice, which torch rejects (``slice indices must be integers``). While :func:`indexing_traced` is
active, such an index records ``operator.getitem(buffer, index)``; torch.fx's ``create_arg`` turns the
buffer into a ``get_attr`` of its path (or a tensor constant).

Equivalence: the node computes the same indexing on the same tensor at run time.

With ``example_inputs`` (shape-aware tracing), ``torch.finfo(key.dtype)`` (transformers' sdpa path) takes the
dtype's value on the example, guarded in the graph by an assertion (:func:`dtype_info_traced`).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx


def _proxy_in(index: Any) -> fx.Proxy | None:
    items = index if isinstance(index, (tuple, list)) else (index,)
    for item in items:
        parts = (item.start, item.stop, item.step) if isinstance(item, slice) else (item,)
        for part in parts:
            if isinstance(part, fx.Proxy):
                return part
    return None


@contextlib.contextmanager
def indexing_traced() -> Iterator[None]:
    """Inside the block, ``tensor[... proxy ...]`` on a real tensor records a ``getitem`` node."""
    original = torch.Tensor.__getitem__

    def getitem(self: torch.Tensor, index: Any) -> Any:
        proxy = None if isinstance(self, fx.Proxy) else _proxy_in(index)
        if proxy is None:
            return original(self, index)
        return proxy.tracer.create_proxy("call_function", operator.getitem, (self, index), {})

    torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        torch.Tensor.__getitem__ = original  # type: ignore[method-assign]


def _dtype(value: Any) -> Any:
    """A dtype's own value (named: the refusal message says ``dtype()``)."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"expected a dtype, got {type(value).__name__}")
    return value


@contextlib.contextmanager
def dtype_info_traced(tracer: Any) -> Iterator[None]:
    """``torch.finfo``/``torch.iinfo`` take a traced dtype (``torch.finfo(key.dtype).min`` in transformers'
    sdpa path) when shape-aware: its value on the example, guarded."""
    originals = torch.finfo, torch.iinfo

    def wrap(info: Any) -> Any:
        def call(*args: Any) -> Any:
            if args and isinstance(args[0], (fx.Proxy, fx.proxy.Attribute)):
                return info(tracer.concrete_value(args[0], _dtype))  # guarded in the graph
            return info(*args)
        return call

    torch.finfo, torch.iinfo = wrap(originals[0]), wrap(originals[1])  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        torch.finfo, torch.iinfo = originals  # type: ignore[misc]
