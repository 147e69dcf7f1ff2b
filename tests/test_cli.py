"""Issue 6: the asr-fx CLI as users expect: options, the report, clear errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import SharedBN, perturb_asr  # SharedBN: the CLI imports it as `test_cli:SharedBN`
from torch import nn

import asr_fx
from asr_fx import cli

FACTORY = "asr_fx.models:cifar_resnet"
SMALL = {"depth": 11, "num_classes": 10}
MODEL_ARGS = ["--model", FACTORY, "--factory-args", json.dumps(SMALL), "--input-shape", "1,3,32,32"]


# factories the CLI imports as `test_cli:...` (pytest puts tests/ on sys.path)


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
    assert cli.main(["fuse", str(files / "train.pt"), "-o", str(out), "-q", *MODEL_ARGS]) == 0
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
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(out), "--json", "--runs", "5", "--strict",
                     "--compare"]) == 0
    report = json.loads(capsys.readouterr().out)  # nothing but the JSON on stdout
    assert report["ok"] and report["exit_code"] == 0 and report["verified"]
    assert report["provider"] == "CPUExecutionProvider"
    in_file = [o.name for o in onnx.load(str(out), load_external_data=False).graph.output]
    assert [o["name"] for o in report["outputs"]] == in_file and report["outputs"][0]["max_rel"] <= 1e-4
    models = report["models"]
    assert models["fused"]["params"] == models["vanilla"]["params"] < models["instrumented"]["params"]
    assert models["fused"]["op_counts"] == models["vanilla"]["op_counts"]
    assert "Mul" not in models["fused"]["op_counts"]
    assert models["vanilla"]["latency_ratio_to_vanilla"] == 1.0
    assert all(models[m]["latency_ms"] > 0 for m in models)
    assert "vanilla (A/A)" in models  # the control whose ratio is the measurement's noise
    assert all(models[m]["latency_p25_ms"] <= models[m]["latency_ms"] <= models[m]["latency_p75_ms"] for m in models)
    assert report["same_as_vanilla"] == {"op_counts": True, "params": True}
    assert set(report["seconds"]) == {"load", "trace", "fuse", "export", "verify"}
    assert os.listdir(work) == ["m.onnx"] and oct(out.stat().st_mode & 0o777) != "0o600"


def test_verify_reports_tables_and_stage_lines(files, exported, capsys):
    capsys.readouterr()
    assert cli.main(["verify", str(exported), "--against", str(files / "asrfx.pt"), "--runs", "3", "--compare"]) == 0
    text = capsys.readouterr().out
    for line in ("[1/4] load", "[2/4] trace", "[3/4] export", "[4/4] verify"):
        assert line in text
    assert "max rel err" in text and "onnxruntime provider: CPUExecutionProvider" in text
    assert "vs vanilla" in text and "1.00x" in text and "ONNX op" in text and "instrumented" in text
    assert "latency ms median [25th, 75th]" in text and "vanilla (A/A)" in text
    assert "agrees with" in text


def test_verify_against_another_checkpoint_fails_with_exit_1(exported, trained, work, capsys):
    out = exported
    other = _sd(trained)
    key = "asr.layer1_0_bn3.psi"
    other[key] = other[key] + 1.0
    torch.save(other, work / "other.pt")
    assert cli.main(["verify", str(out), "--against", str(work / "other.pt"), "-q", *MODEL_ARGS]) == 1
    assert "disagrees with" in capsys.readouterr().err


def test_verify_against_a_different_model_says_so(exported, work, capsys):
    bigger = asr_fx.instrument(asr_fx.build(FACTORY, depth=20, num_classes=10),
                               example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(bigger.eval(), work / "depth20.pt")
    assert cli.main(["verify", str(exported), "--against", str(work / "depth20.pt"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "is a different model" in err and "weights" in err
    assert "pass the checkpoint it was exported from as --against" in err


def test_verify_refuses_a_file_that_is_not_onnx_or_does_not_fit(files, exported, work, capsys):
    (work / "junk.onnx").write_bytes(b"not a protobuf at all" * 10)
    err = _fails(capsys, ["verify", str(work / "junk.onnx"), "--against", str(files / "asrfx.pt")])
    assert "is not a readable ONNX model" in err
    err = _fails(capsys, ["verify", str(work / "missing.onnx"), "--against", str(files / "asrfx.pt")])
    assert "does not exist" in err
    err = _fails(capsys, ["verify", str(exported), "--against", str(files / "asrfx.pt"), "--input-shape", "2,3,32,32"])
    assert "onnxruntime cannot run" in err and "[2, 3, 32, 32]" in err


def test_dynamic_batch_runs_at_batch_1_and_7_with_the_same_per_sample_results(files, trained, work, capsys):
    out = work / "dyn.onnx"
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(out), "--dynamic-batch", "-q"]) == 0
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
    err = _fails(capsys, ["fuse", str(work / "renamed.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS,
                          "--attention", "eca"])
    assert "asr.layer1_0_bn3.attention.conv.weight" in err and "--attention" in err
    assert os.listdir(work) == ["renamed.pt"]


def test_a_state_dict_loaded_with_the_wrong_attention_names_the_attention_its_keys_match(work, capsys):
    model = asr_fx.instrument(asr_fx.build(FACTORY, **SMALL), attention="eca",
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    torch.save(model.state_dict(), work / "eca.pt")
    err = _fails(capsys, ["fuse", str(work / "eca.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS])  # default se
    assert "keys look like the attention network 'eca', not 'se'" in err and "pass --attention eca" in err
    assert len(err) < 600  # named, not 15 keys listed
    assert cli.main(["fuse", str(work / "eca.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS, "--attention", "eca",
                     "-q"]) == 0


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
    with pytest.raises(asr_fx.UnsupportedModelError, match=r"site `asr\.layer2_0_bn3`.*not finite"):
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
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx")])
    assert "torch.onnx.export failed: RuntimeError: Unsupported operator aten::frobnicate" in err
    assert "Try another --opset" in err
    assert os.listdir(work) == []


def test_leaf_modules_gets_past_tracing_and_the_real_exporter_failure_is_one_line(work, capsys):
    model = asr_fx.instrument(Untraceable(), sites=["bn"], leaf_modules=["gate"]).eval()
    torch.save(model.state_dict(), work / "u.pt")
    err = _fails(capsys, ["fuse", str(work / "u.pt"), "-o", str(work / "u.onnx"), "--model", "test_cli:Untraceable",
                          "--input-shape", "1,3,8,8", "--leaf-modules", "gate"])
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


# --- QA fixes: verification precision, strict, opset, demo, paths, custom attention, user errors --------


class _FlagRecorder(nn.Module):
    """A reference whose forward records the TF32 flags it runs under."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return self.model(x)


