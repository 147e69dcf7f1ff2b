"""The functional conv/linear rule: F.conv*, F.conv_transpose*, F.linear on parameter weights take a
scale on either side; a weight computed in the graph is refused; no placement site."""

import pytest
import torch
import torch.nn.functional as F
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, Refusal
from asr_fx.passes.layers.functional_conv_linear import FUNCTIONAL_CONV_LINEAR


class Functional(nn.Module):
    def __init__(self, kind, computed=False):
        super().__init__()
        self.kind, self.computed = kind, computed
        shapes = {"conv": (6, 2, 3, 3), "deconv": (4, 3, 3, 3), "linear": (6, 5)}
        self.weight = nn.Parameter(torch.randn(shapes[kind]) * 0.3)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        w = self.weight * 2 if self.computed else self.weight
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, groups=2)
        if self.kind == "deconv":
            return F.conv_transpose2d(x, w, self.bias, groups=2)
        return F.linear(x, w, self.bias)


@pytest.mark.parametrize("kind, x, position", [
    ("conv", torch.randn(2, 4, 6, 6), -3),
    ("deconv", torch.randn(2, 4, 5, 5), -3),
    ("linear", torch.randn(3, 5), -1),
])
def test_functional_layer_recognised_and_folds_both_sides(kind, x, position):
    gm = traced(Functional(kind), x)
    found = FUNCTIONAL_CONV_LINEAR.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (6, position)
    assert not FUNCTIONAL_CONV_LINEAR.is_site
    check_output_fold(FUNCTIONAL_CONV_LINEAR, gm, last_node(gm), x)
    gm = traced(Functional(kind), x)
    check_input_fold(FUNCTIONAL_CONV_LINEAR, gm, last_node(gm), x)


def test_computed_weight_is_refused_with_a_reason():
    gm = traced(Functional("conv", computed=True), torch.randn(1, 4, 5, 5))
    refused = FUNCTIONAL_CONV_LINEAR.output_target(gm, last_node(gm))
    assert isinstance(refused, Refusal) and "computed in the graph" in refused.reason
    assert isinstance(FUNCTIONAL_CONV_LINEAR.input_target(gm, last_node(gm)), Refusal)


class ComputedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias + 1)


def test_computed_bias_is_refused_on_the_output_but_not_the_input():
    gm = traced(ComputedBias(), torch.randn(3, 5))
    refused = FUNCTIONAL_CONV_LINEAR.output_target(gm, last_node(gm))
    assert isinstance(refused, Refusal) and "weight or bias is computed in the graph" in refused.reason
    gm = traced(ComputedBias(), torch.randn(3, 5))
    check_input_fold(FUNCTIONAL_CONV_LINEAR, gm, last_node(gm), torch.randn(3, 5))
