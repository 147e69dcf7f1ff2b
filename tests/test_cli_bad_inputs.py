"""Bad input to ``asr-fx fuse`` (issue 14, item 9): one line on stderr, exit code 2, no file, no temp folder.

Each case runs the real command line (``cli.main`` in-process; the factories below are imported by the CLI
as ``test_cli_bad_inputs:NAME``, pytest puts tests/ on sys.path). Dict inputs to ``export_onnx`` are
covered in test_export_files.py (test_dict_inputs_are_keyword_inputs); argparse's own one-line errors for
each bad value in test_cli_options.py; here they run once more through the installed executable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from asr_fx import cli

HERE = "test_cli_bad_inputs"


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


# factories the CLI imports ------------------------------------------------------------------------

def meta_model() -> nn.Module:
    with torch.device("meta"):
        return small()


def bf16_model() -> nn.Module:
    return small().to(torch.bfloat16)


def fp16_model() -> nn.Module:
    return small().half()


NOT_CALLABLE = 3


def raising_factory() -> nn.Module:
    raise ValueError("this factory always fails")


class _OutOfMemory(nn.Module):
    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):  # traces as the identity; runs out of memory on a real input
            return x
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 1099511627776 bytes. Buy new RAM!")


def oom_model() -> nn.Module:
    return nn.Sequential(*small(), _OutOfMemory())  # the same state_dict keys as small()


# helpers ------------------------------------------------------------------------------------------

@pytest.fixture()
def ckpt(tmp_path) -> Path:
    path = tmp_path / "in" / "small.pt"
    path.parent.mkdir()
    torch.save(small().state_dict(), path)
    return path


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def temp_leftovers(*folders: Path) -> list[str]:
    found = [p.name for f in folders if f.is_dir() for p in f.iterdir() if p.name.lstrip(".").startswith("asr-fx-")]
    return found + [p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"asr-fx-{os.getpid()}-")]


def fails(capsys, argv: list[str], out_dir: Path, code: int = 2) -> str:
    """Run the CLI; check exit ``code``, one line on stderr, no traceback, nothing written."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("asr-fx") and "Traceback" not in err and "unexpected" not in err, err
    assert os.listdir(out_dir) == [] and temp_leftovers(out_dir) == [], os.listdir(out_dir)
    return err


def fuse_argv(ckpt: Path, out: Path, factory: str, *extra: str) -> list[str]:
    return ["fuse", str(ckpt), "-o", str(out), "-q", "--model", f"{HERE}:{factory}", "--input-shape", "1,3,8,8",
            *extra]


# the cases of item 9 ------------------------------------------------------------------------------

def test_meta_device_model(ckpt, out_dir, capsys):
    err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "meta_model"), out_dir)
    assert "meta" in err


def test_bfloat16_model(ckpt, out_dir, capsys):
    torch.save(bf16_model().state_dict(), ckpt)
    err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "bf16_model"), out_dir)
    assert "bfloat16" in err


def test_non_callable_factory(ckpt, out_dir, capsys):
    err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "NOT_CALLABLE"), out_dir)
    assert "NOT_CALLABLE" in err and "--model" in err


def test_raising_factory(ckpt, out_dir, capsys):
    err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "raising_factory"), out_dir)
    assert "raising_factory" in err and "this factory always fails" in err and "--factory-args" in err


def test_input_shape_out_of_memory_names_the_shape_and_a_smaller_one(ckpt, out_dir, capsys):
    err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "oom_model"), out_dir)
    assert "memory" in err and "[1, 3, 8, 8]" in err and "smaller --input-shape" in err


def test_output_folder_that_cannot_be_written_is_refused_before_loading(ckpt, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    argv = fuse_argv(ckpt, blocker / "m.onnx", "raising_factory")  # the factory would fail if it were called
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "is a file, not a folder: choose another folder" in err and "this factory" not in err, err
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(ckpt, out_dir, capsys):
    out_dir.chmod(0o555)
    try:
        err = fails(capsys, fuse_argv(ckpt, out_dir / "m.onnx", "raising_factory"), out_dir)
    finally:
        out_dir.chmod(0o755)
    assert "not writable" in err and "this factory" not in err


def test_float16_model_passes_with_the_default_tolerance(ckpt, out_dir, capsys):
    torch.save(fp16_model().state_dict(), ckpt)
    code = cli.main(fuse_argv(ckpt, out_dir / "m.onnx", "fp16_model"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert os.listdir(out_dir) == ["m.onnx"] and temp_leftovers(out_dir) == []


@pytest.mark.parametrize("option, value", [("--factory-args", "{depth: 11}"), ("--input-shape", "1,3,a,8")])
def test_invalid_option_values_through_the_installed_command(ckpt, out_dir, option, value):
    exe = Path(sys.executable).parent / "asr-fx"
    proc = subprocess.run([str(exe), "fuse", str(ckpt), "-o", str(out_dir / "m.onnx"),
                           "--model", "asr_fx.models:cifar_resnet",
                           option, value], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "--help" in lines[0], proc.stderr
    assert os.listdir(out_dir) == []
