"""asr_fx.testing: assert_fusion_equivalent, the check users put in their CI (and ours runs on the built-in
models), and the comparison with the vanilla model that --strict runs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SharedBN, perturb_asr

import asr_fx
from asr_fx.models import cifar_resnet, resnet164
from asr_fx.testing import assert_fusion_equivalent, assert_same_as_vanilla, compare_with_vanilla


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


def _conv_bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1)).eval()


def test_compare_with_vanilla_finds_the_fused_model_the_vanilla_size_and_structure(tmp_path):
    vanilla = _conv_bn_net()
    model = asr_fx.instrument(vanilla, sites=["1"])
    perturb_asr(model)
    x = torch.randn(1, 3, 8, 8)
    fused = asr_fx.fuse(model.eval(), strict=True, example_inputs=(x,))
    result = compare_with_vanilla(vanilla, x, fused=fused, onnx=True)
    assert result.same_params is True and result.same_op_counts is True and result.problems() == []
    assert result.reference is vanilla and vanilla.training is False
    asr_fx.export_onnx(fused, tmp_path / "fused.onnx", x, reference=model)
    from_file = assert_same_as_vanilla(vanilla, x, onnx_file=tmp_path / "fused.onnx")
    assert from_file.op_counts == result.op_counts and from_file.params is None  # a file: ops only


def test_compare_with_vanilla_names_a_difference_and_the_assertion_fails():
    torch.manual_seed(0)
    vanilla = SharedBN().eval()
    model = asr_fx.instrument(vanilla, sites=["bn_1"]).eval()
    perturb_asr(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(UserWarning, match="could not be folded"):  # the site stays as one constant Mul
        kept = asr_fx.fuse(model, example_inputs=(x,))
    with pytest.raises(AssertionError, match=r"op multiset differs(.|\n)*Mul"):
        assert_same_as_vanilla(vanilla, x, fused=kept, onnx=True)
    bigger = torch.nn.Sequential(copy.deepcopy(vanilla), torch.nn.Conv2d(8, 8, 1)).eval()
    result = compare_with_vanilla(bigger, x, fused=kept)
    assert result.same_params is False and "parameters, the vanilla model" in result.problems()[0]
    assert result.same_op_counts is None  # not asked for


def test_compare_with_vanilla_with_fold_bn_compares_with_bn_folded_too():
    vanilla = _conv_bn_net()
    model = asr_fx.instrument(vanilla, sites=["1"])
    x = torch.randn(1, 3, 8, 8)
    fused = asr_fx.fuse(model.eval(), strict=True, fold_bn=True, example_inputs=(x,))
    plain = compare_with_vanilla(vanilla, x, fused=fused)
    assert plain.same_params is False and "the vanilla model " in plain.problems()[0]  # BN's parameters are gone
    folded = compare_with_vanilla(vanilla, x, fused=fused, fold_bn=True, onnx=True)
    assert folded.same_params is True and folded.same_op_counts is True
    assert "BatchNormalization" not in folded.vanilla_op_counts and folded.reference is not vanilla


def test_fuse_strict_raises_fusion_error_with_its_report():
    model = asr_fx.instrument(SharedBN(), sites=["bn_1"]).eval()
    perturb_asr(model)
    with pytest.raises(asr_fx.FusionError) as info:
        asr_fx.fuse(model, strict=True, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert isinstance(info.value.report, asr_fx.FusionReport)
    assert [r.site for r in info.value.report.unfolded] == ["asr.bn_1"]
