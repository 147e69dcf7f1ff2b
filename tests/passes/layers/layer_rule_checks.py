"""Shared checks for the layer-rule unit tests: trace a one-layer model with recorded shapes, find the
node a rule should recognise, and check a rule's output/input target numerically."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from asr_fx.passes.capture.shapes import record_shapes
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.layers.base import LayerRule, Target


def traced(model: nn.Module, x: torch.Tensor, shapes: bool = True) -> fx.GraphModule:
    """``model`` traced in eval mode (with recorded shapes unless ``shapes=False``), wrapped in
    ``nn.Sequential`` so that a layer module is called as module ``0``, not traced through."""
    gm = trace(nn.Sequential(copy.deepcopy(model)))
    gm.eval()
    return record_shapes(gm, (x,)) if shapes else gm


def last_node(gm: fx.GraphModule) -> fx.Node:
    """The node whose value the graph returns."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return out.args[0]  # type: ignore[return-value]


def nodes_where(gm: fx.GraphModule, keep: Callable[[fx.Node], bool]) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if keep(n)]


def along(v: torch.Tensor, position: int) -> torch.Tensor:
    """``v`` shaped to broadcast along dimension ``position`` (counted from the right)."""
    return v.reshape(-1, *([1] * (-position - 1)))


def check_output_fold(rule: LayerRule, gm: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> Target:
    """``rule`` folds ``v`` on ``node``'s output: the graph (whose output is ``node``) then computes
    ``old(x) * v`` along the target's channel axis."""
    target = rule.output_target(gm, node)
    assert isinstance(target, Target), target
    with torch.no_grad():
        want = gm(x)
        v = torch.linspace(0.5, 1.5, target.channels)
        target.apply(v)
        gm.recompile()
        got = gm(x)
    assert torch.allclose(got, want * along(v, target.position), rtol=1e-5, atol=1e-6)
    return target


def check_input_fold(rule: LayerRule, gm: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> Target:
    """``rule`` folds ``s`` on ``node``'s input: the graph then computes ``old(x * s)``."""
    target = rule.input_target(gm, node)
    assert isinstance(target, Target), target
    with torch.no_grad():
        s = torch.linspace(0.5, 1.5, target.channels)
        want = gm(x * along(s, target.position))
        assert target.refuse(s) is None
        target.apply(s)
        gm.recompile()
        got = gm(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    return target
