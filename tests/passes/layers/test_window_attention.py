"""The window attention rule: torchvision's shifted_window_attention call is a site (features last)
whose scale cannot fold, and the rule says why."""

import torch
from layer_rule_checks import last_node, traced
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from asr_fx.passes.layers.base import LayerMatch, NoMatch, Refusal
from asr_fx.passes.layers.window_attention import WINDOW_ATTENTION


def test_window_attention_is_a_site_that_refuses_a_scale():
    x = torch.randn(1, 4, 4, 8)
    gm = traced(ShiftedWindowAttention(8, [2, 2], [0, 0], num_heads=2).eval(), x)
    node = last_node(gm)
    found = WINDOW_ATTENTION.recognise(gm, node)
    assert isinstance(found, LayerMatch)
    assert (found.channels, found.position, found.module, found.fold_target) == (8, -1, "0", "0.proj")
    assert found.refusal is not None and "shifted_window_attention" in found.refusal.reason
    refused = WINDOW_ATTENTION.output_target(gm, node)
    assert isinstance(refused, Refusal) and refused == found.refusal


def test_other_calls_are_no_window_attention():
    gm = traced(nn.Linear(4, 4), torch.randn(2, 4))
    assert isinstance(WINDOW_ATTENTION.recognise(gm, last_node(gm)), NoMatch)
    assert isinstance(WINDOW_ATTENTION.output_target(gm, last_node(gm)), NoMatch)
