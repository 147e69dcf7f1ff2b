"""Scales that are not what they seem: the refusals the fold passes ask before they take a ``get_attr`` as
a constant (:func:`written_attributes`, :func:`written_scale`) or move a scale back across a multiply that
changes the dtype (:func:`promotes`). The guards of the layers themselves (hooks, parametrizations, replaced
forwards, InstanceNorm corner cases) are the layer registry's: :mod:`~asr_fx.passes.layers.guards`.

A ``get_attr`` tensor the forward writes into (``self.s.copy_(gate)``) is no constant: its value at fold time
is a snapshot of the last call. Nothing here changes the graph.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph.graph_queries import output_dtype
from ..graph.liveness import StorageClasses
from ..graph.refusals import Refusal
from ..layers.guards import model_dtype
from .scale_algebra import constant_node, constant_operand


def written_scale(gm: fx.GraphModule, mul: fx.Node, x: fx.Node) -> Refusal | None:
    """Why ``mul``'s constant is no constant (the forward writes into it), or ``None``."""
    c = constant_node(mul, x)
    if c is not None and c.op == "get_attr" and str(c.target) in written_attributes(gm):
        return Refusal(f"the scale `{c.target}` is written by the forward (an in-place write into it): its "
                       "value now is a snapshot of the last call, not a constant")
    return None


def promotes(gm: fx.GraphModule, mul: fx.Node, x: fx.Node) -> bool:
    """Whether the constant ``mul`` of ``x`` may change the dtype (``float16 * float32`` constant): a scale
    moved back across it would round in ``x``'s dtype instead of the result's."""
    found = constant_operand(gm, mul)
    if found is None:
        return False
    before, after = output_dtype(x), output_dtype(mul)
    if before is not None and after is not None:
        return before != after
    c = found[1]
    return c.dim() > 0 and c.dtype != model_dtype(gm)


def written_attributes(gm: fx.GraphModule) -> set[str]:
    """The attribute paths (``get_attr`` targets) whose storage some node of ``gm`` writes into."""
    classes = StorageClasses(gm)
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and classes.written(n)}


__all__ = ["promotes", "written_attributes", "written_scale"]
