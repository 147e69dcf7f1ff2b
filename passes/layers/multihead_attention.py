"""Multi-head attention (``nn.MultiheadAttention``): its attention output ``mha(...)[0]`` is a layer
whose features (the last dimension, ``embed_dim`` of them) take a scale in the output projection
``out_proj`` (Eq. 12). Its input takes none (query, key and value all read it)."""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from ..graph.graph_queries import is_plain_layer, module_of
from .base import LayerMatch, LayerRule, NoMatch, Refusal, Target, TargetOrRefusal
from .linear import scale_linear_out


def mha_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.MultiheadAttention] | None:
    """``(path, mha)`` when ``node`` is ``mha(...)[0]``, the attention output of an ``nn.MultiheadAttention``."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 0:
        return None
    call = node.args[0]
    module = module_of(gm, call) if isinstance(call, fx.Node) else None
    return (str(call.target), module) if isinstance(module, nn.MultiheadAttention) else None  # type: ignore[union-attr]


class MultiheadAttentionRule(LayerRule):
    """``mha(...)[0]``: ``embed_dim`` features last; the output takes a scale in ``out_proj``."""

    name = "multihead_attention"

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        found = mha_of(gm, node)
        if found is None:
            return NoMatch("not the attention output `mha(...)[0]` of an nn.MultiheadAttention")
        path, mha = found
        return LayerMatch(self, mha.embed_dim, -1, path, f"{path}.out_proj")

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        found = mha_of(gm, node)
        if found is None:
            return NoMatch("not the attention output `mha(...)[0]` of an nn.MultiheadAttention")
        path, mha = found
        if not is_plain_layer(mha):
            return Refusal(f"`{path}` ({type(mha).__name__}) overrides nn.MultiheadAttention's forward")
        proj = mha.out_proj
        return Target(f"{path}.out_proj", "linear", mha.embed_dim, -1, list(proj.parameters(recurse=False)),
                      lambda v: scale_linear_out(proj, v), mha)


MULTIHEAD_ATTENTION = MultiheadAttentionRule()
