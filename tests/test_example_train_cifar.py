"""examples/train_cifar.py, the paper's CIFAR recipe: two steps with 2 gloo processes under torchrun on
FakeData, then its checkpoint through ``asr-fx fuse`` (the ONNX file verified against the trained model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import asr_fx

ROOT = Path(__file__).resolve().parents[1]


def test_train_cifar_runs_two_ddp_steps_and_its_checkpoint_fuses(tmp_path):
    ckpt, onnx = tmp_path / "asr_cifar.pt", tmp_path / "resnet20.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "examples" / "train_cifar.py"), "--depth", "20", "--max-steps", "2", "--batch-size", "16",
         "--fake-size", "64", "--workers", "0", "--out", str(ckpt)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    assert "2 process(es)" in train.stdout and "test acc" in train.stdout
    model = asr_fx.load(ckpt)
    start = asr_fx.instrument(asr_fx.models.cifar_resnet(depth=20), example_inputs=(torch.randn(2, 3, 32, 32),))
    psi = {k: v for k, v in model.state_dict().items() if k.endswith(".psi")}
    assert len(psi) == 6 and any(not torch.equal(v, start.state_dict()[k]) for k, v in psi.items())  # it trained
    fuse = subprocess.run([sys.executable, "-m", "asr_fx.cli", "fuse", str(ckpt), "-o", str(onnx), "--strict"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert fuse.returncode == 0, fuse.stdout + fuse.stderr
    assert onnx.is_file()
