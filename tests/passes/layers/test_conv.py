"""The conv rule: nn.Conv*d calls, channels first, a scale folds on either side (grouped convs too)."""

import pytest
import torch
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, NoMatch
from asr_fx.passes.layers.conv import CONV


@pytest.mark.parametrize("conv, x", [
    (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 9)),
    (nn.Conv2d(4, 6, 3, groups=2), torch.randn(2, 4, 7, 7)),
    (nn.Conv3d(2, 3, 1, bias=False), torch.randn(1, 2, 3, 3, 3)),
])
def test_conv_recognised_and_folds_both_sides(conv, x):
    gm = traced(conv, x)
    node = last_node(gm)
    found = CONV.recognise(gm, node)
    assert isinstance(found, LayerMatch)
    assert (found.channels, found.position, found.refusal) == (conv.out_channels, -(conv.weight.dim() - 1), None)
    assert check_output_fold(CONV, gm, node, x).kind == "conv"
    gm = traced(conv, x)
    assert check_input_fold(CONV, gm, last_node(gm), x).kind == "next-conv"


def test_conv_refuses_other_layers_and_composites():
    class ConvAct(nn.Conv2d):  # overrides the conv's forward: a scale after it does not commute in
        def forward(self, x):
            return torch.relu(super().forward(x))

    x = torch.randn(1, 3, 5, 5)
    for model in (nn.ConvTranspose2d(3, 4, 3), ConvAct(3, 4, 3), nn.Linear(5, 5)):
        gm = traced(model, x)
        found = CONV.recognise(gm, last_node(gm))
        assert isinstance(found, NoMatch) and found.reason
        assert isinstance(CONV.output_target(gm, last_node(gm)), NoMatch)
