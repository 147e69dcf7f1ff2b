"""``asr-fx fuse`` killed mid-run: the old OUT survives, and the next complete run leaves nothing.

test_export_files.py covers the library (a SIGTERM during ``export_onnx``, a SIGKILLed temp folder removed
by the next export); here the installed command is killed at its own progress markers (the stage lines),
with a private TMPDIR: SIGKILL once the verify stage starts, then SIGTERM once the export stage starts in
the next run, then a run to completion. tools/kill_fuse.py does the same at 20 random moments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import asr_fx


def kill_at_stage(cmd: list[str], env: dict, stage: str, signum: int) -> int:
    """Run ``cmd``; send ``signum`` when it prints the ``stage`` line; return its exit code."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.split("] ")[-1].startswith(stage) and line.startswith("["):
            proc.send_signal(signum)
            break
    proc.stdout.read()
    return proc.wait(timeout=300)


def leftovers(out_dir: Path, tmp_dir: Path) -> list[str]:
    return sorted([p.name for p in out_dir.iterdir() if p.name != "model.onnx"]
                  + [f"TMPDIR/{p.name}" for p in tmp_dir.iterdir() if p.name.startswith("asr-fx-")])


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    model = asr_fx.instrument(asr_fx.build("asr_fx.models:cifar_resnet", depth=11, num_classes=10),
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    ckpt = tmp_path / "model.pt"
    asr_fx.save(model.eval(), ckpt)
    out_dir, tmp_dir = tmp_path / "out", tmp_path / "tmp"
    out_dir.mkdir()
    tmp_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "asr-fx"), "fuse", str(ckpt), "-o", str(out_dir / "model.onnx")]
    return cmd, env, out_dir, tmp_dir


def test_killed_fuse_keeps_the_old_output_and_the_next_runs_leave_nothing(setup):
    cmd, env, out_dir, tmp_dir = setup
    old = b"the old output"
    (out_dir / "model.onnx").write_bytes(old)
    assert kill_at_stage(cmd, env, "verify", signal.SIGKILL) == -signal.SIGKILL
    assert (out_dir / "model.onnx").read_bytes() == old
    assert leftovers(out_dir, tmp_dir) != []  # SIGKILL cannot be caught: its temporary folders stay, for now
    # a SIGTERM keeps the old OUT too. What it leaves depends on the moment the signal lands (seen: the
    # system-temp folder of a run terminated right after its `export` line); the next run removes it
    assert kill_at_stage(cmd, env, "export", signal.SIGTERM) == -signal.SIGTERM
    assert (out_dir / "model.onnx").read_bytes() == old
    proc = subprocess.run(cmd + ["-q"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(out_dir, tmp_dir) == []
    onnx.checker.check_model(str(out_dir / "model.onnx"))


_SIGNAL_WHILE_LOCKED = """
import os, signal, sys
from asr_fx import atomic
with atomic.temp_folder(sys.argv[1], "locked") as folder:
    print(folder, flush=True)
    with atomic._lock:  # the handler runs while the main thread holds the lock that guards the folder list
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10 ** 6):
            pass
"""


def test_sigterm_while_the_folder_list_is_locked_still_removes_the_folder(tmp_path):
    """The handler takes the lock the interrupted code holds: a plain Lock deadlocked (the run hung until
    SIGKILLed, leaving its folder); the re-entrant one removes the folder and dies of the signal."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_LOCKED, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.strip() and not Path(proc.stdout.strip()).exists()
    assert list(tmp_path.iterdir()) == []
