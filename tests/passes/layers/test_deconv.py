"""The deconv rule: nn.ConvTranspose*d calls (any groups), a scale folds on either side."""

import pytest
import torch
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, NoMatch
from asr_fx.passes.layers.deconv import DECONV


@pytest.mark.parametrize("groups", [1, 2])
def test_deconv_recognised_and_folds_both_sides(groups):
    deconv, x = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups), torch.randn(2, 4, 5, 5)
    gm = traced(deconv, x)
    found = DECONV.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (6, -3)
    assert check_output_fold(DECONV, gm, last_node(gm), x).kind == "conv"
    gm = traced(deconv, x)
    assert check_input_fold(DECONV, gm, last_node(gm), x).channels == 4


def test_deconv_is_not_a_conv():
    gm = traced(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4))
    assert isinstance(DECONV.recognise(gm, last_node(gm)), NoMatch)
