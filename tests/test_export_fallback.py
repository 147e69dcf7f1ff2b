"""export_onnx falls back to torch's TorchScript exporter where the dynamo exporter fails, says so in
the report, verifies the file the same way, and names both errors when both fail."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import asr_fx
from asr_fx import export
from asr_fx.errors import ExportError


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5)).eval()


def _dynamo_fails(*_args, **_kwargs):
    raise RuntimeError("dynamo cannot export this")


def test_dynamo_failure_falls_back_to_torchscript_verified_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_export_dynamo", _dynamo_fails)
    report = asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8),
                                dynamic=("batch", "height", "width"))
    assert report.exporter == "torchscript" and "dynamo cannot export this" in report.exporter_note
    assert report.verified and report.ok and report.to_dict()["exporter"] == "torchscript"
    assert [o.name for o in report.outputs] == ["output_0", "output_0 (batch 1)", "output_0 (batch 7)",
                                               "output_0 (12x10)"]  # verified at other batch sizes and sizes
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_default_export_uses_dynamo(tmp_path):
    report = asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert report.exporter == "dynamo" and report.exporter_note == ""


def test_both_exporters_failing_names_both_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_export_dynamo", _dynamo_fails)
    monkeypatch.setattr(export, "_export_torchscript", lambda *a, **k: (_ for _ in ()).throw(ValueError("no jit")))
    with pytest.raises(ExportError, match="dynamo cannot export this.*TorchScript exporter .dynamo=False. failed "
                                          "too: ValueError: no jit"):
        asr_fx.export_onnx(small(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_keyword_inputs_are_not_retried(tmp_path, monkeypatch):
    class Keyword(nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return image * 2

    monkeypatch.setattr(export, "_export_dynamo", _dynamo_fails)
    with pytest.raises(ExportError, match="dynamo cannot export this") as info:
        asr_fx.export_onnx(Keyword(), tmp_path / "m.onnx", {"image": torch.randn(1, 3)})
    assert "TorchScript" not in str(info.value)


def test_hugging_face_swin_exports_through_the_fallback(tmp_path):
    """torch 2.14's dynamo exporter fails on HF Swin (a view of a transposed attention output in its ONNX
    decomposition); the fused ASR Swin is written by the TorchScript exporter and agrees in onnxruntime."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                     window_size=4, num_labels=3)
    model = transformers.SwinForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = asr_fx.fuse(asr_fx.instrument(model, example_inputs=(x,)).eval(), strict=True, example_inputs=(x,))
    report = asr_fx.export_onnx(fused, tmp_path / "swin.onnx", x)
    assert report.ok and report.verified
    assert report.exporter in ("dynamo", "torchscript")  # dynamo where a later torch fixes it
    if report.exporter == "torchscript":
        assert "Cannot view a tensor" in report.exporter_note


def test_the_fallback_refuses_to_freeze_data_dependent_control_flow(tmp_path):
    """TorchScript would trace one branch of ``if x.sum() > 0`` and the file would pass verification on
    that input: every TracerWarning is an error, so both exporters refuse and nothing is written."""

    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(ExportError, match="TorchScript exporter .dynamo=False. failed too: .*TracerWarning"):
        asr_fx.export_onnx(Branchy(), tmp_path / "m.onnx", torch.ones(1, 3))
    assert os.listdir(tmp_path) == []
