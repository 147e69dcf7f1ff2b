"""instrument/fuse accept example_inputs as a tensor or a tuple, place ASR state like the model,
and report bad options and bad inputs as asr-fx errors."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSE_RTOL, perturb_asr, rel_err

import asr_fx
from asr_fx.models import cifar_resnet


def test_a_bare_tensor_is_one_example_input():
    x = torch.randn(2, 3, 32, 32)
    model = asr_fx.instrument(cifar_resnet(11), example_inputs=x)
    assert asr_fx.get_config(model)["input_shape"] == [2, 3, 32, 32]
    perturb_asr(model)
    fused = asr_fx.fuse(model.eval(), example_inputs=x)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= FUSE_RTOL
    assert len(asr_fx.find_sites(cifar_resnet(11), example_inputs=x)) == 3


def test_example_inputs_that_do_not_fit_are_one_clear_error():
    with pytest.raises(asr_fx.InputShapeError, match=r"example_inputs of shape\(s\) \[\(3, 32, 32\), \(3, 32, 32\)\]"):
        asr_fx.instrument(cifar_resnet(11), example_inputs=list(torch.randn(2, 3, 32, 32)))


def test_unknown_rule_and_bad_delta_are_asr_errors_and_value_errors():
    with pytest.raises(asr_fx.InvalidOptionError, match="unknown rule 'residul'"):
        asr_fx.instrument(cifar_resnet(11), rule="residul")
    with pytest.raises(ValueError, match="delta"):
        asr_fx.instrument(cifar_resnet(11), delta=0)


def test_asr_blocks_follow_the_models_dtype():
    model = asr_fx.instrument(cifar_resnet(11).double())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()


def test_asr_blocks_follow_the_models_device():
    model = asr_fx.instrument(cifar_resnet(11).to("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.asr.layer1_0_bn3.psi.device.type == "meta"


def test_dynamic_batch_export_from_a_batch_of_one(tmp_path):
    from asr_fx import onnx_runtime

    model = asr_fx.instrument(cifar_resnet(11)).eval()
    fused = asr_fx.fuse(model)
    report = asr_fx.export_onnx(fused, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32), dynamic_batch=True)
    assert report.ok
    x = torch.randn(7, 3, 32, 32)
    (out,), _, _ = onnx_runtime.run(str(tmp_path / "m.onnx"), (x,))
    with torch.no_grad():
        assert rel_err(fused(x), torch.from_numpy(out)) <= 1e-4
