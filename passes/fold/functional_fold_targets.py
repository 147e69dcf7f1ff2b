"""Fold targets for the functional forms: ``F.conv*d``, ``F.conv_transpose*d``, ``F.linear``,
``F.batch_norm``, ``F.instance_norm``, ``F.group_norm``, ``F.layer_norm``.

A functional call can take a scale when its weight (and bias) are ``get_attr`` tensors, i.e.
parameters or buffers of the model; the folded values replace those attributes, so the same
formulas as for the modules hold (:mod:`asr_fx.passes.fold.fold_targets`). A norm called without a
weight gets one as a new buffer. A weight-standardized conv with a gain takes the scale in its gain
and bias (:mod:`asr_fx.passes.layers.standardized_conv`). Other weights computed in the graph (not attributes)
are refused: the caller finds no target and reports the site.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fold_targets import Target, conv_weight_in_scaled, conv_weight_out_scaled, replace_tensor
from ..graph.graph_queries import fetch_attr, output_rank
from ..graph.op_tables import CONV_FUNCTIONS as CONV
from ..graph.op_tables import CONV_TRANSPOSE_FUNCTIONS as CONV_TRANSPOSE
from ..graph.op_tables import NORM_FUNCTION_WEIGHT_INDEX as NORM_WEIGHT_INDEX
from ..layers.standardized_conv import output_target as standardized_output_target


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _attr(gm: fx.GraphModule, arg: Any) -> tuple[torch.nn.Module, str, torch.Tensor] | None:
    """``(owner, name, tensor)`` of a ``get_attr`` argument, else ``None``."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    path = str(arg.target)
    owner_path, _, name = path.rpartition(".")
    value = fetch_attr(gm, path)
    if not isinstance(value, torch.Tensor):
        return None
    return (gm.get_submodule(owner_path) if owner_path else gm), name, value


def _setter(gm: fx.GraphModule, node: fx.Node, index: int, name: str, found, fresh: torch.Tensor) -> None:
    """Put ``fresh`` where argument ``index`` was: into its attribute, or as a new buffer."""
    if found is not None:
        replace_tensor(found[0], found[1], fresh)
        return
    buffer = f"_folded_{name}_{node.name}"
    gm.register_buffer(buffer, fresh.detach().clone())
    with gm.graph.inserting_before(node):
        _set_arg(node, index, name, gm.graph.get_attr(buffer))


def output_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The target that folds ``node(x) * v`` for a functional call on attribute weights, else ``None``."""
    if node.op != "call_function":
        return None
    standardized = standardized_output_target(gm, node)  # a weight-standardized conv: into its gain
    if standardized is not None:
        return standardized
    fn = node.target
    if fn in CONV or fn in CONV_TRANSPOSE or fn is F.linear:
        weight = _attr(gm, _arg(node, 1, "weight"))
        bias_arg = _arg(node, 2, "bias")
        bias = _attr(gm, bias_arg)
        if weight is None or (bias_arg is not None and bias is None):
            return None
        w = weight[2]
        groups = int(_arg(node, 6, "groups", 1)) if fn is not F.linear else 1
        transposed = fn in CONV_TRANSPOSE
        channels = w.shape[1] * groups if transposed else w.shape[0]
        position = -1 if fn is F.linear else -(w.dim() - 1)

        def apply(v: torch.Tensor) -> None:
            if fn is F.linear:
                replace_tensor(weight[0], weight[1], w * v.reshape(-1, 1))
            else:
                replace_tensor(weight[0], weight[1], conv_weight_out_scaled(w, v, groups, transposed))
            if bias is not None:
                replace_tensor(bias[0], bias[1], bias[2] * v)

        kind = "linear" if fn is F.linear else "conv"
        tensors = [w] + ([bias[2]] if bias else [])
        return Target(node.name, kind, channels, position, tensors, apply)
    if fn in NORM_WEIGHT_INDEX:
        wi = NORM_WEIGHT_INDEX[fn]
        weight_arg, bias_arg = _arg(node, wi, "weight"), _arg(node, wi + 1, "bias")
        weight, bias = _attr(gm, weight_arg), _attr(gm, bias_arg)
        if (weight_arg is not None and weight is None) or (bias_arg is not None and bias is None):
            return None
        if fn is F.layer_norm:
            shape = tuple(_arg(node, 1, "normalized_shape"))
            if not all(isinstance(s, int) for s in shape):
                return None
            channels, position = shape[-1], -1
        else:
            if weight is not None:
                channels = weight[2].numel()
            elif fn is not F.group_norm and _attr(gm, _arg(node, 1, "running_mean")) is not None:
                channels = _attr(gm, _arg(node, 1, "running_mean"))[2].numel()
            else:
                return None
            rank = output_rank(node)
            position = 1 - rank if rank is not None else None

        def apply_norm(v: torch.Tensor) -> None:
            if fn is F.layer_norm:
                v = v.reshape((1,) * (len(shape) - 1) + (-1,))
            if weight is not None:
                _setter(gm, node, wi, "weight", weight, weight[2] * v)
            else:
                full = v.expand(shape) if fn is F.layer_norm else v
                _setter(gm, node, wi, "weight", None, full.clone())
            if bias is not None:
                _setter(gm, node, wi + 1, "bias", bias, bias[2] * v)

        tensors = [t[2] for t in (weight, bias) if t is not None]
        return Target(node.name, "bn" if fn is F.batch_norm else "norm", channels, position, tensors, apply_norm)
    return None


def input_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The target that folds ``node(x * s)`` (scale on the input channels) for ``F.conv*``/``F.linear``."""
    if node.op != "call_function" or not (node.target in CONV or node.target in CONV_TRANSPOSE
                                          or node.target is F.linear):
        return None
    weight = _attr(gm, _arg(node, 1, "weight"))
    if weight is None:
        return None
    w = weight[2]
    if node.target is F.linear:
        return Target(node.name, "next-linear", w.shape[1], -1, [w],
                      lambda s: replace_tensor(weight[0], weight[1], w * s.reshape(1, -1)))
    groups = int(_arg(node, 6, "groups", 1))
    transposed = node.target in CONV_TRANSPOSE
    channels = w.shape[0] if transposed else w.shape[1] * groups
    return Target(node.name, "next-conv", channels, -(w.dim() - 1), [w],
                  lambda s: replace_tensor(weight[0], weight[1], conv_weight_in_scaled(w, s, groups, transposed)))
