"""Conv-BN folding pass (standard structural re-parameterization): ``bn(conv(x)) -> conv'(x)``.

Equivalence: exact in eval mode (BN then uses its running statistics):
``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

Refuses (leaves both): BN in training mode or without running statistics, a conv whose output has
other users, a conv or BN called at more than one place, a conv sharing a parameter with another
module or call (tied weights would be untied), transposed convs, and shape mismatches.
Modifies ``gm`` in place and returns it.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .fold_targets import TensorUsage
from ..graph.graph_queries import module_of


def _fused_conv(conv: _ConvNd, bn: _BatchNorm) -> _ConvNd:
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        scale = gamma / std
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = copy.deepcopy(conv)
        fused.weight = nn.Parameter(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        fused.bias = nn.Parameter((bias - bn.running_mean) * scale + beta)
    return fused


def fold_conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every eval-mode ``BatchNorm`` that directly follows a conv into that conv."""
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    usage = TensorUsage(gm)
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BatchNorm) or bn.training or bn.running_mean is None:
            continue
        conv_node = node.args[0]
        if not isinstance(conv_node, fx.Node) or len(conv_node.users) != 1:
            continue
        conv = module_of(gm, conv_node)
        if not isinstance(conv, _ConvNd) or isinstance(conv, _ConvTransposeNd):
            continue
        if calls[str(conv_node.target)] > 1 or calls[str(node.target)] > 1 or conv.out_channels != bn.num_features:
            continue
        if usage.calls[id(conv)] > 1 or usage.calls[id(bn)] > 1 or any(usage.count[id(p)] > 1 for p in conv.parameters()):
            continue
        gm.set_submodule(str(conv_node.target), _fused_conv(conv, bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
