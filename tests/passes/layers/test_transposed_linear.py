"""The transposed-linear rule: transformers' Conv1D (GPT-2), ``x @ W + b`` with W (in, out); a scale folds on
either side; a subclass that overrides its forward is not this layer."""

import pytest
import torch
from layer_rule_checks import check_input_fold, check_output_fold, last_node, traced

from asr_fx.passes.layers.base import LayerMatch, NoMatch
from asr_fx.passes.layers.transposed_linear import TRANSPOSED_LINEAR

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")


def _conv1d(nf: int = 7, nx: int = 5):
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(nf, nx)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_conv1d_is_one_call_recognised_and_folds_both_sides():
    layer, x = _conv1d(), torch.randn(3, 4, 5)
    gm = traced(layer, x)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]  # kept whole
    found = TRANSPOSED_LINEAR.recognise(gm, last_node(gm))
    assert isinstance(found, LayerMatch) and (found.channels, found.position, found.module) == (7, -1, "0")
    assert check_output_fold(TRANSPOSED_LINEAR, gm, last_node(gm), x).kind == "linear"
    gm = traced(layer, x)
    assert check_input_fold(TRANSPOSED_LINEAR, gm, last_node(gm), x).kind == "next-linear"


def test_a_conv1d_subclass_with_its_own_forward_is_not_this_layer():
    class Doubled(pytorch_utils.Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(3, 4, 5)
    gm = traced(Doubled(7, 5), x)
    assert isinstance(TRANSPOSED_LINEAR.recognise(gm, last_node(gm)), NoMatch)
