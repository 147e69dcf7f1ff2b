"""Structures of timm models that used to fail in ``fuse(strict=True)``, each as a small hand-written model.

- a layer shared by several blocks (CoaT's conv position encoding, its parallel blocks' shared MLP):
  a scale after one call cannot fold into it, so ``auto`` places no site there;
- the model's own scales computed from its parameters (EfficientViM's ``sigmoid(alpha)`` branch gates,
  MetaFormer's res-scale, Swin V2's ``logit_scale.exp()``, RDNet's layer scale on a concatenated
  feature): they are not ASR sites, so ``strict`` does not count them; they stay a reported ``mul``;
- SwiftFormer's layer scale after ``reshape(B, -1, H, W)`` of a permuted linear output: it folds back
  into the linear (the fuse used to crash there);
- EfficientFormer's tensor cache in a dict, started anew by ``train()``: restoring it after tracing
  compared tensors and raised in ``instrument``.

Each model: ``instrument`` (rule ``auto``), one SGD step with the ASR blocks moved off their start, eval,
``fuse(strict=True)`` equal to the instrumented model within DESIGN.md's tolerance, and the parameter
count of ``fuse(vanilla)``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FUSE_RTOL, n_params, perturb_asr, rel_err, train_step
from torch import nn

import asr_fx


def _block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))


class SharedPositionEncoding(nn.Module):
    """``x + pos(x)`` before every block with one depthwise ``pos`` conv for all of them (CoaT's ConvPosEnc)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.pos = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.blocks = nn.ModuleList([_block(c), _block(c)])
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + self.pos(x)
            x = torch.relu(x + block(x))
        return self.head(x.mean((2, 3)))


class TiedBranchWeights(nn.Module):
    """Two residual blocks whose last convs share one weight (tied weights, not one module), and a third."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))
        self.b[2].weight = self.a[2].weight
        self.c = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.a(x)
        x = x + self.b(x)
        return x + self.c(x)


class OwnComputedScales(nn.Module):
    """The model's own scales computed from parameters, next to ordinary residual blocks:
    ``x + sigmoid(alpha) * (dw(x) - x)`` (EfficientViM), a res-scale ``x * gamma.view(...)`` on the
    shortcut (MetaFormer) and ``(q @ k^T) * logit_scale.exp()`` (Swin V2's cosine attention)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c))
        self.alpha = nn.Parameter(torch.linspace(-1, 1, c))
        self.res_scale = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.block = _block(c)
        self.logit_scale = nn.Parameter(torch.tensor(0.3))
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + torch.sigmoid(self.alpha).view(-1, 1, 1) * (self.dw(x) - x)
        x = x * self.res_scale.view(-1, 1, 1) + self.block(x)
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q = nn.functional.normalize(t, dim=-1)
        attn = ((q @ q.transpose(1, 2)) * self.logit_scale.exp()).softmax(-1)
        return t + self.proj(attn @ t)


class TokenMixerLayerScale(nn.Module):
    """SwiftFormer's block end: ``x + layer_scale * final(tokens).permute(0, 2, 1).reshape(B, -1, H, W)``;
    the layer scale moves back through the reshape and the permute into ``final``'s rows."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.block = _block(c)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.final = nn.Linear(c, c)
        self.layer_scale = nn.Parameter(torch.linspace(0.5, 1.5, c).reshape(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        b, _, h, w = x.shape
        tokens = x.flatten(2).permute(0, 2, 1)
        return x + self.layer_scale * self.final(tokens).permute(0, 2, 1).reshape(b, -1, h, w)


class CachedAttentionBias(nn.Module):
    """A block that caches a tensor in a dict on its first eval call and starts a new cache in
    ``train()`` (EfficientFormer's ``attention_bias_cache``), then a residual block."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(c, 4))
        self.index = nn.Parameter(torch.tensor([0, 1, 0]), requires_grad=False)
        self.cache: dict[str, torch.Tensor] = {}
        self.block = _block(c)

    def train(self, mode: bool = True) -> CachedAttentionBias:
        super().train(mode)
        self.cache = {}
        return self

    def biases(self) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.bias[:, self.index]
        if "b" not in self.cache:
            self.cache["b"] = self.bias[:, self.index]
        return self.cache["b"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.biases().sum(1).view(-1, 1, 1)
        return x + self.block(x)


def _instrument_train_fuse(vanilla: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    model = asr_fx.instrument(vanilla, example_inputs=(x,))
    perturb_asr(model)
    train_step(model, x)
    model.eval()
    return model, asr_fx.fuse(model, strict=True, example_inputs=(x,))


@pytest.mark.parametrize("factory, shared", [(SharedPositionEncoding, "pos"), (TiedBranchWeights, "b.2")])
def test_auto_places_no_site_after_a_shared_layer(factory, shared):
    torch.manual_seed(0)
    vanilla, x = factory().eval(), torch.randn(2, 3, 12, 12)
    every = asr_fx.find_sites(vanilla, rule="residual", example_inputs=(x,))
    assert any(s.module == shared for s in every), "the residual rule lists the shared layer's sites"
    auto = asr_fx.find_sites(vanilla, example_inputs=(x,))
    assert auto and not any(s.module == shared for s in auto)
    model, fused = _instrument_train_fuse(vanilla, x)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    assert n_params(fused) == n_params(asr_fx.fuse(vanilla, example_inputs=(x,)))


def test_a_site_after_a_shared_layer_still_refuses_strict():
    """Named explicitly (``sites=``), a site after the shared conv is placed and ``strict`` refuses it."""
    torch.manual_seed(0)
    vanilla, x = SharedPositionEncoding().eval(), torch.randn(2, 3, 12, 12)
    model = asr_fx.instrument(vanilla, sites=["pos"], example_inputs=(x,)).eval()
    with pytest.raises(asr_fx.FusionError, match="called at 2 places"):
        asr_fx.fuse(model, strict=True, example_inputs=(x,))


def test_the_models_own_computed_scales_are_not_asr_sites():
    torch.manual_seed(0)
    vanilla, x = OwnComputedScales().eval(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # written into the user's class, not a GraphModule with a warning
        model, fused = _instrument_train_fuse(vanilla, x)
    # the res-scale stays a multiply of the model's own (constant-folded to `_folded_view_1`): its trained value
    # goes back into the class, not the ones of a scale folded into a layer
    assert type(fused) is OwnComputedScales and torch.equal(fused.res_scale, model.res_scale)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    report = asr_fx.fusion_report(fused)
    own = [r for r in report.records if not r.folded]
    assert len(own) == 3 and all(r.from_attention and not report.is_asr_site(r) for r in own)
    assert not report.unfolded
    sites = {s["node"] for s in asr_fx.asr_config(model).sites}
    assert sites and all(r.folded for r in report.records if r.site.removeprefix("asr.") in sites)
    assert n_params(fused) == n_params(vanilla)


class ValueCheckedOwnScales(nn.Module):
    """:class:`OwnComputedScales` behind a check on input values: instrumented part by part."""

    def __init__(self) -> None:
        super().__init__()
        self.body = OwnComputedScales()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() == 0:
            raise ValueError("empty image")
        return self.body(x)


def test_the_models_own_computed_scales_in_a_captured_part_are_not_asr_sites():
    """Fused part by part: the joined report knows the parts' ASR blocks too."""
    torch.manual_seed(0)
    vanilla, x = ValueCheckedOwnScales().eval(), torch.randn(2, 3, 8, 8)
    model, fused = _instrument_train_fuse(vanilla, x)
    assert asr_fx.get_config(model)["parts"] == ["body"]
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    report = asr_fx.fusion_report(fused)
    assert report.blocks and len([r for r in report.records if not r.folded]) == 3 and not report.unfolded


def test_without_asr_blocks_every_computed_scale_counts():
    """A model with no ASR block (ASR written by hand on a plain psi): a computed scale that stays a
    ``mul`` is counted, as before."""
    torch.manual_seed(0)
    model, x = OwnComputedScales().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(asr_fx.FusionError, match="3 ASR site"):
        asr_fx.fuse(model, strict=True, example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model, example_inputs=(x,))
    assert len(asr_fx.fusion_report(fused).unfolded) == 3


def test_a_layer_scale_folds_back_through_reshape_and_permute_into_a_linear():
    """SwiftFormer crashed here (``shape '[2, 1]' is invalid``): the backward map through a reshape had
    its input and output shapes swapped (fixed with the scale-algebra refactor); the scale must fold into
    ``final``, channel for channel."""
    torch.manual_seed(0)
    vanilla, x = TokenMixerLayerScale().eval(), torch.randn(2, 3, 6, 5)
    model, fused = _instrument_train_fuse(vanilla, x)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    into = [r.into for r in asr_fx.fusion_report(fused).records if r.folded]
    assert "final" in into
    # fuse of the module form writes the folds into the user's own class, whose forward still multiplies by
    # `layer_scale`: folded into `final`, it is left at ones (kept, not dropped); the graph form drops it
    assert isinstance(fused, TokenMixerLayerScale)
    assert torch.equal(fused.layer_scale, torch.ones_like(fused.layer_scale))
    assert n_params(fused) == n_params(vanilla)
    assert n_params(asr_fx.fuse(vanilla, example_inputs=(x,))) == n_params(vanilla) - 8


def test_a_forward_that_caches_tensors_in_a_dict_instruments():
    """The model was run before (its cache holds a tensor): restoring the cache after tracing and the
    checks compared the dicts, and so two tensors (``Boolean value of Tensor ... is ambiguous``)."""
    torch.manual_seed(0)
    vanilla, x = CachedAttentionBias().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        vanilla(x)
    cached = vanilla.cache["b"]
    model, fused = _instrument_train_fuse(vanilla, x)
    assert list(vanilla.cache) == ["b"] and vanilla.cache["b"] is cached
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
