"""The module form refuses to run once a block lost its place: a library's own ``fuse()`` (ultralytics'
``DetectionModel.fuse()``, called by its predict/val) folds each Conv's BatchNorm into the conv and deletes
the BatchNorm, which would drop the ASR BN form (or a hook on the BN) and compute without ASR, silently."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb_asr, rel_err
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import asr_fx
from asr_fx.errors import DetachedBlockError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class ConvBNAct(nn.Module):
    """ultralytics' ``Conv``: ``act(bn(conv(x)))``; ``forward_fuse`` once the BN is folded into the conv."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SelfFusing(nn.Module):
    """A model whose own ``fuse()`` swaps each Conv+BN for a fused conv and deletes the BN, as ultralytics does."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(ConvBNAct(3, 8), ConvBNAct(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def fuse(self) -> SelfFusing:
        for m in self.modules():
            if isinstance(m, ConvBNAct) and hasattr(m, "bn"):
                m.conv = fuse_conv_bn_eval(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse  # type: ignore[method-assign]
        return self


def _instrumented(bn_affine_form: bool) -> SelfFusing:
    torch.manual_seed(0)
    model = asr_fx.instrument(SelfFusing(), sites=["model.0.bn", "model.1.bn"], example_inputs=(X,),
                              bn_affine_form=bn_affine_form)
    assert isinstance(model, SelfFusing)
    perturb_asr(model)
    return model.eval()


@pytest.mark.parametrize("bn_affine_form", [True, False], ids=["bn_form", "hook"])
def test_the_models_own_fuse_dropping_the_blocks_is_refused_at_the_next_forward(bn_affine_form):
    model = _instrumented(bn_affine_form)
    model(X)
    model.fuse()
    with pytest.raises(DetachedBlockError, match=r"model\.0\.bn.*model\.1\.bn.*asr_fx\.fuse\(model\) first") as info:
        model(X)
    assert info.value.sites == ["model.0.bn", "model.1.bn"]


def test_asr_fx_fuse_first_then_the_models_own_fuse_keeps_asr():
    model = _instrumented(True)
    with torch.no_grad():
        expected = model(X)
        fused = asr_fx.fuse(model, example_inputs=(X,))
        assert isinstance(fused, SelfFusing)
        assert rel_err(expected, fused.fuse()(X)) <= 1e-5


def test_a_copy_and_a_module_replaced_elsewhere_still_run():
    model = _instrumented(True)
    twin = copy.deepcopy(model)
    twin.model[1].act = nn.ReLU()  # not on a block's path: the blocks are all in place
    twin(X)
    model.fuse()  # the original's blocks go; the copy's stay
    twin(X)
    with pytest.raises(DetachedBlockError):
        model(X)


def test_the_check_does_not_recompile_under_torch_compile():
    model = _instrumented(True).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(X).sum().backward()


def test_a_part_wrapped_after_instrument_keeps_its_blocks_and_a_layer_replaced_inside_it_is_refused():
    class Wrapped(nn.Module):  # what a gradient-checkpointing wrapper does: the part moves one level down
        def __init__(self, part: nn.Module) -> None:
            super().__init__()
            self.part = part

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.part(x)

    model = _instrumented(True)
    expected = model(X)
    model.model = Wrapped(model.model)
    assert rel_err(expected, model(X)) <= 1e-6
    model.model.part[1].bn = nn.BatchNorm2d(8).eval()  # a new norm: its block would take no part
    with pytest.raises(DetachedBlockError, match=r"\['model\.part\.1\.bn'\]"):
        model(X)