@pytest.fixture()
def tf32_on():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_export_verifies_without_tf32_restores_the_flags_and_training_modes(trained, work, tf32_on):
    """CPU only here: the flags are checked, the effect on a GPU run is not."""
    model, reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), _FlagRecorder(nn.Identity())
    model.train()
    reference.model = model
    reference.train()
    asr_fx.export_onnx(model, work / "m.onnx", torch.randn(1, 3, 8, 8), reference=reference)
    assert reference.seen and all(seen == (False, False) for seen in reference.seen)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    assert model.training and reference.training and all(m.training for m in model.modules())


def test_export_restores_eval_mode_too(work):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.eval()
    model[1].train()  # a mixed state comes back as it was
    asr_fx.export_onnx(model, work / "m.onnx", torch.randn(1, 3, 8, 8))
    assert not model.training and not model[0].training and model[1].training


def test_opset_the_exporter_does_not_write_is_refused(trained, work):
    """torch's exporter writes opset 18 for this model when asked for 13 (it cannot convert it down)."""
    with pytest.raises(asr_fx.ExportError, match=r"asked for ONNX opset 13.*wrote opset 18.*supports opsets 18 to"):
        asr_fx.export_onnx(trained, work / "m.onnx", torch.randn(1, 3, 32, 32), opset=13)
    assert os.listdir(work) == []


def test_cli_opset_13_exits_2_and_an_impossible_one_before_any_work(files, work, capsys):
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--opset", "13"])
    assert "asked for ONNX opset 13" in err and "supports opsets 18 to" in err
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--opset", "99"])
    assert "--opset 99" in err
    assert os.listdir(work) == []


