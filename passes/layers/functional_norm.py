"""Functional norms (``F.batch_norm``, ``F.instance_norm``, ``F.group_norm``, ``F.layer_norm``) whose
weight and bias, where given, are ``get_attr`` tensors: the output takes a scale in them (Eq. 7/11); a
norm called without a weight gets one as a new buffer. Refused where a weight or bias is computed in
the graph, or the channel count cannot be read (no weight, and no running mean). The input takes none.
Not offered as placement sites (placement looks for layer modules).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph.graph_queries import output_rank
from ..graph.op_tables import NORM_FUNCTION_WEIGHT_INDEX
from .base import (
    FunctionalLayerRule,
    NoMatch,
    Refusal,
    Target,
    TargetOrRefusal,
    attribute_tensor,
    attribute_values,
    call_arg,
    replace_tensor,
    set_call_arg,
    weight_and_bias,
)

_NOT_MINE = NoMatch("not a call of F.batch_norm, F.instance_norm, F.group_norm or F.layer_norm")


def _setter(gm: fx.GraphModule, node: fx.Node, index: int, name: str, found, fresh: torch.Tensor) -> None:
    """Put ``fresh`` where argument ``index`` was: into its attribute, or as a new buffer."""
    if found is not None:
        replace_tensor(found[0], found[1], fresh)
        return
    buffer = f"_folded_{name}_{node.name}"
    gm.register_buffer(buffer, fresh.detach().clone())
    with gm.graph.inserting_before(node):
        set_call_arg(node, index, name, gm.graph.get_attr(buffer))


def _is_norm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in NORM_FUNCTION_WEIGHT_INDEX


class FunctionalNormRule(FunctionalLayerRule):
    """``F.*_norm`` on attribute affines (or none): the output takes a scale."""

    name = "functional_norm"

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        if not _is_norm(node):
            return _NOT_MINE
        fn = node.target
        wi = NORM_FUNCTION_WEIGHT_INDEX[fn]  # type: ignore[index]
        found = weight_and_bias(gm, node, wi)
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        shape: tuple[int, ...] = ()
        position: int | None
        if fn is F.layer_norm:
            shape = tuple(call_arg(node, 1, "normalized_shape"))
            if not all(isinstance(s, int) for s in shape):
                return Refusal(f"`{node.name}`'s normalized_shape is computed in the graph")
            channels, position = shape[-1], -1
        else:
            running_mean = attribute_tensor(gm, call_arg(node, 1, "running_mean"))
            if weight is not None:
                channels = weight[2].numel()
            elif fn is not F.group_norm and running_mean is not None:
                channels = running_mean[2].numel()
            else:
                return Refusal(f"`{node.name}` has no weight or running mean to read its channels from")
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

        return Target(node.name, "bn" if fn is F.batch_norm else "norm", channels, position,
                      attribute_values(weight, bias), apply_norm)


FUNCTIONAL_NORM = FunctionalNormRule()
