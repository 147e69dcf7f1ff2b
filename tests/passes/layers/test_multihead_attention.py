"""The multi-head attention rule: mha(...)[0] is a layer whose features take a scale in out_proj."""

import torch
from layer_rule_checks import check_output_fold, last_node, traced
from torch import nn

from asr_fx.passes.layers.base import LayerMatch, NoMatch
from asr_fx.passes.layers.multihead_attention import MULTIHEAD_ATTENTION


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_attention_output_recognised_and_folds_into_out_proj():
    x = torch.randn(2, 5, 8)
    gm = traced(SelfAttention().eval(), x)
    node = last_node(gm)
    found = MULTIHEAD_ATTENTION.recognise(gm, node)
    assert isinstance(found, LayerMatch)
    assert (found.channels, found.position, found.module, found.fold_target) == (8, -1, "0.mha", "0.mha.out_proj")
    target = check_output_fold(MULTIHEAD_ATTENTION, gm, node, x)
    assert (target.label, target.kind) == ("0.mha.out_proj", "linear")


def test_the_attention_call_itself_is_no_layer():
    gm = traced(SelfAttention().eval(), torch.randn(2, 5, 8))
    call = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert isinstance(MULTIHEAD_ATTENTION.recognise(gm, call), NoMatch)
