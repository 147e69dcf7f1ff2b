"""The linear rule: nn.Linear calls, features last, a scale folds on either side."""

import torch
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, NoMatch
from asr_fx.passes.layers.linear import LINEAR


def test_linear_recognised_and_folds_both_sides():
    linear, x = nn.Linear(5, 7), torch.randn(3, 4, 5)
    gm = traced(linear, x)
    found = LINEAR.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position, found.module) == (7, -1, "0")
    assert check_output_fold(LINEAR, gm, last_node(gm), x).kind == "linear"
    gm = traced(linear, x)
    assert check_input_fold(LINEAR, gm, last_node(gm), x).kind == "next-linear"


def test_linear_refuses_a_conv():
    gm = traced(nn.Conv1d(2, 2, 1), torch.randn(1, 2, 3))
    assert isinstance(LINEAR.recognise(gm, last_node(gm)), NoMatch)
