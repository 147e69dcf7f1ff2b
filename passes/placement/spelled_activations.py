"""Activations written out in arithmetic, or as custom autograd Functions, recognised as activations.

Placement (``norm-act``) looks for a norm whose output goes into an activation. Besides the
activation modules, functions and methods of :mod:`asr_fx.passes.op_tables`, these count:

- swish / SiLU spelled out: ``x * torch.sigmoid(x)`` (also ``x.sigmoid()``, ``F.sigmoid``, either order);
- hard-swish spelled out: ``x * relu6(x + 3) / 6`` (also ``x * (relu6(x + 3) / 6)``, ``hardtanh(x + 3, 0, 6)``,
  ``F.hardsigmoid(x)``, ``* (1 / 6)``);
- a custom ``torch.autograd.Function`` of one tensor whose forward computes a known activation
  (checked on a probe vector: SiLU, ReLU, ReLU6, Hardswish, GELU, Mish, sigmoid, tanh).

Placement only: the graph is not changed, so no equivalence is at stake; a site in front of a spelled
activation scales the activation's input, all of its uses.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..capture.autograd_functions import autograd_function_of

_SIGMOID = (torch.sigmoid, F.sigmoid)
_RELU6 = (F.relu6,)
_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div)
_ADD = (operator.add, torch.add)
_KNOWN = (F.silu, F.relu, F.relu6, F.hardswish, F.gelu, F.mish, torch.sigmoid, torch.tanh)
_known_functions: dict[type, bool] = {}


def _is_call(node: Any, functions: tuple[Any, ...], method: str | None = None) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in functions:
        return True
    return method is not None and node.op == "call_method" and node.target == method


def _sigmoid_of(node: Any) -> fx.Node | None:
    if _is_call(node, _SIGMOID, "sigmoid") and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _hard_sigmoid_times_six_of(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``relu6(x + 3)`` or ``hardtanh(x + 3, 0, 6)``."""
    if not isinstance(node, fx.Node):
        return None
    if _is_call(node, _RELU6) or (_is_call(node, (F.hardtanh,)) and tuple(node.args[1:3]) == (0, 6)):
        inner = node.args[0]
        if _is_call(inner, _ADD) and len(inner.args) == 2 and inner.args[1] == 3 and isinstance(inner.args[0], fx.Node):
            return inner.args[0]
    return None


def _divided_by_six(node: Any) -> fx.Node | None:
    """``a`` when ``node`` is ``a / 6`` or ``a * (1/6)``."""
    if _is_call(node, _DIV) and len(node.args) == 2 and node.args[1] == 6:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if _is_call(node, _MUL) and len(node.args) == 2 and isinstance(node.args[1], float) and \
            abs(node.args[1] - 1 / 6) < 1e-6:
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def _gate_input(gate: Any) -> fx.Node | None:
    """``x`` when ``gate`` is ``sigmoid(x)``, ``relu6(x + 3) / 6`` or ``hardsigmoid(x)``."""
    found = _sigmoid_of(gate)
    if found is not None:
        return found
    if _is_call(gate, (F.hardsigmoid,)) and isinstance(gate.args[0], fx.Node):
        return gate.args[0]
    inner = _divided_by_six(gate)
    return _hard_sigmoid_times_six_of(inner) if inner is not None else None


def _product_input(node: Any) -> fx.Node | None:
    """``x`` when ``node`` is ``x * gate(x)`` (either order)."""
    if not _is_call(node, _MUL) or len(node.args) != 2:
        return None
    a, b = node.args
    for x, gate in ((a, b), (b, a)):
        if isinstance(x, fx.Node) and _gate_input(gate) is x:
            return x
    return None


def spelled_activation_input(node: fx.Node) -> fx.Node | None:
    """The input ``x`` of a spelled-out swish / hard-swish ending at ``node``, else ``None``."""
    found = _product_input(node)
    if found is not None:
        return found
    inner = _divided_by_six(node)  # (x * relu6(x + 3)) / 6
    if inner is not None and _is_call(inner, _MUL) and len(inner.args) == 2:
        a, b = inner.args
        for x, gate in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and _hard_sigmoid_times_six_of(gate) is x:
                return x
    return None


def _computes_an_activation(cls: type) -> bool:
    known = _known_functions.get(cls)
    if known is None:
        probe = torch.linspace(-6, 6, 97)
        try:
            with torch.no_grad():
                out = cls.apply(probe.clone())  # type: ignore[attr-defined]
            known = isinstance(out, torch.Tensor) and out.shape == probe.shape and \
                any(torch.allclose(out, f(probe), atol=1e-5) for f in _KNOWN)
        except Exception:  # noqa: BLE001 - a Function that does not take one vector is no activation
            known = False
        _known_functions[cls] = known
    return known


def function_activation_input(node: fx.Node) -> fx.Node | None:
    """The input of a custom autograd Function call that computes a known activation, else ``None``."""
    cls = autograd_function_of(node.target) if node.op == "call_function" else None
    if cls is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0] if _computes_an_activation(cls) else None
