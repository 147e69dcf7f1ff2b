"""A second runtime: the fused ONNX file verified in OpenVINO's CPU plugin as in onnxruntime.

The OpenVINO cases run when the ``openvino`` extra is installed (``pytest.importorskip``); the
missing-OpenVINO error is tested without it (the import is made to fail).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import perturb_asr

import asr_fx
from asr_fx import cli
from asr_fx.errors import InvalidOptionError, MissingDependencyError, VerificationError

VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64,
       "num_classes": 10}
# name: (factory, keyword arguments, input shape, instrument keyword arguments)
MODELS = {
    "resnet18": ("torchvision.models:resnet18", {"num_classes": 10}, (1, 3, 64, 64), {}),
    "vit": ("torchvision.models:VisionTransformer", VIT, (1, 3, 32, 32), {"preset": "transformer"}),
}


def _instrumented(name: str) -> torch.nn.Module:
    factory, kwargs, shape, instrument_kwargs = MODELS[name]
    torch.manual_seed(0)
    model = asr_fx.build(factory, **kwargs)
    if name == "vit":  # torchvision zero-initialises ViT's classifier: random weights make outputs worth comparing
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    asr = asr_fx.instrument(model, example_inputs=(torch.zeros(shape),), **instrument_kwargs)
    perturb_asr(asr)
    return asr.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The instrumented ResNet-18 and ViT, in torch and saved as asr-fx checkpoints."""
    folder = tmp_path_factory.mktemp("runtimes")
    models = {name: _instrumented(name) for name in MODELS}
    for name, model in models.items():
        asr_fx.save(model, folder / f"{name}.pt")
    return folder, models


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_file_verifies_in_openvino_within_onnxruntimes_tolerance(name, checkpoints, tmp_path):
    pytest.importorskip("openvino")
    _, models = checkpoints
    asr = models[name]
    x = torch.randn(MODELS[name][2], generator=torch.Generator().manual_seed(1))
    fused = asr_fx.fuse(asr)
    path = tmp_path / f"{name}.onnx"
    in_openvino = asr_fx.export_onnx(fused, path, x, reference=asr, runtime="openvino")
    in_onnxruntime = asr_fx.verify_onnx(path, asr, x)
    assert in_openvino.provider == "OpenVINO CPU" and in_onnxruntime.provider == "CPUExecutionProvider"
    assert in_openvino.rtol == in_onnxruntime.rtol == 1e-4
    assert in_openvino.ok and in_openvino.verified
    assert max(o.max_rel for o in in_openvino.outputs) <= 1e-4
    assert [o.name for o in in_openvino.outputs] == [o.name for o in in_onnxruntime.outputs]
    # the comparison can fail: a reference with other ASR weights disagrees in OpenVINO too
    other = _instrumented(name)
    perturb_asr(other, seed=5)
    with pytest.raises(VerificationError, match="openvino"):
        asr_fx.verify_onnx(path, other, x, runtime="openvino")


@pytest.mark.parametrize("name", list(MODELS))
def test_cli_fuse_and_verify_run_in_openvino(name, checkpoints, tmp_path, capsys):
    pytest.importorskip("openvino")
    folder, models = checkpoints
    ckpt, out = folder / f"{name}.pt", tmp_path / f"{name}.onnx"
    assert cli.main(["fuse", str(ckpt), "-o", str(out), "--runtime", "openvino", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["provider"] == "OpenVINO CPU" and report["rtol"] == 1e-4
    assert report["ok"] and all(o["ok"] and o["max_rel"] <= 1e-4 for o in report["outputs"])
    assert cli.main(["verify", str(out), "--against", str(ckpt), "--runtime", "openvino"]) == 0
    text = capsys.readouterr().out
    assert "runtime: OpenVINO CPU" in text and "[4/4] verify" in text and "in openvino" in text
    # another checkpoint of the same architecture disagrees in OpenVINO: exit 1
    other = _instrumented(name)
    perturb_asr(other, seed=5)
    asr_fx.save(other, tmp_path / "other.pt")
    assert cli.main(["verify", str(out), "--against", str(tmp_path / "other.pt"), "--runtime", "openvino", "-q"]) == 1
    assert "disagrees with" in capsys.readouterr().err


def test_missing_openvino_names_the_extra(checkpoints, tmp_path, monkeypatch, capsys):
    folder, models = checkpoints
    x = torch.zeros(MODELS["resnet18"][2])
    path = tmp_path / "r18.onnx"
    asr_fx.export_onnx(asr_fx.fuse(models["resnet18"]), path, x, reference=models["resnet18"])
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "asr-fx\[openvino\]"') as caught:
        asr_fx.verify_onnx(path, models["resnet18"], x, runtime="openvino")
    assert caught.value.package == "openvino" and isinstance(caught.value, ImportError)
    out = tmp_path / "never.onnx"
    assert cli.main(["fuse", str(folder / "resnet18.pt"), "-o", str(out), "--runtime", "openvino"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asr-fx: ") and 'pip install "asr-fx[openvino]"' in err and "Traceback" not in err
    assert not out.exists()  # no partial output
    assert cli.main(["verify", str(path), "--against", str(folder / "resnet18.pt"), "--runtime", "openvino"]) == 2
    assert 'pip install "asr-fx[openvino]"' in capsys.readouterr().err


def test_unknown_runtime_is_refused(checkpoints, tmp_path, capsys):
    _, models = checkpoints
    with pytest.raises(InvalidOptionError, match="onnxruntime, openvino"):
        asr_fx.verify_onnx(tmp_path / "any.onnx", models["resnet18"], torch.zeros(1, 3, 64, 64), runtime="tensorrt")
    assert cli.main(["verify", "x.onnx", "--against", "y.pt", "--runtime", "tensorrt"]) == 2
    assert "invalid choice: 'tensorrt' (choose from 'onnxruntime', 'openvino')" in capsys.readouterr().err
