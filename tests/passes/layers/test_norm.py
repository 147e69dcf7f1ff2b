"""The norm rule: GroupNorm, InstanceNorm, LayerNorm and RMSNorm calls; the output takes a scale in the affine
(a norm without one gets it as a buffer), the input none."""

import pytest
import torch
from layer_rule_checks import check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, Refusal
from asr_fx.passes.layers.norm import NORM


@pytest.mark.parametrize("norm, x, channels, position", [
    (nn.GroupNorm(2, 4), torch.randn(2, 4, 3, 3), 4, -3),
    (nn.GroupNorm(2, 4, affine=False), torch.randn(2, 4, 5), 4, -2),
    (nn.InstanceNorm2d(4, affine=True), torch.randn(2, 4, 3, 3), 4, -3),
    (nn.InstanceNorm1d(4), torch.randn(2, 4, 6), 4, -2),
    (nn.LayerNorm(6), torch.randn(2, 3, 6), 6, -1),
    (nn.LayerNorm((3, 6), elementwise_affine=False), torch.randn(2, 3, 6), 6, -1),
    (nn.RMSNorm(6, eps=1e-6), torch.randn(2, 3, 6), 6, -1),
    (nn.RMSNorm((3, 6), elementwise_affine=False), torch.randn(2, 3, 6), 6, -1),
])
def test_norm_recognised_and_folds_its_output(norm, x, channels, position):
    gm = traced(norm, x)
    found = NORM.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (channels, position)
    assert check_output_fold(NORM, gm, last_node(gm), x).kind == "norm"
    assert isinstance(NORM.input_target(gm, last_node(gm)), Refusal)


def test_group_norm_axis_needs_the_input_rank():
    gm = traced(nn.GroupNorm(2, 4), torch.randn(2, 4, 3), shapes=False)
    found = NORM.recognise(gm, last_node(gm))
    assert found.position is None and found.refusal is not None
