"""Issue 6: asr_fx.testing.assert_fusion_equivalent, the check users put in their CI (and ours runs on
the built-in models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedBN, perturb_asr

import asr_fx
from asr_fx.models import cifar_resnet, resnet164
from asr_fx.testing import assert_fusion_equivalent


def _instrumented(factory, seed: int = 0):
    torch.manual_seed(seed)
    vanilla = factory().eval()
    model = asr_fx.instrument(vanilla)
    perturb_asr(model, seed)
    return vanilla, model


def test_builtin_cifar_resnet_11_fuses_equivalently_in_torch_and_onnxruntime():
    vanilla, model = _instrumented(lambda: cifar_resnet(11))
    model.train()
    fused = assert_fusion_equivalent(model, torch.randn(2, 3, 32, 32), vanilla=vanilla, onnx=True)
    assert model.training  # the model's mode is restored
    assert not any("asr" in name for name, _ in fused.named_modules())


def test_builtin_resnet164_fuses_equivalently():
    _, model = _instrumented(resnet164)
    assert_fusion_equivalent(model.eval(), torch.randn(2, 3, 32, 32))




def test_an_unfolded_site_fails_with_the_site_named():
    model = asr_fx.instrument(SharedBN(), sites=["bn_1"]).eval()
    perturb_asr(model)
    with pytest.raises(AssertionError, match=r"left ASR sites unfolded(.|\n)*asr\.bn_1"):
        assert_fusion_equivalent(model, torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match="could not be folded"):  # not strict: equivalent, one constant Mul stays
        fused = assert_fusion_equivalent(model, torch.randn(1, 3, 8, 8), strict=False)
    assert [r.site for r in asr_fx.fusion_report(fused).unfolded] == ["asr.bn_1"]


def test_a_wrong_fusion_fails_with_the_error_and_where(monkeypatch):
    _, model = _instrumented(lambda: cifar_resnet(11))
    real_fuse = asr_fx.testing.fuse

    def broken_fuse(m, **kwargs):
        fused = real_fuse(m, **kwargs)
        with torch.no_grad():
            fused.fc.bias[3] += 1.0
        return fused

    monkeypatch.setattr(asr_fx.testing, "fuse", broken_fuse)
    with pytest.raises(AssertionError) as info:
        assert_fusion_equivalent(model.eval(), torch.randn(2, 3, 32, 32))
    message = str(info.value)
    assert "not equivalent" in message and "output0: max|fused - original| = 1" in message
    assert "rtol 1e-05" in message and ", 3)" in message  # the worst index is in column 3
    assert "fusion report" in message


def test_a_fusion_that_mutates_the_model_fails(monkeypatch):
    _, model = _instrumented(lambda: cifar_resnet(11))
    real_fuse = asr_fx.testing.fuse

    def mutating_fuse(m, **kwargs):
        with torch.no_grad():
            m.fc.bias.add_(0.0 + 1.0)
        return real_fuse(m, **kwargs)

    monkeypatch.setattr(asr_fx.testing, "fuse", mutating_fuse)
    with pytest.raises(AssertionError, match="changed the model it was given: \\['fc.bias'\\]"):
        assert_fusion_equivalent(copy.deepcopy(model).eval(), torch.randn(1, 3, 32, 32))


def test_checks_run_without_tf32_and_restore_the_flags(monkeypatch):
    """TF32 would make CUDA fp32 errors ~1e-4; CPU only here, so the flags are checked, not a GPU run."""
    from asr_fx import testing

    seen = []
    real_fuse = testing.fuse

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real_fuse(*args, **kwargs)

    monkeypatch.setattr(testing, "fuse", spy)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model = asr_fx.instrument(asr_fx.models.cifar_resnet(11), example_inputs=(torch.zeros(1, 3, 32, 32),))
        testing.assert_fusion_equivalent(model, torch.randn(1, 3, 32, 32))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
