"""Scales spelled other than as a multiply become one, so the fold passes see (and fold or report) them.

- ``x / c`` (``operator.truediv``, ``torch.div``/``divide``/``true_divide``, ``Tensor.div``/``div_``,
  ``x /= c``) with ``c`` a constant tensor (a ``get_attr``; a Python number is arithmetic) and no
  ``rounding_mode`` becomes ``x * (1 / c)`` (``1 / c`` a new buffer ``_reciprocal_<node>``; skipped where
  it is not finite);
- ``torch.addcmul(y, a, b, value=k)`` with ``a`` or ``b`` a constant tensor becomes ``y + (a * b) * k``
  (``y + a * b`` without ``value``);
- ``torch.einsum("bchw,c->bchw", x, c)`` (two operands, the output spelled like the first, the second a
  constant whose letters appear in the first in the same order) becomes ``x * c.reshape(...)``, ``c`` put
  along its dimensions.

Equivalence: exact up to one rounding (``x * (1 / c)`` against ``x / c``), which the fuse self-check's noise
floor covers. Runs after :func:`~asr_fx.passes.constant_fold.fold_constants`, so a divisor computed from
parameters (``x / s.exp()``) is a ``get_attr`` by then. Modifies ``gm`` in place.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

from ..graph.graph_queries import fetch_attr
from ..infra import PassContext, PassResult

DIV_FUNCTIONS = (operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide)
DIV_METHODS = ("div", "div_", "divide", "divide_", "true_divide", "true_divide_")
_IN_PLACE = (operator.itruediv, "div_", "divide_", "true_divide_")


def is_scale_spelling(node: fx.Node) -> bool:
    """A division, ``addcmul`` or ``einsum`` that :func:`normalize_scale_spellings` may turn into a multiply."""
    return (node.op == "call_function" and node.target in (*DIV_FUNCTIONS, torch.addcmul, torch.einsum)) or \
        (node.op == "call_method" and node.target in (*DIV_METHODS, "addcmul"))


def _constant(gm: fx.GraphModule, value: object) -> torch.Tensor | float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        found = fetch_attr(gm, str(value.target))
        if isinstance(found, torch.Tensor) and found.is_floating_point():
            return found
    return None


def _division(gm: fx.GraphModule, node: fx.Node) -> bool:
    spelled = (node.op == "call_function" and node.target in DIV_FUNCTIONS) or \
        (node.op == "call_method" and node.target in DIV_METHODS)
    if not spelled or node.kwargs or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return False
    c = _constant(gm, node.args[1])
    if not isinstance(c, torch.Tensor):
        return False  # a number (``q / math.sqrt(d)``) is arithmetic, not a layer's scale
    value = (1.0 / c.detach()).clone()
    if not torch.isfinite(value).all():
        return False
    name = f"_reciprocal_{node.name}"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(node):
        reciprocal = gm.graph.get_attr(name)
    in_place = node.target in _IN_PLACE
    with gm.graph.inserting_before(node):
        if node.op == "call_method":
            mul = gm.graph.call_method("mul_" if in_place else "mul", (node.args[0], reciprocal))
        else:
            mul = gm.graph.call_function(operator.imul if in_place else operator.mul, (node.args[0], reciprocal))
    mul.meta = dict(node.meta)
    node.replace_all_uses_with(mul)
    gm.graph.erase_node(node)
    return True


def _addcmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not ((node.op == "call_function" and node.target is torch.addcmul) or
            (node.op == "call_method" and node.target == "addcmul")):
        return False
    if set(node.kwargs) - {"value"} or len(node.args) != 3:
        return False
    y, a, b = node.args
    value = node.kwargs.get("value", 1)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not any(isinstance(_constant(gm, t), torch.Tensor) for t in (a, b)):
        return False  # only a product with a constant tensor is a scale
    with gm.graph.inserting_before(node):
        product = gm.graph.call_function(operator.mul, (a, b))
        if value != 1:
            product = gm.graph.call_function(operator.mul, (product, value))
        total = gm.graph.call_function(operator.add, (y, product))
    for new in (product, total):
        new.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}
    total.meta = dict(node.meta)
    node.replace_all_uses_with(total)
    gm.graph.erase_node(node)
    return True


def _einsum(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is torch.einsum) or node.kwargs:
        return False
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return False
    match = re.fullmatch(r"\s*([a-z]+)\s*,\s*([a-z]+)\s*->\s*([a-z]+)\s*", equation)
    if match is None:
        return False
    first, second, out = match.groups()
    x, c_node = operands
    c = _constant(gm, c_node)
    if out != first or len(set(first)) != len(first) or not isinstance(c, torch.Tensor) or \
            not isinstance(x, fx.Node) or c.dim() != len(second):
        return False
    positions = [first.find(letter) for letter in second]
    if -1 in positions or positions != sorted(positions):
        return False
    shape = [1] * len(first)
    for pos, size in zip(positions, c.shape):
        shape[pos] = size
    name = f"_einsum_scale_{node.name}"
    gm.register_buffer(name, c.detach().reshape(shape).clone())
    with gm.graph.inserting_before(node):
        scale = gm.graph.get_attr(name)
        mul = gm.graph.call_function(operator.mul, (x, scale))
    mul.meta = dict(node.meta)
    node.replace_all_uses_with(mul)
    gm.graph.erase_node(node)
    return True


def normalize_scale_spellings(gm: fx.GraphModule, context: PassContext | None = None) -> PassResult:
    """Rewrite every scale spelled as a division, ``addcmul`` or ``einsum`` as a multiply (a pipeline pass:
    returns ``gm``, changed in place, without records)."""
    changed = False
    for node in list(gm.graph.nodes):
        changed |= _division(gm, node) or _addcmul(gm, node) or _einsum(gm, node)
    if changed:
        gm.recompile()
    return PassResult(gm)


__all__ = ["DIV_FUNCTIONS", "DIV_METHODS", "is_scale_spelling", "normalize_scale_spellings"]
