"""The scale algebra on its own: a constant as a per-channel scale state, reshape maps both ways,
and moving a scale through one op (permutes, commuting ops with their conditions, ops it does not pass)."""

import operator

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from asr_fx.passes.capture.shapes import record_shapes
from asr_fx.passes.capture.trace import trace
from asr_fx.passes.fold.scale_algebra import (
    ScaleState,
    constant_operand,
    map_through,
    per_channel_scale,
    reshape_backward,
    reshape_forward,
)
from asr_fx.passes.graph.refusals import NoMatch, Refusal


def _mul_graph(x_shape):
    graph = fx.Graph()
    x = graph.placeholder("x")
    mul = graph.call_function(operator.mul, (x, 1.0))
    graph.output(mul)
    for node, shape in ((x, x_shape), (mul, x_shape)):
        node.meta["tensor_meta"] = type("Meta", (), {"shape": torch.Size(shape), "dtype": torch.float32})()
    return x, mul


@pytest.mark.parametrize("shape, position", [((1, 4, 1, 1), -3), ((4, 1, 1), -3), ((4,), -1), ((1, 1, 4), -1)])
def test_a_constant_varying_along_one_dim_is_a_per_channel_state(shape, position):
    x, mul = _mul_graph((2, 4, 3, 3) if position == -3 else (2, 3, 4))
    state = per_channel_scale(torch.arange(1.0, 5.0).reshape(shape), mul, x)
    assert isinstance(state, ScaleState)
    assert state.position == position and torch.equal(state.values, torch.arange(1.0, 5.0))


def test_scales_that_are_not_per_channel_are_refused_with_a_reason():
    x, mul = _mul_graph((2, 4, 3, 3))
    assert per_channel_scale(torch.tensor(2.0), mul, x).position is None
    for c, words in ((torch.ones(1, 4, 3, 1), "more than one dimension"), (torch.ones(4, dtype=torch.int64), "dtype"),
                     (torch.ones(1, 1, 2, 4, 3, 3), "larger shape")):
        refused = per_channel_scale(c, mul, x)
        assert isinstance(refused, Refusal) and words in refused.reason


def test_reshape_merging_channels_with_trailing_dims_maps_both_ways():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    forward = reshape_forward((2, 4, 3, 3), (2, 36), v, -3)
    assert isinstance(forward, ScaleState) and forward.position == -1
    assert torch.equal(forward.values, v.repeat_interleave(9))
    back = reshape_backward((2, 4, 3, 3), (2, 36), forward.values, -1)
    assert isinstance(back, ScaleState) and back.position == -3 and torch.equal(back.values, v)


def test_reshapes_that_split_channels_are_refused():
    assert isinstance(reshape_forward((2, 4, 6), (2, 2, 12), torch.arange(4.0), -2), Refusal)
    assert isinstance(reshape_backward((2, 4, 9), (2, 36), torch.arange(36.0), -1), Refusal)  # varies within a channel


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(1, 4))  # one channel: every size-1 dim would do
def test_reshape_forward_then_backward_is_the_identity(batch, channels, inner):
    v = torch.arange(1.0, channels + 1.0)
    forward = reshape_forward((batch, channels, inner), (batch, channels * inner), v, -2)
    assert isinstance(forward, ScaleState)
    back = reshape_backward((batch, channels, inner), (batch, channels * inner), forward.values, forward.position)
    assert isinstance(back, ScaleState) and back.position == -2 and torch.equal(back.values, v)


class _Ops(torch.nn.Module):
    def forward(self, x):
        return torch.sigmoid(torch.relu(x.permute(0, 2, 3, 1)))


def test_a_scale_moves_through_permutes_and_relu_but_not_sigmoid():
    gm = record_shapes(trace(_Ops()), (torch.randn(1, 4, 2, 3),))
    permute, relu, sigmoid = [n for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    state = ScaleState(torch.tensor([1.0, 2.0, 3.0, 4.0]), -3)
    moved = map_through(gm, permute, state, forward=True)
    assert isinstance(moved, ScaleState) and moved.position == -1
    assert map_through(gm, relu, moved, forward=True) == moved
    negative = ScaleState(torch.tensor([1.0, -2.0, 3.0, 4.0]), -1)
    assert isinstance(map_through(gm, relu, negative, forward=True), Refusal)
    assert isinstance(map_through(gm, sigmoid, moved, forward=True), NoMatch)


class _Muls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        return [x * self.c, self.c * x, torch.mul(x, self.c), x.mul(self.c), x * 0.5, x * x]


def test_constant_operand_reads_every_spelling_of_a_multiply_by_a_constant():
    gm = trace(_Muls())
    muls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    found = [constant_operand(gm, m) for m in muls]
    assert all(f is not None and f[0].name == "x" for f in found[:5])
    assert float(found[4][1]) == 0.5 and tuple(found[0][1].shape) == (1, 3, 1, 1)
    assert found[5] is None  # x * x: no constant
