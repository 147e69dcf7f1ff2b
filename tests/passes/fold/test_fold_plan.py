"""Planning a fold on its own: whether a layer takes a scale state (channels, axis, shared layers),
a dtype that a fold would change, a scale through a channel cat; planning changes nothing."""

import torch
from torch import nn

from asr_fx.passes.capture.shapes import record_shapes
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.fold.fold_plan import dtype_refusal, match, through_cat
from asr_fx.passes.fold.scale_algebra import ScaleState
from asr_fx.passes.graph.refusals import Refusal
from asr_fx.passes.layers.base import Target, TensorUsage
from asr_fx.passes.layers.registry import output_target


class TwoConvsCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def _graph():
    gm = record_shapes(trace(TwoConvsCat().eval()), (torch.randn(1, 3, 4, 4),))
    return gm, {n.name: n for n in gm.graph.nodes}


def test_match_gives_the_scale_along_the_layers_channels_and_changes_nothing():
    gm, nodes = _graph()
    target = output_target(gm, nodes["a"])
    assert isinstance(target, Target)
    before = gm.a.weight.clone()
    vec = match(target, ScaleState(torch.tensor([2.0, 3.0]), -3), TensorUsage(gm))
    assert torch.equal(vec, torch.tensor([2.0, 3.0])) and torch.equal(gm.a.weight, before)
    broadcast = match(target, ScaleState(torch.tensor(2.0), None), TensorUsage(gm))
    assert torch.equal(broadcast, torch.tensor([2.0, 2.0]))
    for state in (ScaleState(torch.ones(3), -3), ScaleState(torch.ones(2), -1)):
        refused = match(target, state, TensorUsage(gm))
        assert isinstance(refused, Refusal) and "does not lie along" in refused.reason


def test_a_float64_scale_on_a_float32_layer_is_refused():
    gm, nodes = _graph()
    target = output_target(gm, nodes["a"])
    refused = dtype_refusal(torch.ones(1, 2, 1, 1, dtype=torch.float64), [(target, torch.ones(2))])
    assert isinstance(refused, Refusal) and "float64" in refused.reason
    assert dtype_refusal(torch.tensor(2.0, dtype=torch.float64), [(target, torch.ones(2))]) is None


def test_a_scale_on_one_piece_of_a_channel_cat_is_ones_elsewhere():
    gm, nodes = _graph()
    moved = through_cat(gm, nodes["cat"], nodes["b"], ScaleState(torch.tensor([1.0, 2.0, 3.0, 4.0]), -3))
    assert isinstance(moved, ScaleState) and moved.position == -3
    assert torch.equal(moved.values, torch.tensor([1.0, 1.0, 1.0, 2.0, 3.0, 4.0]))
