"""Transposed linear modules: transformers' ``Conv1D`` (GPT-2, GPT, ...), ``y = x @ W + b`` with ``W`` of shape
``(in_features, out_features)``. Output features take a scale in the weight's columns and the bias (Eq. 12 with
``W`` transposed), input features in its rows. Features are the last dimension.

Recognised by class (``Conv1D`` defined in a ``transformers`` module) with exactly that library's forward: a
subclass that overrides it is not this layer. Capture keeps such a module as one call (a leaf), so its output is
the node a site follows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..graph.graph_queries import ChannelInfo, module_of
from .base import ModuleLayerRule, NoMatch, replace_tensor


def _library_class(module: nn.Module) -> type | None:
    for klass in type(module).__mro__:
        if klass.__name__ == "Conv1D" and klass.__module__.startswith("transformers."):
            return klass
    return None


def is_transposed_linear(module: nn.Module | None) -> bool:
    """``module`` is transformers' ``Conv1D`` computing exactly that class's forward (``x @ W + b``)."""
    if module is None:
        return False
    klass: Any = _library_class(module)
    weight = module._parameters.get("weight")  # not a proxy while tracing
    return klass is not None and type(module).forward is klass.forward and \
        isinstance(weight, torch.Tensor) and weight.dim() == 2


class TransposedLinearRule(ModuleLayerRule):
    """transformers' ``Conv1D``: features last, both sides take a scale."""

    name = "transposed linear"
    kind = "linear"
    takes_input_scale = True

    def accepts(self, module: Any) -> bool:
        return is_transposed_linear(module)

    def plain_module(self, gm: fx.GraphModule, node: fx.Node) -> nn.Module | NoMatch:
        module = module_of(gm, node)
        if module is None or not self.accepts(module):
            return NoMatch(f"not a call of a {self.name} module")
        return module

    def layout(self, module: Any, node: fx.Node) -> ChannelInfo:
        return ChannelInfo(int(module.weight.shape[1]), -1)

    def scale_output(self, module: Any, v: torch.Tensor) -> None:
        replace_tensor(module, "weight", module.weight * v.reshape(1, -1))
        if module.bias is not None:
            replace_tensor(module, "bias", module.bias * v)

    def input_channels(self, module: Any) -> int:
        return int(module.weight.shape[0])

    def scale_input(self, module: Any, s: torch.Tensor) -> None:
        replace_tensor(module, "weight", module.weight * s.reshape(-1, 1))


TRANSPOSED_LINEAR = TransposedLinearRule()
