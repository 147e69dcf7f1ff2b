"""Structure reading for placement: a broadcast add of a pooled global context is not a residual branch.

GC / GE blocks add ``mlp(pool(x))`` (one value per channel, broadcast over space) to ``x``. That add
has the shape of a residual add, but its "branch" computes a global context, not a feature map: the
paper's residual site does not apply there. :func:`is_pooled_context` tells it apart: every path from
the branch's end back to where it splits from the shortcut passes through a global pooling.
"""

from __future__ import annotations

import torch.fx as fx

from .global_pooling import pooled_dims

#: reductions that pool a context too when they keep the reduced dims (``x.sum((2, 3), keepdim=True)``)
_KEEPDIM_REDUCTIONS = ("sum", "max")


def is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pooling to one value per channel (:func:`~.global_pooling.pooled_dims`), or a ``keepdim`` sum/max."""
    if pooled_dims(gm, node) is not None:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _KEEPDIM_REDUCTIONS and bool(node.kwargs.get("keepdim"))


def is_pooled_context(gm: fx.GraphModule, branch: fx.Node, start: fx.Node) -> bool:
    """Every path from ``branch`` back to ``start`` goes through a global pooling (``branch`` is a context)."""
    stack, seen = [branch], set()
    while stack:
        node = stack.pop()
        if node is start:
            return False
        if node in seen or is_global_pool(gm, node):
            continue
        seen.add(node)
        stack.extend(n for n in node.all_input_nodes if n.op != "get_attr")
    return True


__all__ = ["is_global_pool", "is_pooled_context"]
