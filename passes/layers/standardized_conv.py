"""Weight-standardized convolutions with a gain (NF-Nets' ``ScaledStdConv2d``), as torch.fx traces them:

    conv(x, batch_norm(W.reshape(1, O, -1), None, None, weight=g, training=True, momentum=0, eps).reshape_as(W), b)

where ``g`` is computed from a parameter ``gain`` of ``O`` entries by multiplies with numbers and
reshapes (``(gain * scale).view(-1)``). Each output filter is standardized, then multiplied by ``g[o]``.

A per-output-channel scale ``v`` after such a conv commutes into it only after the standardization
(scaling ``W`` itself is undone by it): ``gain' = gain * v``, ``b' = b * v`` is exact. A standardized
conv without a gain (``StdConv2d``: ``weight=None``) cannot take a scale: it is no site and no fold
target. Norm-free networks have no norm layer to put ASR after; the conv that ends each residual
branch is where the paper's placement (after the branch's last layer, before the add) puts it.

:func:`standardized_conv` recognises the pattern by structure (not by module class);
:func:`channel_layout` and :func:`output_target` are what placement and the fold pass ask.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from numbers import Number
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..fold.fold_targets import Target, replace_tensor
from ..graph.graph_queries import ChannelInfo, fetch_attr
from ..graph.op_tables import CONV_FUNCTIONS

_RESHAPES = ("view", "reshape", "flatten")
_MULS = (operator.mul, torch.mul)


@dataclass
class StandardizedConv:
    """A recognised weight-standardized conv call: its weight's path, its gain and bias as
    ``(owner module, attribute name, tensor)`` (``bias`` may be ``None``)."""

    weight_path: str
    gain: tuple[torch.nn.Module, str, torch.Tensor]
    bias: tuple[torch.nn.Module, str, torch.Tensor] | None
    channels: int
    position: int

    @property
    def owner(self) -> str:
        return self.weight_path.rpartition(".")[0]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attr(gm: fx.GraphModule, node: Any) -> tuple[torch.nn.Module, str, torch.Tensor] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = fetch_attr(gm, str(node.target))
    if not isinstance(value, torch.Tensor):
        return None
    owner, _, name = str(node.target).rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), name, value


def _gain(gm: fx.GraphModule, node: Any) -> tuple[torch.nn.Module, str, torch.Tensor] | None:
    """The parameter ``g`` is computed from by multiplies with numbers and reshapes, each step used once."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if len(node.users) != 1:
            return None
        if node.op == "call_method" and node.target in _RESHAPES:
            node = node.args[0]
        elif node.op == "call_function" and node.target in _MULS and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, Number):
                node = a
            elif isinstance(b, fx.Node) and isinstance(a, Number):
                node = b
            else:
                return None
        else:
            return None
    found = _attr(gm, node)
    return found if found is not None and len(node.users) == 1 else None  # type: ignore[union-attr]


def _standardized_weight(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``(batch_norm node, W get_attr)`` when ``node`` is ``batch_norm(W.reshape(1, O, -1), ...).reshape_as(W)``."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or len(node.users) != 1:
        return None
    if node.target == "reshape_as":
        bn, weight = node.args[0], node.args[1]
    elif node.target in ("reshape", "view") and isinstance(node.args[0], fx.Node):
        bn, weight = node.args[0], None
    else:
        return None
    if not isinstance(bn, fx.Node) or bn.op != "call_function" or bn.target is not F.batch_norm or len(bn.users) != 1:
        return None
    flat = bn.args[0]
    if not isinstance(flat, fx.Node) or flat.op != "call_method" or flat.target not in ("reshape", "view"):
        return None
    source = flat.args[0]
    if weight is not None and source is not weight:
        return None
    found = _attr(gm, source)
    if found is None:
        return None
    shape = tuple(found[2].shape)
    if weight is None and tuple(node.args[1:]) not in (shape, (shape,)):
        return None
    stats = _arg(bn, 1, "running_mean"), _arg(bn, 2, "running_var")
    if any(s is not None for s in stats) or _arg(bn, 5, "training", False) is not True:
        return None
    if tuple(flat.args[1:]) not in ((1, shape[0], -1), ((1, shape[0], -1),)):
        return None
    return bn, source  # type: ignore[return-value]


def standardized_conv(gm: fx.GraphModule, node: fx.Node) -> StandardizedConv | None:
    """``node`` as a weight-standardized conv with a gain (see the module docstring), else ``None``."""
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
        return None
    found = _standardized_weight(gm, _arg(node, 1, "weight"))
    if found is None:
        return None
    bn, weight = found
    if _arg(bn, 4, "bias") is not None:
        return None
    gain = _gain(gm, _arg(bn, 3, "weight"))
    w = fetch_attr(gm, str(weight.target))
    if gain is None or gain[2].numel() != w.shape[0]:
        return None  # no gain (StdConv2d): a scale cannot fold into the conv
    bias_arg = _arg(node, 2, "bias")
    bias = _attr(gm, bias_arg)
    if bias_arg is not None and (bias is None or len(bias_arg.users) != 1):
        return None
    return StandardizedConv(str(weight.target), gain, bias, int(w.shape[0]), -(w.dim() - 1))


def channel_layout(gm: fx.GraphModule, node: fx.Node) -> tuple[str, ChannelInfo] | None:
    """``(owner module path, channel layout)`` of a weight-standardized conv with a gain, else ``None``."""
    conv = standardized_conv(gm, node)
    return None if conv is None else (conv.owner, ChannelInfo(conv.channels, conv.position))


def output_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The fold target of ``conv(x) * v`` for a weight-standardized conv: ``gain * v`` and ``bias * v``."""
    conv = standardized_conv(gm, node)
    if conv is None:
        return None
    gain, bias = conv.gain, conv.bias

    def apply(v: torch.Tensor) -> None:
        replace_tensor(gain[0], gain[1], gain[2] * v.reshape(gain[2].shape))
        if bias is not None:
            replace_tensor(bias[0], bias[1], bias[2] * v)

    tensors = [gain[2]] + ([bias[2]] if bias is not None else [])
    return Target(node.name, "conv", conv.channels, conv.position, tensors, apply)
