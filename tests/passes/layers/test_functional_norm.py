"""The functional norm rule: F.batch_norm/instance_norm/group_norm/layer_norm on parameter affines (or
none: a buffer is added) take a scale on their output; computed affines are refused; no placement site."""

import pytest
import torch
import torch.nn.functional as F
from layer_rule_checks import check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, Refusal
from asr_fx.passes.layers.functional_norm import FUNCTIONAL_NORM


class Norm(nn.Module):
    def __init__(self, kind, affine=True, computed=False):
        super().__init__()
        self.kind, self.computed = kind, computed
        self.weight = nn.Parameter(torch.rand(4) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.randn(4)) if affine else None
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        w = self.weight * 2 if self.computed else self.weight
        if self.kind == "batch":
            return F.batch_norm(x, self.mean, self.var, w, self.bias)
        if self.kind == "instance":
            return F.instance_norm(x, weight=w, bias=self.bias)
        if self.kind == "group":
            return F.group_norm(x, 2, w, self.bias)
        return F.layer_norm(x, (4,), w, self.bias)


@pytest.mark.parametrize("kind, affine, x, position", [
    ("batch", True, torch.randn(2, 4, 3, 3), -3),
    ("batch", False, torch.randn(2, 4, 3, 3), -3),  # channels from the running mean; a weight buffer is added
    ("instance", True, torch.randn(2, 4, 3, 3), -3),
    ("group", True, torch.randn(2, 4, 5), -2),
    ("layer", True, torch.randn(2, 3, 4), -1),
    ("layer", False, torch.randn(2, 3, 4), -1),
])
def test_functional_norm_recognised_and_folds(kind, affine, x, position):
    gm = traced(Norm(kind, affine), x)
    found = FUNCTIONAL_NORM.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (4, position)
    check_output_fold(FUNCTIONAL_NORM, gm, last_node(gm), x)


def test_functional_norm_refusals():
    gm = traced(Norm("group", affine=False), torch.randn(2, 4, 5))
    refused = FUNCTIONAL_NORM.output_target(gm, last_node(gm))
    assert isinstance(refused, Refusal) and "channels" in refused.reason
    gm = traced(Norm("layer", computed=True), torch.randn(2, 4))
    refused = FUNCTIONAL_NORM.output_target(gm, last_node(gm))
    assert isinstance(refused, Refusal) and "computed in the graph" in refused.reason
