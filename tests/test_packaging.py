"""Packaging: exactly one onnxruntime for every combination of extras, and the runtime check that says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from asr_fx import onnx_runtime
from asr_fx.errors import MissingDependencyError

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_RUNTIMES = set(onnx_runtime.RUNTIME_DISTRIBUTIONS)


def _requirements(extras: set[str]) -> set[str]:
    """The distribution names pip installs for ``asr-fx[extras]``: base requirements with their markers
    evaluated as pip does (no extra), each extra's with ``extra`` set to it."""
    project = tomllib.loads(_PYPROJECT.read_text())["project"]
    pairs = [(Requirement(r), "") for r in project["dependencies"]]
    pairs += [(Requirement(r), e) for e in extras for r in project["optional-dependencies"][e]]
    return {req.name.lower() for req, extra in pairs if req.marker is None or req.marker.evaluate({"extra": extra})}


def test_each_runtime_extra_installs_exactly_one_runtime() -> None:
    assert _requirements({"gpu"}) & _RUNTIMES == {"onnxruntime-gpu"}
    assert _requirements({"cpu"}) & _RUNTIMES == {"onnxruntime"}
    assert _requirements({"test"}) & _RUNTIMES == {"onnxruntime"}  # CI: pip install -e ".[test]"
    assert _requirements(set()) & _RUNTIMES == set()


def test_two_runtimes_installed_warn_and_none_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_runtime, "installed_runtimes", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.warns(onnx_runtime.RuntimeConflictWarning, match="pip uninstall"):
        onnx_runtime._import_onnxruntime()
    monkeypatch.setattr(onnx_runtime, "installed_runtimes", lambda: [])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"asr-fx\[cpu\]"):
        onnx_runtime._import_onnxruntime()


def test_this_environment_has_exactly_one_runtime() -> None:
    assert len(onnx_runtime.installed_runtimes()) == 1
