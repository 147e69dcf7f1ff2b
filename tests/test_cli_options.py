"""The asr-fx command line's options: one spelling per option in every command, fast help without torch,
one-line usage errors that name the subcommand, early checks before any expensive step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import onnx
import pytest
import torch
from torch import nn

import asr_fx
from asr_fx import atomic, cli
from asr_fx.cli import source
from asr_fx.foreign_checkpoints import LoadedCheckpoint

# the positionals and required options each model-loading command needs to parse
REQUIRED = {
    "fuse": ["ckpt.pt", "-o", "out.onnx"],
    "verify": ["out.onnx", "--against", "ckpt.pt"],
    "inspect": ["pkg.mod:factory"],
    "stripe": ["pkg.mod:factory", "--data", "random", "-o", "figures"],
}

# option spelling -> (value given, attribute, value parsed)
MODEL_SOURCE = {
    "--model": ("pkg.models:net", "model", "pkg.models:net"),
    "--factory-args": ('{"depth": 11}', "factory_args", {"depth": 11}),
    "--input-shape": ("2,3,16,16", "input_shape", [2, 3, 16, 16]),
    "--leaf-modules": ("a.gate,b", "leaf_modules", ["a.gate", "b"]),
    "--attention": ("eca", "attention", "eca"),
    "--attention-args": ('{"k_size": 3}', "attention_args", {"k_size": 3}),
    "--device": ("cuda:1", "device", "cuda:1"),
}


@pytest.mark.parametrize("option", sorted(MODEL_SOURCE))
@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_model_source_option_is_spelled_and_parsed_the_same_in_every_command(command, option):
    given, attribute, parsed = MODEL_SOURCE[option]
    args = cli.parse([command, *REQUIRED[command], option, given])
    assert getattr(args, attribute) == parsed
    defaults = cli.parse([command, *REQUIRED[command]])
    assert getattr(defaults, attribute) == ("cpu" if option == "--device" else None)


@pytest.mark.parametrize("option", ["--attention", "--attention-args"])
def test_demo_spells_the_attention_options_the_same(option):
    given, attribute, parsed = MODEL_SOURCE[option]
    assert getattr(cli.parse(["demo", option, given]), attribute) == parsed


def test_list_options_do_not_swallow_the_positional_argument():
    args = cli.parse(["inspect", "--exclude", "layer1.0.bn2,fc", "pkg.mod:factory"])
    assert args.source == "pkg.mod:factory" and args.exclude == ["layer1.0.bn2", "fc"]
    args = cli.parse(["stripe", "--checkpoints", "a.pt,b.pt", "pkg.mod:factory", "--data", "random", "-o", "d"])
    assert args.source == "pkg.mod:factory" and [str(p) for p in args.checkpoints] == ["a.pt", "b.pt"]


def _usage_fails(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return err


def test_a_wrong_flag_names_the_subcommand_its_help_and_the_nearest_option(capsys):
    err = _usage_fails(capsys, ["inspect", "--leaf", "gate", "pkg.mod:factory"])
    assert err.startswith("asr-fx inspect: error: unrecognized arguments: --leaf")
    assert "did you mean --leaf-modules?" in err and "(see `asr-fx inspect --help`)" in err
    err = _usage_fails(capsys, ["fuse", "x.pt", "-o", "o.onnx", "--stirct"])
    assert err.startswith("asr-fx fuse: error:") and "did you mean --strict?" in err


@pytest.mark.parametrize("command", sorted(REQUIRED))
@pytest.mark.parametrize("option, value, words", [("--factory-args", "{depth: 11}", "is not valid JSON"),
                                                  ("--factory-args", "[11]", "should be a JSON object"),
                                                  ("--input-shape", "1,3,a,8", "is not a shape like 1,3,224,224"),
                                                  ("--input-shape", "1,0,8,8", "positive whole numbers")])
def test_invalid_factory_args_and_input_shape_are_one_line(command, option, value, words, capsys):
    err = _usage_fails(capsys, [command, *REQUIRED[command], option, value])
    assert err.startswith(f"asr-fx {command}: error: argument {option}") and words in err
    assert f"see `asr-fx {command} --help`" in err


def test_every_option_has_help_and_epilogs_list_only_the_exit_codes_used():
    _, commands = cli.build_parser()
    assert set(commands) == {"demo", "fuse", "verify", "inspect", "stripe"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, f"asr-fx {name} {action.option_strings or action.dest} has no help"
        uses_exit_1 = name in ("demo", "fuse", "verify")
        assert ("1 verification failed" in parser.epilog) == uses_exit_1, name
        assert "2 usage or input error" in parser.epilog


def test_importing_the_cli_and_building_the_parser_does_not_import_torch():
    code = ("import sys\nimport asr_fx.cli\nasr_fx.cli.build_parser()\n"
            "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'tabulate', 'tqdm') if m in "
            "sys.modules)\n"
            "print(heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["fuse", "--help"], ["stripe", "--help"]])
def test_help_and_version_run_without_torch(argv):
    code = ("import sys\nfrom asr_fx.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
            "    assert exit.code == 0, exit.code\nassert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "asr-fx" in proc.stdout


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "asr_fx.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"asr-fx {asr_fx.__version__}"


def test_lazy_package_names_are_the_real_objects():
    from asr_fx.api import fuse
    from asr_fx.errors import ASRError

    assert asr_fx.fuse is fuse and asr_fx.ASRError is ASRError
    assert set(asr_fx.__all__) <= set(dir(asr_fx))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        asr_fx.nothing_here  # noqa: B018


# --- early checks: before the checkpoint is loaded ---------------------------------------------------


def test_an_unwritable_output_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # root writes anywhere, so the folder's refusal is simulated where the check asks the file system
    fake = types.SimpleNamespace(mkdtemp=refuse, gettempdir=atomic.tempfile.gettempdir)
    monkeypatch.setattr(atomic, "tempfile", fake)
    argv = ["fuse", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not writable (Permission denied)" in err
    assert "missing.pt" not in err  # refused before the checkpoint was read
    assert os.listdir(tmp_path) == []


def test_stripe_checks_its_output_folder_before_loading(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    fake = types.SimpleNamespace(mkdtemp=refuse, gettempdir=atomic.tempfile.gettempdir)
    monkeypatch.setattr(atomic, "tempfile", fake)
    argv = ["stripe", str(tmp_path / "missing.pt"), "--data", "random", "-o", str(tmp_path / "new" / "figures")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"the folder {str(tmp_path)!r}" in err and "is not writable" in err and "missing.pt" not in err
    assert os.listdir(tmp_path) == []


def test_the_writability_probe_leaves_nothing(tmp_path):
    atomic.check_writable(tmp_path / "m.onnx", suffix=".onnx")
    assert os.listdir(tmp_path) == []


def test_input_shape_from_what_the_model_documents():
    import timm
    import torchvision
    from transformers import ViTConfig, ViTModel

    def shape(model, given=None):
        args = types.SimpleNamespace(input_shape=given)
        return source.input_shape_for(args, LoadedCheckpoint(model, None, "test"))

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert shape(model) == [1, *model.pretrained_cfg["input_size"]]
    assert shape(model, [2, 3, 64, 64]) == [2, 3, 64, 64]  # --input-shape wins
    vit = ViTModel(ViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, num_channels=1))
    assert shape(vit) == [1, 1, 64, 64]
    assert shape(torchvision.models.resnet18(num_classes=10)) == [1, 3, 224, 224]
    with pytest.raises(asr_fx.InputShapeError, match="no input shape.*--input-shape"):
        shape(nn.Linear(2, 2))


# --- ONNX names and dynamic shapes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("names")
    torch.manual_seed(0)
    model = asr_fx.instrument(asr_fx.build("asr_fx.models:cifar_resnet", depth=11, num_classes=10),
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(model.eval(), folder / "c.pt")
    return folder / "c.pt"


def test_input_and_output_names_are_in_the_file_and_the_report(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "named.onnx"
    argv = ["fuse", str(small_checkpoint), "-o", str(out), "--input-names", "image", "--output-names", "logits",
            "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    assert [o["name"] for o in report["outputs"]] == ["logits"]
    assert os.listdir(tmp_path) == ["named.onnx"]
    err = _usage_fails(capsys, ["fuse", str(small_checkpoint), "-o", str(tmp_path / "x.onnx"), "--output-names", "a,b"])
    assert "--output-names: 2 name(s) for 1 output(s)" in err
    assert os.listdir(tmp_path) == ["named.onnx"]


def test_default_output_names_are_the_reports(small_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli.main(["fuse", str(small_checkpoint), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [o.name for o in onnx.load(str(out)).graph.output] == [o["name"] for o in report["outputs"]] == ["output0"]
    assert report["models"].keys() == {"fused"}  # no comparison exports without --compare


def test_dynamic_shape_spellings(capsys):
    assert cli.parse(["fuse", "c.pt", "-o", "o.onnx", "--dynamic-batch"]).dynamic_shape == ["batch"]
    args = cli.parse(["fuse", "c.pt", "-o", "o.onnx", "--dynamic-shape", "width,batch"])
    assert args.dynamic_shape == ["batch", "width"]
    err = _usage_fails(capsys, ["fuse", "c.pt", "-o", "o.onnx", "--dynamic-shape", "batch,depth"])
    assert "name dimensions among batch, height, width" in err


def test_demo_table_has_a_header_stage_lines_and_lists_every_file_it_wrote(tmp_path, capsys):
    out = tmp_path / "d"
    assert cli.main(["demo", "--depth", "11", "--steps", "2", "--batch", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for stage in ("[1/4] save checkpoint", "[2/4] fuse", "[3/4] export vanilla.onnx", "[4/4] export and verify"):
        assert any(line.startswith(stage) for line in lines), text
    header = next(line for line in lines if line.startswith("check"))
    assert header.split() == ["check", "result"]
    files = next(line for line in lines if line.startswith("files"))
    written = sorted(os.listdir(out))
    assert written == ["asr_fused.onnx", "asr_resnet.pt", "vanilla.onnx"]
    assert all(str(out / name) in files for name in written)


def test_a_way_out_the_message_already_names_is_not_repeated():
    from asr_fx.cli.advice import cli_message
    from asr_fx.errors import CheckpointError, InputShapeError

    own = InputShapeError("no input shape: pass --input-shape, e.g. 1,3,224,224", shape=None)
    assert cli_message(own, str(own)) == str(own)
    library = InputShapeError("example_inputs of shape(s) [(3, 8)] do not fit the model", shape=[3, 8])
    assert cli_message(library, str(library)).endswith("; pass the shape it expects with --input-shape")
    named = CheckpointError("no factory: pass --model package.module:factory", reason="no-factory")
    assert cli_message(named, str(named)) == str(named)
    plain = CheckpointError("weights without the factory that builds the model", reason="no-factory")
    assert "pass --model package.module:factory" in cli_message(plain, str(plain))
