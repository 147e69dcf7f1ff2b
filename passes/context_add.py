"""Structure reading for placement: a broadcast add of a pooled global context is not a residual branch.

GC / GE blocks add ``mlp(pool(x))`` (one value per channel, broadcast over space) to ``x``. That add
has the shape of a residual add, but its "branch" computes a global context, not a feature map: the
paper's residual site does not apply there. :func:`is_pooled_context` tells it apart: every path from
the branch's end back to where it splits from the shortcut passes through a global pooling.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                   nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                       F.adaptive_max_pool2d, F.adaptive_max_pool3d)
_REDUCTIONS = ("mean", "amax", "sum", "max")


def _is_one(size: object) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A pooling to one value per channel: adaptive pooling to size 1, or a ``keepdim`` reduction."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, _ADAPTIVE_POOLS) and _is_one(module.output_size)
    if node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _is_one(size)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _REDUCTIONS and bool(node.kwargs.get("keepdim"))


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
