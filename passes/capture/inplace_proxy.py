"""In-place capture: ``a += b``, ``a -= b``, ``a *= b``, ``a /= b`` and ``a[i] = b`` traced as the in-place ops
they are.

``torch.fx.Proxy`` defines ``__add__``/``__mul__`` but no ``__iadd__``/``__imul__``, so Python falls
back to ``a = a * b``: the graph gets an out-of-place multiply and the write into ``a``'s storage
is lost, which is wrong wherever ``a``'s storage is read again (``z = y; z *= p; return z + y``
computes ``4 y`` for ``p = 2`` in eager, ``3 y`` in such a trace). :class:`InplaceProxy` records
``operator.iadd`` / ``isub`` / ``imul`` / ``itruediv`` instead; torch.fx prints them as ``a += b``
and so on, and running the graph writes in place as eager does. ``torch.fx.Proxy`` has no
``__setitem__`` at all (``attn[:, :, i:, i:] = ...``, MViTv2's relative positions, fails to trace);
it is recorded as ``operator.setitem(a, i, b)``, which writes into ``a`` when the graph runs. The fold
passes read them as in-place writes into their first argument (:mod:`asr_fx.passes.graph.aliases`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx


class InplaceProxy(fx.Proxy):
    """A ``torch.fx.Proxy`` whose augmented assignments are recorded as in-place ``call_function`` nodes."""

    def _inplace(self, target: Any, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    def __iadd__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.iadd, other)

    def __isub__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.isub, other)

    def __imul__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other: Any) -> fx.Proxy:
        return self._inplace(operator.itruediv, other)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})
