"""Global pooling, recognised by what it computes: which trailing dimensions a node reduces to one
value per channel.

Global: ``AdaptiveAvg/MaxPool`` to 1 (module or ``F.adaptive_*_pool(x, 1)``); ``x.mean(dims)`` /
``x.amax(dims)`` over the trailing (spatial) dims; and a windowed ``avg/max_pool`` whose window
covers the whole map, by the recorded output shape (``nn.AvgPool2d(8)`` on an 8x8 map, when shapes
were propagated) or by a window read from the input's own spatial size (``F.avg_pool2d(x, x.size()[2:])``).
Refused: any pooling with padding, and windows that leave more than one cell.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.graph_queries import module_of, output_rank

_POOL_MODULES_DIMS = {
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_POOL_FUNCTIONS_DIMS = {
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    torch.adaptive_avg_pool1d: 1,
}
#: windowed poolings, global when their window covers the input (see :func:`_window_is_global`)
_WINDOW_POOL_MODULES_DIMS = {
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3, nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
}
_WINDOW_POOL_FUNCTIONS_DIMS = {
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
}
_REDUCE_FUNCTIONS = (torch.mean, torch.amax)
_REDUCE_METHODS = ("mean", "amax")

def _is_one(size: Any) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and len(size) > 0 and all(s == 1 for s in size)


def _reads_spatial_size(node: Any, x: fx.Node) -> bool:
    """``node`` is a spatial size of ``x`` (``x.size(2)``, ``x.shape[-1]``) or all of them (``x.size()[2:]``)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is x and len(node.args) == 2:
        return isinstance(node.args[1], int) and (node.args[1] >= 2 or node.args[1] < 0)
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        whole = node.args[0]
        is_shape = (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1
                    and whole.args[0] is x) or (whole.op == "call_function" and whole.target is getattr
                                                and whole.args[0] is x and whole.args[1] == "shape")
        index = node.args[1]
        first = index.start if isinstance(index, slice) and index.stop is None and index.step is None else index
        return is_shape and isinstance(first, int) and (first >= 2 or first < 0)
    return False


def _window_is_global(node: fx.Node, dims: int, padding: Any) -> bool:
    """A windowed pooling leaves one cell per channel: by the recorded output shape, or (without shapes)
    by a window read from its input's own spatial size (``F.avg_pool2d(x, x.size()[2:])``; a single
    ``x.size(2)`` pools square maps, as code that writes it assumes)."""
    if padding not in (0, None) and not (isinstance(padding, (tuple, list)) and not any(padding)):
        return False
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is not None:
        return len(shape) > dims and all(int(s) == 1 for s in shape[-dims:])
    if node.op != "call_function" or not isinstance(node.args[0], fx.Node):
        return False
    x = node.args[0]
    kernel = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size")
    if isinstance(kernel, (tuple, list)):
        return len(kernel) == dims and all(_reads_spatial_size(k, x) for k in kernel)
    return _reads_spatial_size(kernel, x)


def pooled_dims(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """How many trailing dims ``node`` pools globally (keeping them as size 1 or dropping them), else ``None``."""
    module = module_of(gm, node)
    if module is not None:
        for cls, dims in _POOL_MODULES_DIMS.items():
            if isinstance(module, cls):
                return dims if _is_one(module.output_size) else None
        for cls, dims in _WINDOW_POOL_MODULES_DIMS.items():
            if isinstance(module, cls):
                return dims if _window_is_global(node, dims, module.padding) else None
        return None
    if node.op == "call_function" and node.target in _WINDOW_POOL_FUNCTIONS_DIMS:
        dims = _WINDOW_POOL_FUNCTIONS_DIMS[node.target]
        padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
        return dims if _window_is_global(node, dims, padding) else None
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS_DIMS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _POOL_FUNCTIONS_DIMS[node.target] if _is_one(size) else None
    if (node.op == "call_function" and node.target in _REDUCE_FUNCTIONS) or (
        node.op == "call_method" and node.target in _REDUCE_METHODS
    ):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        if any(0 <= d < 2 for d in dims):
            return None  # the batch or the channel dimension: not a spatial pooling
        rank = output_rank(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if rank is not None:
            dims = [d - rank if d >= 0 else d for d in dims]
        elif any(d >= 0 for d in dims):
            # without shapes assume the reduced dims are the trailing ones (NCHW: dim=(2, 3))
            dims = [d - (max(dims) + 1) if d >= 0 else d for d in dims]
        if sorted(dims) != list(range(-len(dims), 0)):
            return None  # not the trailing (spatial) dims
        return len(dims)
    return None


__all__ = ["pooled_dims"]
