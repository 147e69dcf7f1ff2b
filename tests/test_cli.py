"""Issue 6: the asr-fx CLI as users expect: options, the report, clear errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import perturb_asr
from torch import nn

import asr_fx
from asr_fx import cli

FACTORY = "asr_fx.models:cifar_resnet"
SMALL = {"depth": 11, "num_classes": 10}
MODEL_ARGS = ["--model", FACTORY, "--factory-args", json.dumps(SMALL), "--input-shape", "1,3,32,32"]


# factories the CLI imports as `test_cli:...` (pytest puts tests/ on sys.path)
class SharedBN(nn.Module):
    """One BatchNorm called twice: an ASR site after its second call cannot fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv2(self.bn(self.conv1(x))))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = _Gate()

    def forward(self, x):
        return self.gate(self.bn(self.conv(x)))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = asr_fx.instrument(asr_fx.build(FACTORY, **SMALL), example_inputs=(torch.zeros(1, 3, 32, 32),))
    perturb_asr(model)
    return model.eval()


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    asr_fx.save(trained, folder / "asrfx.pt")
    torch.save({"model": trained.state_dict()}, folder / "train.pt")
    return folder


@pytest.fixture(scope="module")
def exported(files):
    """``asr-fx fuse`` of the training checkpoint, once for the verify tests."""
    out = files / "exported.onnx"
    assert cli.main(["fuse", str(files / "train.pt"), "-o", str(out), "--no-compare", "-q", *MODEL_ARGS]) == 0
    return out


@pytest.fixture()
def work(tmp_path):
    """An empty folder for outputs; the test asserts nothing else appears in it."""
    return tmp_path


