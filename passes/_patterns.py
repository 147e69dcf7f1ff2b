"""Small shared matchers over torch.fx nodes: which node is a multiply, which layer produced a
tensor, and where that layer's channel dimension is."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
MUL_METHODS = ("mul", "mul_")
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")

#: modules whose output equals their input at inference (walked through when looking for a producer)
IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

NORM_MODULES = (_BatchNorm, nn.GroupNorm, _InstanceNorm, nn.LayerNorm)

#: the torch layers whose forward the fold rules know; a subclass that overrides forward is not one of them
_PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                 nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.MultiheadAttention)


def is_plain_layer(module: nn.Module | None) -> bool:
    """``module`` computes exactly its torch layer's forward: not a composite subclass that overrides it
    (a norm with an activation inside, a weight-standardized or same-padding conv), whose output a
    scale cannot be folded through."""
    if module is None:
        return False
    forward = type(module).forward
    return any(isinstance(module, base) and forward is base.forward for base in _PLAIN_LAYERS)


def is_mul(node: fx.Node) -> bool:
    """``a * b`` in any spelling: ``operator.mul``/``imul``, ``torch.mul``, ``Tensor.mul(_)``."""
    if node.op == "call_function" and node.target in MUL_FUNCTIONS:
        return len(node.args) == 2 and not node.kwargs
    if node.op == "call_method" and node.target in MUL_METHODS:
        return len(node.args) == 2 and not node.kwargs
    return False


def is_add(node: fx.Node) -> bool:
    """``a + b`` of two graph values, in any spelling, without ``alpha``."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ADD_METHODS:
        pass
    else:
        return False
    return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else ``None``."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def output_rank(node: fx.Node) -> int | None:
    """The rank of a node's output when shape propagation recorded it."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


@dataclass(frozen=True)
class ChannelInfo:
    """Where a layer's per-channel parameters act on its output.

    ``channels``: how many; ``position``: the channel dimension counted from the right (``-3`` for
    NCHW, ``-1`` for channels-last), or ``None`` where it depends on an input rank that is unknown.
    """

    channels: int
    position: int | None


def channel_info(gm: fx.GraphModule, node: fx.Node) -> ChannelInfo | None:
    """The channel layout of a node that is a call of a conv/norm/linear module, else ``None``."""
    module = module_of(gm, node)
    if not is_plain_layer(module):
        return None
    rank = output_rank(node)
    channel_first = None if rank is None else 1 - rank
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        return ChannelInfo(module.out_channels, -(len(module.kernel_size) + 1))
    if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)):
        return ChannelInfo(module.num_features, -3)
    if isinstance(module, (nn.BatchNorm3d, nn.InstanceNorm3d)):
        return ChannelInfo(module.num_features, -4)
    if isinstance(module, (_BatchNorm, _InstanceNorm)):
        return ChannelInfo(module.num_features, channel_first)
    if isinstance(module, nn.GroupNorm):
        return ChannelInfo(module.num_channels, channel_first)
    if isinstance(module, nn.LayerNorm):
        return ChannelInfo(module.normalized_shape[-1], -1)
    if isinstance(module, nn.Linear):
        return ChannelInfo(module.out_features, -1)
    return None


def qualified_key(name: str) -> str:
    """A module path as one attribute name: ``layer1.0.bn3`` -> ``layer1_0_bn3``."""
    return name.replace(".", "_")
