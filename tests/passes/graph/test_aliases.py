"""The alias/write analysis on its own: which values share storage, and when erasing a multiply would
change what something reads (an in-place write into a model input, or into storage another value reads)."""

import torch
from torch import nn

from asr_fx.passes.capture.trace import trace
from asr_fx.passes.graph.aliases import alias_descendants, erase_refusal, storage_root


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


class ViewThenScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.c = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        return (y * self.c).flatten(1)


def test_views_share_storage_and_values_only_erase_freely():
    gm = trace(ViewThenScale())
    nodes = _nodes(gm)
    mul, flatten = nodes["mul"], nodes["flatten"]
    assert storage_root(gm, flatten) is mul
    assert alias_descendants(gm, mul) == [mul, flatten]
    assert erase_refusal(gm, mul, nodes["conv"]) is None


class InplaceIntoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        x.mul_(self.c)
        return x


def test_an_in_place_multiply_of_a_model_input_is_refused():
    gm = trace(InplaceIntoInput())
    mul = next(n for n in gm.graph.nodes if n.op == "call_method")
    reason = erase_refusal(gm, mul, mul.args[0])
    assert reason is not None and "model input" in reason.reason


class InplaceWithSecondReader(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.c = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        y = self.conv(x)
        z = y.relu()
        y.mul_(self.c)
        return y + z


def test_an_in_place_multiply_whose_storage_another_value_read_before_is_refused():
    gm = trace(InplaceWithSecondReader())
    nodes = _nodes(gm)
    mul = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mul_")
    reason = erase_refusal(gm, mul, nodes["conv"], {n: i for i, n in enumerate(gm.graph.nodes)})
    assert reason is not None and "relu" in reason.reason