def _fails(capsys, argv, code=2):
    """Run the CLI in-process; return stderr after checking the exit code and the one-line message."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("asr-fx: ")
    return err


def _sd(trained, **changes) -> dict:
    sd = {k: v.clone() for k, v in trained.state_dict().items()}
    sd.update(changes)
    return sd


# --- the report ---------------------------------------------------------------------------------


def test_json_report_compares_fused_vanilla_and_instrumented(files, work, capsys):
    out = work / "m.onnx"
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(out), "--json", "--runs", "5", "--strict"]) == 0
    report = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert report["ok"] and report["exit_code"] == 0 and report["verified"]
    assert report["provider"] == "CPUExecutionProvider"
    assert [o["name"] for o in report["outputs"]] == ["output0"] and report["outputs"][0]["max_rel"] <= 1e-4
    models = report["models"]
    assert models["fused"]["params"] == models["vanilla"]["params"] < models["instrumented"]["params"]
    assert models["fused"]["op_counts"] == models["vanilla"]["op_counts"]
    assert models["instrumented"]["op_counts"]["Mul"] == 3 and "Mul" not in models["fused"]["op_counts"]
    assert models["vanilla"]["latency_ratio_to_vanilla"] == 1.0
    assert all(models[m]["latency_ms"] > 0 for m in models)
    assert report["same_as_vanilla"] == {"op_counts": True, "params": True}
    assert set(report["seconds"]) == {"load", "trace", "fuse", "export", "verify"}
    assert os.listdir(work) == ["m.onnx"] and oct(out.stat().st_mode & 0o777) != "0o600"


def test_verify_reports_tables_and_stage_lines(files, exported, capsys):
    capsys.readouterr()
    assert cli.main(["verify", str(exported), "--against", str(files / "asrfx.pt"), "--runs", "3"]) == 0
    text = capsys.readouterr().out
    for line in ("[1/4] load", "[2/4] trace", "[3/4] export", "[4/4] verify"):
        assert line in text
    assert "max rel err" in text and "onnxruntime provider: CPUExecutionProvider" in text
    assert "vs vanilla" in text and "1.00x" in text and "ONNX op" in text and "instrumented" in text
    assert "agrees with" in text


def test_verify_against_another_checkpoint_fails_with_exit_1(exported, trained, work, capsys):
    out = exported
    other = _sd(trained)
    key = "asr.layer1_0_bn3.psi"
    other[key] = other[key] + 1.0
    torch.save(other, work / "other.pt")
    assert cli.main(["verify", str(out), "--against", str(work / "other.pt"), "--no-compare", "-q", *MODEL_ARGS]) == 1
    assert "disagrees with" in capsys.readouterr().err


def test_verify_refuses_a_file_that_is_not_onnx_or_does_not_fit(files, exported, work, capsys):
    (work / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    err = _fails(capsys, ["verify", str(work / "junk.onnx"), "--against", str(files / "asrfx.pt")])
    assert "is not a readable ONNX model" in err
    err = _fails(capsys, ["verify", str(work / "missing.onnx"), "--against", str(files / "asrfx.pt")])
    assert "does not exist" in err
    err = _fails(capsys, ["verify", str(exported), "--against", str(files / "asrfx.pt"), "--input-shape", "2,3,32,32",
                          "--no-compare"])
    assert "onnxruntime cannot run" in err and "[2, 3, 32, 32]" in err


def test_dynamic_batch_runs_at_batch_1_and_7_with_the_same_per_sample_results(files, trained, work, capsys):
    out = work / "dyn.onnx"
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(out), "--dynamic-batch", "--no-compare", "-q"]) == 0
    assert capsys.readouterr().out == ""
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # the batch dimension is symbolic
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    (batched,) = session.run(None, {name: x})
    singles = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(7)])
    assert batched.shape == (7, 10)
    assert np.abs(batched - singles).max() <= 1e-5 * np.abs(batched).max()
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).numpy()
    assert np.abs(batched - expected).max() <= 1e-4 * np.abs(expected).max()


def test_strict_fails_with_exit_1_on_an_unfolded_site(work, capsys):
    model = asr_fx.instrument(SharedBN(), sites=["bn_1"]).eval()
    perturb_asr(model)
    torch.save(model.state_dict(), work / "shared.pt")
    argv = ["fuse", str(work / "shared.pt"), "-o", str(work / "s.onnx"), "--model", "test_cli:SharedBN",
            "--input-shape", "1,3,8,8", "--strict", "-q"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "asr.bn_1" in err
    assert os.listdir(work) == ["shared.pt"]


def test_help_documents_every_exit_code(capsys):
    for command in ("fuse", "verify"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit codes: 0 success, 1 verification failed" in text and "2 usage or input error" in text
        assert "--trust-checkpoint" in text and "--input-shape" in text


# --- bad input: exit 2, one line naming the problem, no output file -----------------------------


def test_not_a_checkpoint(work, capsys, files):
    (work / "random.pt").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    data = (files / "asrfx.pt").read_bytes()
    (work / "truncated.pt").write_bytes(data[: len(data) // 2])
    (work / "empty.pt").write_bytes(b"")
    torch.save({"epoch": 3, "lr": 0.1}, work / "nodict.pt")
    cases = {"random.pt": "is not a torch checkpoint", "truncated.pt": "truncated or corrupt",
             "empty.pt": "is empty", "nodict.pt": "found no state_dict", "missing.pt": "does not exist"}
    for name, expected in cases.items():
        err = _fails(capsys, ["fuse", str(work / name), "-o", str(work / "out.onnx"), *MODEL_ARGS])
        assert expected in err and name in err
    assert not (work / "out.onnx").exists()
    assert sorted(os.listdir(work)) == ["empty.pt", "nodict.pt", "random.pt", "truncated.pt"]


def test_missing_and_unexpected_keys_are_listed_with_nearest_matches(trained, work, capsys):
    sd = _sd(trained)
    sd["fc2.weight"] = sd.pop("fc.weight")
    torch.save(sd, work / "renamed.pt")
    err = _fails(capsys, ["fuse", str(work / "renamed.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS])
    assert "1 missing key(s)" in err and "fc.weight (nearest: fc2.weight)" in err
    assert "1 unexpected key(s)" in err and "fc2.weight (nearest: fc.weight)" in err
    err = _fails(capsys, ["fuse", str(work / "renamed.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS, "--attention", "eca"])
    assert "asr.layer1_0_bn3.attention.conv.weight" in err and "--attention" in err
    assert os.listdir(work) == ["renamed.pt"]


def test_factory_that_cannot_be_imported(files, work, capsys):
    base = ["fuse", str(files / "train.pt"), "-o", str(work / "o.onnx"), "--input-shape", "1,3,32,32"]
    err = _fails(capsys, [*base, "--model", "asr_fx.modelz:cifar_resnet"])
    assert "cannot import factory 'asr_fx.modelz:cifar_resnet'" in err and "No module named" in err
    err = _fails(capsys, [*base, "--model", "asr_fx.models:cifar_resnt"])
    assert "did you mean 'cifar_resnet'" in err
    err = _fails(capsys, base)
    assert "--model package.module:factory" in err
    assert os.listdir(work) == []


def test_shape_mismatches(files, work, capsys):
    base = ["fuse", str(files / "train.pt"), "-o", str(work / "o.onnx"), "--model", FACTORY]
    err = _fails(capsys, [*base, "--factory-args", '{"depth": 11, "num_classes": 100}', "--input-shape", "1,3,32,32"])
    assert "shape mismatch" in err and "fc.weight: checkpoint [10, 256] vs model [100, 256]" in err
    err = _fails(capsys, [*base, "--factory-args", '{"depth": 11}', "--input-shape", "1,1,32,32"])
    assert "does not run on an input of shape [1, 1, 32, 32]" in err and "--input-shape" in err
    assert os.listdir(work) == []


@pytest.mark.parametrize("key, value, kind", [("asr.layer2_0_bn3.psi", float("nan"), "NaN"),
                                               ("asr.layer3_0_bn3.attention.fc1.weight", float("inf"), "Inf")])
def test_non_finite_psi_or_attention_is_named_by_site(trained, work, capsys, key, value, kind):
    sd = _sd(trained)
    sd[key] = torch.full_like(sd[key], value)
    torch.save(sd, work / "bad.pt")
    err = _fails(capsys, ["fuse", str(work / "bad.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS])
    site = key.split(".")[1]
    assert f"`asr.{site}`" in err and kind in err and "non-finite" in err
    assert os.listdir(work) == ["bad.pt"]


def test_fuse_names_the_site_of_a_non_finite_attention_value(trained):
    model = asr_fx.instrument(asr_fx.build(FACTORY, **SMALL))
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model.asr.layer2_0_bn3.psi.fill_(float("nan"))
    with pytest.raises(asr_fx.ASRError, match=r"site `asr\.layer2_0_bn3`.*not finite"):
        asr_fx.fuse(model.eval())


def test_untraceable_model_and_leaf_modules_way_out(work, capsys):
    model = asr_fx.instrument(Untraceable(), sites=["bn"], leaf_modules=["gate"]).eval()
    torch.save(model.state_dict(), work / "u.pt")
    argv = ["fuse", str(work / "u.pt"), "-o", str(work / "u.onnx"), "--model", "test_cli:Untraceable",
            "--input-shape", "1,3,8,8"]
    err = _fails(capsys, argv)
    assert "could not trace `gate` (_Gate)" in err and "leaf_modules=['gate']" in err
    assert os.listdir(work) == ["u.pt"]


def test_exporter_failure_gives_its_message_and_what_to_try(files, work, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken)
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--no-compare"])
    assert "torch.onnx.export failed: RuntimeError: Unsupported operator aten::frobnicate" in err
    assert "Try another --opset" in err
    assert os.listdir(work) == []


def test_leaf_modules_gets_past_tracing_and_the_real_exporter_failure_is_one_line(work, capsys):
    model = asr_fx.instrument(Untraceable(), sites=["bn"], leaf_modules=["gate"]).eval()
    torch.save(model.state_dict(), work / "u.pt")
    err = _fails(capsys, ["fuse", str(work / "u.pt"), "-o", str(work / "u.onnx"), "--model", "test_cli:Untraceable",
                          "--input-shape", "1,3,8,8", "--leaf-modules", "gate", "--no-compare"])
    assert "torch.onnx.export failed" in err and "data-dependent" in err and "Try another --opset" in err
    assert "\x1b[" not in err  # no terminal colour codes from the exporter
    assert os.listdir(work) == ["u.pt"]


def test_pickled_module_needs_trust(trained, work, capsys):
    torch.save(trained, work / "whole.pt")
    err = _fails(capsys, ["fuse", str(work / "whole.pt"), "-o", str(work / "o.onnx")])
    assert "pickled Python objects" in err and "--trust-checkpoint" in err
    assert os.listdir(work) == ["whole.pt"]


def test_cuda_without_a_gpu_is_a_clear_error(files, work, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--device", "cuda"])
    assert "CUDA is not available" in err and "--device cpu" in err
    assert os.listdir(work) == []


def test_bad_output_paths(files, work, capsys):
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "model.pt")])
    assert "should end in .onnx" in err
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "nope" / "m.onnx")])
    assert "does not exist" in err
    assert os.listdir(work) == []


def test_verbose_prints_the_traceback(work, capsys):
    assert cli.main(["fuse", str(work / "missing.pt"), "-o", str(work / "o.onnx"), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "does not exist" in err.splitlines()[-1]


def test_json_error_is_machine_readable(work, capsys):
    assert cli.main(["fuse", str(work / "missing.pt"), "-o", str(work / "o.onnx"), "--json"]) == 2
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is False and payload["exit_code"] == 2 and "does not exist" in payload["error"]


def test_console_script_and_usage_error_exit_2():
    exe = shutil.which("asr-fx")
    command = [exe] if exe else [sys.executable, "-m", "asr_fx.cli"]
    proc = subprocess.run([*command, "fuse", "x.pt"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "required: -o/--output" in proc.stderr