def test_strict_without_compare_still_checks_ops_against_vanilla(files, work, capsys):
    argv = ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--strict", "--json"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["models"]["vanilla"]["op_counts"] is not None
    assert payload["same_as_vanilla"] == {"op_counts": True, "params": True}


def test_strict_with_no_verify_still_checks_ops(files, work, capsys, monkeypatch):
    from asr_fx.cli import summary as report

    real = report.export_for_comparison

    def vanilla_with_an_extra_op(*args, **kwargs):
        row = real(*args, **kwargs)
        row.op_counts = {**row.op_counts, "Mul": row.op_counts.get("Mul", 0) + 1}
        return row

    monkeypatch.setattr(report, "export_for_comparison", vanilla_with_an_extra_op)
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--strict", "--no-verify"],
                 code=1).strip()
    assert "op multiset differs" in err and "Mul" in err
    assert os.listdir(work) == []


def test_strict_with_fold_bn_compares_with_the_vanilla_model_with_bn_folded(files, work, capsys):
    argv = ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--strict", "--fold-bn", "--json",
            "--runs", "1"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["same_as_vanilla"] == {"op_counts": True, "params": True}
    assert "BN folded" in payload["models"]["vanilla"]["note"]
    assert "BatchNormalization" not in payload["models"]["fused"]["op_counts"]


@pytest.mark.slow  # the same vanilla export as fuse's test above, through `verify`
def test_verify_strict_without_compare_still_checks_ops(files, exported, capsys):
    argv = ["verify", str(exported), "--against", str(files / "asrfx.pt"), "--strict", "--json"]
    assert cli.main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["same_as_vanilla"]["op_counts"] is True


DEMO = ["demo", "--depth", "11", "--steps", "1", "--batch", "2"]


def test_demo_json_prints_the_report(work, capsys):
    assert cli.main([*DEMO, "-o", str(work / "d"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is True and payload["command"] == "demo"
    assert payload["report"]["ONNX op multiset == vanilla's"] is True and payload["export"]["verified"]


def test_demo_verification_failure_goes_to_stderr(work, capsys, monkeypatch):
    from asr_fx import verify

    monkeypatch.setattr(verify, "compare", lambda *a, **k: [verify.OutputError("output0", 1.0, 1.0, False)])
    assert cli.main([*DEMO, "-o", str(work / "d")]) == 1
    captured = capsys.readouterr()
    assert "verification failed" in captured.err and "verification failed" not in captured.out


def test_demo_failing_before_writing_leaves_no_folder(work, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise asr_fx.ASRError("no sites today")

    monkeypatch.setattr(asr_fx, "instrument", broken)
    err = _fails(capsys, [*DEMO, "-o", str(work / "d")])
    assert "no sites today" in err and os.listdir(work) == []


@pytest.mark.parametrize("depth", ["12", "2", "x"])
def test_demo_depth_must_be_9n_plus_2(depth, capsys):
    assert cli.main(["demo", "--depth", depth]) == 2
    err = capsys.readouterr().err
    assert "--depth" in err and "Traceback" not in err and "unexpected" not in err


def test_output_paths_are_checked_before_any_work(files, work, capsys):
    (work / "folder.onnx").mkdir()
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "folder.onnx")])
    assert "is a folder" in err and "folder.onnx" in err
    (work / "afile").write_text("x")
    err = _fails(capsys, [*DEMO, "-o", str(work / "afile")])
    assert "is a file" in err and "afile" in err
    err = _fails(capsys, [*DEMO, "-o", str(work / "missing" / "d")])
    assert "does not exist" in err and "missing" in err
    assert sorted(os.listdir(work)) == ["afile", "folder.onnx"]


def test_factory_args_with_a_wrong_keyword_names_factory_and_keyword(trained, work, capsys):
    torch.save(trained.state_dict(), work / "sd.pt")
    err = _fails(capsys, ["fuse", str(work / "sd.pt"), "-o", str(work / "o.onnx"), "--model", FACTORY,
                          "--factory-args", '{"dept": 11}'])
    assert FACTORY in err and "'dept'" in err and "did you mean 'depth'" in err and "--factory-args" in err
    assert "unexpected" not in err.split(":", 2)[1]  # not the "unexpected TypeError" catch-all
    assert os.listdir(work) == ["sd.pt"]


@pytest.mark.parametrize("option", [["--rtol", "-1"], ["--atol", "-1"], ["--rtol", "nan"]])
def test_negative_tolerances_are_usage_errors(files, work, option, capsys):
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), *option]) == 2
    err = capsys.readouterr().err
    assert "tolerance must be a finite number >= 0" in err and os.listdir(work) == []


