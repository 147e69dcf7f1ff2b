"""Every script in examples/ runs to the end on its small default (synthetic data, seconds on a CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: examples with a test of their own (a multi-process run under torchrun), not run again here
OWN_TEST = {"train_cifar.py": "test_example_train_cifar.py"}
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in OWN_TEST)
#: the examples that write files take -o
WRITES = {"own_loop.py", "hf_trainer.py", "lightning_module.py"}


def test_every_example_is_run():
    assert {p.name for p in EXAMPLES} >= {"own_loop.py", "hf_trainer.py", "lightning_module.py", "timm_model.py",
                                          "yolo.py", "ci_equivalence.py"}
    for example, test in OWN_TEST.items():
        assert (ROOT / "examples" / example).is_file() and (ROOT / "tests" / test).is_file()


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    args = ["-o", str(tmp_path / "out")] if script.name in WRITES else []
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
