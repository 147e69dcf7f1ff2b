"""Issue 2: checkpoints, the CLI round trip, atomic output and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import SharedBN, perturb_asr
from torch import nn

import asr_fx
from asr_fx import cli
from asr_fx.verify import OutputError

SMALL = {"depth": 11, "num_classes": 10}


@pytest.fixture()
def checkpoint(tmp_path):
    vanilla = asr_fx.build("asr_fx.models:cifar_resnet", **SMALL)
    model = asr_fx.instrument(vanilla, example_inputs=(torch.zeros(1, 3, 32, 32),))
    perturb_asr(model)
    path = tmp_path / "ckpt.pt"
    asr_fx.save(model, path)
    return model.eval(), path


def test_save_load_round_trip_gives_the_same_outputs(checkpoint):
    model, path = checkpoint
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "asr-fx" and raw["version"] == 1
    assert raw["factory"] == "asr_fx.models:cifar_resnet" and raw["factory_kwargs"] == SMALL
    loaded = asr_fx.load(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert asr_fx.get_config(loaded)["sites"] == asr_fx.get_config(model)["sites"]


def test_save_without_factory_says_how(tmp_path):
    model = asr_fx.instrument(asr_fx.models.cifar_resnet(11))
    with pytest.raises(asr_fx.CheckpointError, match="factory="):
        asr_fx.save(model, tmp_path / "x.pt")


def test_cli_fuse_round_trip_in_a_subprocess(checkpoint, tmp_path):
    _, path = checkpoint
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "asr_fx.cli", "fuse", str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "ok" in proc.stdout and "folded 3 scale(s)" in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_cli_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "asr_fx.cli", "fuse", str(tmp_path / "nope.pt"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_failed_verification_leaves_no_file_and_exit_1(checkpoint, tmp_path, monkeypatch, capsys):
    _, path = checkpoint
    out = tmp_path / "model.onnx"
    monkeypatch.setattr("asr_fx.verify.compare", lambda *a, **k: [OutputError("output0", 1.0, 1.0, False)])
    assert cli.main(["fuse", str(path), "-o", str(out), "-q"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_verification_keeps_an_existing_file(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(asr_fx.VerificationError) as info:
        asr_fx.export_onnx(model, out, torch.randn(1, 3, 8, 8), reference=other)
    assert not info.value.report.ok
    assert out.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_cli_refuses_to_overwrite_the_checkpoint(checkpoint):
    _, path = checkpoint
    before = path.read_bytes()
    assert cli.main(["fuse", str(path), "-o", str(path), "-q"]) == 2
    assert path.read_bytes() == before


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)) + x.mean())


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_names_the_module_the_line_and_the_way_out():
    with pytest.raises(asr_fx.TraceError) as info:
        asr_fx.instrument(_Branchy())
    message = str(info.value)
    assert "`gate` (_DataDependent)" in message
    assert "test_errors_and_checkpoints.py" in message and "if x.sum() > 0" in message
    assert "leaf_modules=['gate']" in message


def test_leaf_modules_is_the_way_out():
    model = asr_fx.instrument(_Branchy(), sites=["bn"], leaf_modules=["gate"])
    assert [s["module"] for s in asr_fx.get_config(model)["sites"]] == ["bn"]


def test_no_site_is_a_clear_error():
    # rule="residual": since the placement issue, rule="auto" also places sites in plain conv stacks
    with pytest.raises(asr_fx.NoSitesError, match="sites="):
        asr_fx.instrument(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), rule="residual")
    with pytest.raises(asr_fx.NoSitesError, match="sites="):
        asr_fx.instrument(nn.Sequential(nn.Flatten(), nn.ReLU()))




def test_unfolded_site_warns_by_default_and_raises_when_strict():
    model = asr_fx.instrument(SharedBN(), sites=["bn_1"]).eval()
    assert list(model.asr.keys()) == ["bn_1"]
    perturb_asr(model)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="could not be folded"):
        fused = asr_fx.fuse(model)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
    report = asr_fx.fusion_report(fused)
    assert report.unfolded and report.unfolded[0].site == "asr.bn_1"
    with pytest.raises(asr_fx.FusionError, match="asr.bn_1"):
        asr_fx.fuse(model, strict=True)


def test_bare_passes_is_not_importable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import passes"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'passes'" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import asr_fx.passes as p; print(p.fuse_pipeline.__name__)"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "fuse_pipeline"


# --- saving: paths and custom attention networks that cannot be imported back -------------------------


def _small_instrumented(attention):
    return asr_fx.instrument(asr_fx.build("asr_fx.models:cifar_resnet", **SMALL), attention=attention,
                             example_inputs=(torch.zeros(1, 3, 32, 32),))


def test_save_refuses_an_attention_defined_in_main(tmp_path):
    from asr_fx.attention import SqueezeExcite

    script_attention = type("ScriptSE", (SqueezeExcite,), {"__module__": "__main__"})
    model = _small_instrumented(script_attention)
    with pytest.raises(asr_fx.CheckpointError, match=r"__main__.*register it under a name.*importable module"):
        asr_fx.save(model, tmp_path / "c.pt")
    assert os.listdir(tmp_path) == []


def test_save_refuses_a_lambda_attention(tmp_path):
    from asr_fx.attention import SqueezeExcite

    model = _small_instrumented(lambda channels, **kw: SqueezeExcite(channels, **kw))
    with pytest.raises(asr_fx.CheckpointError, match=r"lambda.*register it under a name.*importable module"):
        asr_fx.save(model, tmp_path / "c.pt")
    assert os.listdir(tmp_path) == []


def test_save_to_a_folder_or_a_missing_folder_names_the_path(checkpoint, tmp_path):
    model, _ = checkpoint
    (tmp_path / "adir").mkdir()
    with pytest.raises(asr_fx.CheckpointError, match=r"adir'.*is a folder"):
        asr_fx.save(model, tmp_path / "adir")
    with pytest.raises(asr_fx.CheckpointError, match=r"the folder '.*nope' does not exist"):
        asr_fx.save(model, tmp_path / "nope" / "c.pt")


def test_a_model_with_converted_attention_round_trips_through_a_checkpoint(tmp_path):
    vanilla = asr_fx.build("torchvision.models:mobilenet_v3_small", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model = asr_fx.instrument(vanilla.eval(), convert_existing=True, example_inputs=(x,)).eval()
    perturb_asr(model)
    asr_fx.save(model, tmp_path / "mnv3.pt")
    loaded = asr_fx.load(tmp_path / "mnv3.pt")
    assert asr_fx.get_config(loaded)["convert_existing"] is True
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
