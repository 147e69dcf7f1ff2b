"""Read-only questions about torch.fx nodes that every pass asks: is this a multiply or an add,
which module a call calls, what shape and rank a value has, where a layer's channels are, whether
an op writes into its input, which module path created a node.

Nothing here changes a graph. The op lists these read are in :mod:`asr_fx.passes.graph.op_tables`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from .op_tables import (
    ADAPTER_METHODS,
    ADD_FUNCTIONS,
    ADD_METHODS,
    IDENTITY_MODULES,
    INPLACE_OPERATORS,
    META_ATTRIBUTES,
    MUL_FUNCTIONS,
    MUL_METHODS,
    PLAIN_LAYERS,
    SHAPE_QUERY_METHODS,
)


def fetch_attr(module: nn.Module, target: str) -> Any:
    """``module.a.b.c`` for target ``"a.b.c"`` (what a ``get_attr`` node reads)."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def mul_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of ``a * b`` in any spelling, else ``None``.

    Spellings: ``a * b`` / ``operator.mul``, ``a *= b`` / ``operator.imul``, ``torch.mul`` /
    ``torch.multiply``, ``Tensor.mul`` / ``multiply`` / ``mul_`` / ``multiply_``, with the second
    operand positional or ``other=`` (``input=`` for the functions); an operand may be a Python
    number. A call with ``out=`` (or any other keyword) is not a plain multiply.
    """
    if node.op == "call_function" and node.target in MUL_FUNCTIONS:
        names = ("input", "other")
    elif node.op == "call_method" and node.target in MUL_METHODS:
        names = ("self", "other")
    else:
        return None
    if set(node.kwargs) - set(names[len(node.args):]) or len(node.args) > 2:
        return None
    operands = [*node.args, *(node.kwargs[n] for n in names[len(node.args):] if n in node.kwargs)]
    return (operands[0], operands[1]) if len(operands) == 2 else None


def is_mul(node: fx.Node) -> bool:
    """``a * b`` in any spelling (:func:`mul_operands`)."""
    return mul_operands(node) is not None


def is_add(node: fx.Node) -> bool:
    """``a + b`` of two graph values, in any spelling, without ``alpha``."""
    spelled = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ADD_METHODS)
    return spelled and len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else ``None``."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def calls_one_of(gm: fx.GraphModule, node: fx.Node, modules: tuple[type, ...], functions: Any, methods: Any) -> bool:
    """Whether ``node`` calls a module of one of the types ``modules``, one of ``functions`` or one of
    the Tensor ``methods`` (an op table's three spellings of one op)."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def output_shape(node: Any) -> tuple[int, ...] | None:
    """A node's output shape when shape propagation recorded it (``node.meta['tensor_meta']``)."""
    shape = getattr(getattr(node, "meta", {}).get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else None


def output_dtype(node: Any) -> Any:
    """A node's output dtype when shape propagation recorded it, else ``None``."""
    return getattr(getattr(node, "meta", {}).get("tensor_meta"), "dtype", None)


def output_rank(node: fx.Node) -> int | None:
    """The rank of a node's output when shape propagation recorded it."""
    shape = output_shape(node)
    return len(shape) if shape is not None else None


def node_label(node: fx.Node) -> str:
    """How messages name a node's op: ``path (ModuleClass)`` for a module call, else the function/method name."""
    if node.op == "call_module" and node.graph.owning_module is not None:
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(str(node.target))).__name__})"
    return getattr(node.target, "__name__", str(node.target))


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` writes into its input (``relu_``, ``inplace=True``, ``x *= c``...)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.op == "call_function" and (getattr(node.target, "__name__", "").endswith("_")
                                           or node.target in INPLACE_OPERATORS)


def reads_only_metadata(node: fx.Node) -> bool:
    """A use that reads only a value's shape or dtype: ``x.size()``, ``x.shape``, ``x.dtype``."""
    return (node.op == "call_method" and node.target in SHAPE_QUERY_METHODS) or \
        (node.op == "call_function" and node.target is getattr and node.args[1] in META_ATTRIBUTES)


def is_adapted_constant(node: fx.Node) -> bool:
    """``c.expand_as(x)`` / ``c.type_as(x)`` / ``c.to(...)`` of a ``get_attr`` constant ``c``."""
    return node.op == "call_method" and node.target in ADAPTER_METHODS and \
        isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"


def skip_identity(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Walk back over modules that are the identity at inference (dropout, identity)."""
    while isinstance(module_of(gm, node), IDENTITY_MODULES) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def site_of(node: fx.Node) -> str:
    """The innermost module path whose ``forward`` created ``node`` (e.g. ``asr.layer1_0_bn3``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


@dataclass(frozen=True)
class ChannelInfo:
    """Where a layer's per-channel parameters act on its output.

    ``channels``: how many; ``position``: the channel dimension counted from the right (``-3`` for
    NCHW, ``-1`` for channels-last), or ``None`` where it depends on an input rank that is unknown.
    """

    channels: int
    position: int | None


def is_plain_layer(module: nn.Module | None) -> bool:
    """``module`` computes exactly its torch layer's forward: not a composite subclass that overrides it
    (a norm with an activation inside, a weight-standardized or same-padding conv), whose output a
    scale cannot be folded through. A capture twin that makes its library's own call of the same layer function
    (:class:`~asr_fx.passes.capture.plain_layers.CallingRMSNorm`) says so with ``computes_its_base = True``."""
    if module is None:
        return False
    forward = type(module).forward
    if getattr(type(module), "computes_its_base", False) is True:
        return True
    return any(isinstance(module, base) and forward is base.forward for base in PLAIN_LAYERS)


def qualified_key(name: str) -> str:
    """A module path as one attribute name: ``layer1.0.bn3`` -> ``layer1_0_bn3``."""
    return name.replace(".", "_")
