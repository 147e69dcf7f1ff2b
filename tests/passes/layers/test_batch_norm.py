"""The batch norm rule: nn.BatchNorm*d calls; the output takes a scale in the affine (also without
one), an eval BN's input in its running statistics, refused for batch statistics, zero entries and
scales the statistics cannot hold exactly."""

import pytest
import torch
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, Target
from asr_fx.passes.layers.batch_norm import BATCH_NORM


def _bn(cls, c, affine=True):
    bn = cls(c, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("cls, x, position", [
    (nn.BatchNorm1d, torch.randn(4, 3, 5), -2),
    (nn.BatchNorm2d, torch.randn(2, 3, 4, 4), -3),
    (nn.BatchNorm3d, torch.randn(1, 3, 2, 2, 2), -4),
])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_recognised_and_folds_both_sides(cls, x, position, affine):
    gm = traced(_bn(cls, 3, affine), x)
    found = BATCH_NORM.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (3, position)
    assert check_output_fold(BATCH_NORM, gm, last_node(gm), x).kind == "bn"
    gm = traced(_bn(cls, 3, affine), x)
    assert check_input_fold(BATCH_NORM, gm, last_node(gm), x).kind == "next-bn"


def test_batch_norm1d_axis_needs_the_input_rank():
    gm = traced(_bn(nn.BatchNorm1d, 3), torch.randn(4, 3), shapes=False)
    found = BATCH_NORM.recognise(gm, last_node(gm))
    assert found.position is None and "example_inputs" in found.refusal.reason


def test_batch_norm_input_refusals():
    x = torch.randn(2, 3, 4, 4)
    gm = traced(_bn(nn.BatchNorm2d, 3), x)
    target = BATCH_NORM.input_target(gm, last_node(gm))
    assert isinstance(target, Target)
    assert "zero entries" in target.refuse(torch.tensor([1.0, 0.0, 1.0])).reason
    assert "overflows" in target.refuse(torch.tensor([1.0, 1e-30, 1.0])).reason
    gm.get_submodule("0").train()
    assert "batch statistics" in target.refuse(torch.ones(3)).reason