@pytest.mark.parametrize("option, words", [(["--rule", "residul"], "residul"), (["--activation", "swish"], "swish")])
def test_value_errors_of_the_library_are_usage_errors(trained, work, capsys, option, words):
    torch.save(trained.state_dict(), work / "sd.pt")
    err = _fails(capsys, ["fuse", str(work / "sd.pt"), "-o", str(work / "o.onnx"), *MODEL_ARGS, *option])
    assert words in err and "unexpected" not in err
    assert os.listdir(work) == ["sd.pt"]


def test_json_usage_error_is_a_json_object(capsys):
    assert cli.main(["fuse", "x.pt", "--json", "--rtol", "1e-3"]) == 2
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["ok"] is False and payload["exit_code"] == 2 and "-o/--output" in payload["error"]
    assert payload["rtol"] == 1e-3 and payload["atol"] == 0.0
    assert "required: -o/--output" in captured.err


def test_json_error_reports_the_tolerances_given(work, capsys):
    argv = ["fuse", str(work / "missing.pt"), "-o", str(work / "o.onnx"), "--json", "--rtol", "2e-4", "--atol", "1e-6"]
    assert cli.main(argv) == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["rtol"] == 2e-4 and payload["atol"] == 1e-6


def test_no_verify_says_the_file_is_unverified(files, work, capsys):
    assert cli.main(["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "" not in out.splitlines()
    assert out.splitlines()[-1] == f"wrote {work / 'o.onnx'} (not verified: --no-verify)"


def test_trace_error_names_the_leaf_modules_option(work, capsys):
    model = asr_fx.instrument(Untraceable(), sites=["bn"], leaf_modules=["gate"]).eval()
    torch.save(model.state_dict(), work / "u.pt")
    err = _fails(capsys, ["fuse", str(work / "u.pt"), "-o", str(work / "u.onnx"), "--model", "test_cli:Untraceable",
                          "--input-shape", "1,3,8,8"])
    assert "pass --leaf-modules gate" in err and "leaf_modules=['gate']" in err


def test_leaf_modules_that_match_no_module_are_an_error(files, work, capsys):
    err = _fails(capsys, ["fuse", str(files / "asrfx.pt"), "-o", str(work / "o.onnx"), "--leaf-modules", "fc,lyer2"])
    assert "'lyer2'" in err and "did you mean 'layer2'" in err and "'fc'" not in err
    assert os.listdir(work) == []


def test_checkpoint_with_a_registered_only_attention_says_how_to_import_it(work, capsys):
    from asr_fx import attention

    attention.register("my_se", attention.SqueezeExcite)
    try:
        model = asr_fx.instrument(asr_fx.build(FACTORY, **SMALL), attention="my_se",
                                  example_inputs=(torch.zeros(1, 3, 32, 32),))
        asr_fx.save(model.eval(), work / "c.pt")
    finally:
        attention.unregister("my_se")
    err = _fails(capsys, ["fuse", str(work / "c.pt"), "-o", str(work / "o.onnx")])
    assert "'my_se' is not registered" in err and "--attention package.module:Factory" in err
    assert os.listdir(work) == ["c.pt"]
    argv = ["fuse", str(work / "c.pt"), "-o", str(work / "o.onnx"), "-q",
            "--attention", "asr_fx.attention.se:SqueezeExcite"]
    assert cli.main(argv) == 0 and (work / "o.onnx").is_file()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"asr-fx {asr_fx.__version__}"


def test_reports_have_docstrings():
    from asr_fx.fusion import FusionReport
    from asr_fx.verify import ExportReport

    for method in (FusionReport.table, FusionReport.to_dict, FusionReport.unfolded_message, ExportReport.table,
                   ExportReport.to_dict):
        assert method.__doc__ and len(method.__doc__.split()) > 5, method
