"""The sdpa rule: a scale on F.scaled_dot_product_attention's value features folds into the value
projection's rows, for a separate value projection and for the value third of a fused qkv; refused where the
value is read elsewhere, is no projection, or its layout is unknown; no placement site."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from layer_rule_checks import check_output_fold, last_node, traced
from torch import nn

import asr_fx
from asr_fx.passes.layers.base import LayerMatch, NoMatch, Refusal, Target
from asr_fx.passes.layers.registry import layer_at
from asr_fx.passes.layers.sdpa import SDPA

DIM, HEADS = 12, 3


class SeparateProjections(nn.Module):
    """q, k, v projections of their own, heads split by view + transpose."""

    def __init__(self, causal=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.causal = causal

    def heads(self, t):
        b, n, c = t.shape
        return t.view(b, n, HEADS, c // HEADS).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class FusedQkv(nn.Module):
    """timm's layout: one qkv projection, reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4), then q, k, v."""

    def __init__(self, unbind=True, scale=None):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.unbind, self.scale = unbind, scale

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


class ValueReadTwice(SeparateProjections):
    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        return F.scaled_dot_product_attention(q, k, v) + v.mean()


class NoProjection(nn.Module):
    def forward(self, x):
        t = x.view(x.shape[0], x.shape[1], HEADS, DIM // HEADS).transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t.exp())


X = torch.randn(2, 5, DIM)


@pytest.mark.parametrize("model", [SeparateProjections(), SeparateProjections(causal=True), FusedQkv(),
                                   FusedQkv(unbind=False, scale=0.3)], ids=["separate", "causal", "qkv", "qkv-index"])
def test_a_scale_on_the_value_features_folds_into_the_value_rows(model):
    gm = traced(model, X)
    node = last_node(gm)
    found = SDPA.recognise(gm, node)
    assert isinstance(found, LayerMatch) and (found.channels, found.position) == (DIM // HEADS, -1)
    assert not SDPA.is_site and layer_at(gm, node) is None  # no placement site after it
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    target = check_output_fold(SDPA, gm, node, X)
    assert target.kind == "sdpa-value"
    changed = {k for k, v in gm.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= {"0.v.weight", "0.v.bias", "0.qkv.weight", "0.qkv.bias"} and changed


def test_only_the_value_rows_of_a_fused_qkv_change():
    gm = traced(FusedQkv(), X)
    weight = gm.get_submodule("0.qkv").weight.detach().clone()
    target = SDPA.output_target(gm, last_node(gm))
    assert isinstance(target, Target)
    with torch.no_grad():
        target.apply(torch.full((DIM // HEADS,), 2.0))
    after = gm.get_submodule("0.qkv").weight.detach()
    assert torch.equal(after[:2 * DIM], weight[:2 * DIM])
    assert torch.allclose(after[2 * DIM:], 2 * weight[2 * DIM:])


@pytest.mark.parametrize("model, words", [
    (ValueReadTwice(), "read elsewhere"),
    (NoProjection(), "no linear projection"),
])
def test_a_value_that_cannot_take_the_scale_is_refused_with_a_reason(model, words):
    gm = traced(model, X)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target))
    refused = SDPA.output_target(gm, node)
    assert isinstance(refused, Refusal) and words in refused.reason
    assert isinstance(SDPA.recognise(gm, node), NoMatch)


def test_without_recorded_shapes_it_asks_for_example_inputs():
    gm = traced(FusedQkv(), X, shapes=False)
    refused = SDPA.output_target(gm, last_node(gm))
    assert isinstance(refused, Refusal) and "example_inputs" in refused.reason


def test_other_nodes_are_no_match():
    gm = traced(nn.Linear(DIM, DIM), X)
    assert isinstance(SDPA.output_target(gm, last_node(gm)), NoMatch)
    assert isinstance(SDPA.input_target(gm, last_node(gm)), NoMatch)


class ScaledAttention(FusedQkv):
    """A layer scale on the attention output, before the heads are merged."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(DIM // HEADS) + 0.5)

    def forward(self, x):
        return super().forward(x) * self.gamma


def test_fuse_folds_a_constant_scale_after_sdpa():
    model = ScaledAttention().eval()
    fused = asr_fx.fuse(model, example_inputs=(X,))
    assert isinstance(fused, fx.GraphModule)
    assert not [n for n in fused.graph.nodes if n.op == "get_attr" and "gamma" in str(n.target)]
    with torch.no_grad():
        want, got = model(X), fused(X)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert [(r.where, r.into) for r in asr_fx.fusion_report(fused).records] == [("sdpa-value", "qkv")]
