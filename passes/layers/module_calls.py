"""The rules for calls of layer modules (conv, transposed conv, linear, BatchNorm, other norms), and
:func:`channel_info`, the channel layout of such a call, which the rules that build on module calls
(parallel branches, attention patterns) read."""

from __future__ import annotations

import torch.fx as fx

from ..graph.graph_queries import ChannelInfo, is_plain_layer, module_of
from .base import ModuleLayerRule
from .batch_norm import BATCH_NORM
from .conv import CONV
from .deconv import DECONV
from .linear import LINEAR
from .norm import NORM
from .transposed_linear import TRANSPOSED_LINEAR

#: the rules for module calls, in the order they are asked
MODULE_RULES: tuple[ModuleLayerRule, ...] = (CONV, DECONV, LINEAR, TRANSPOSED_LINEAR, BATCH_NORM, NORM)


def module_rule(gm: fx.GraphModule, node: fx.Node) -> ModuleLayerRule | None:
    """The rule of a call of a plain conv/norm/linear module (:func:`is_plain_layer`), else ``None``."""
    module = module_of(gm, node)
    if not is_plain_layer(module):
        return None
    return next((rule for rule in MODULE_RULES if rule.accepts(module)), None)  # type: ignore[arg-type]


def channel_info(gm: fx.GraphModule, node: fx.Node) -> ChannelInfo | None:
    """The channel layout of a node that is a call of a conv/norm/linear module, else ``None``."""
    rule = module_rule(gm, node)
    return None if rule is None else rule.layout(module_of(gm, node), node)  # type: ignore[arg-type]
