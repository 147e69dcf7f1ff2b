"""onnxruntime in one place: sessions, runs and latency.

onnxruntime is imported when a model is first run, not with asr-fx (it takes a while to import and
``asr-fx --help`` needs none of it). It comes from one of two extras, ``cpu`` (``onnxruntime``) or ``gpu``
(``onnxruntime-gpu``), never both: the packages install the same ``onnxruntime`` module and overwrite each
other's files. :func:`installed_runtimes` says which are installed; :func:`session` refuses when none is
(:class:`~asr_fx.errors.MissingDependencyError`) and warns when several are.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch

from asr_fx.errors import MissingDependencyError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
#: the distributions that install the ``onnxruntime`` module (one environment must hold at most one)
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                         "onnxruntime-silicon", "onnxruntime-training")
INSTALL_HINT = 'pip install "asr-fx[cpu]" (or "asr-fx[gpu]" for onnxruntime-gpu, never both)'


class RuntimeConflictWarning(UserWarning):
    """More than one onnxruntime distribution is installed: they overwrite each other's files."""


def installed_runtimes() -> list[str]:
    """The onnxruntime distributions installed in this environment (normally exactly one)."""
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _import_onnxruntime() -> Any:
    """The ``onnxruntime`` module; :class:`MissingDependencyError` naming the extras when none is installed,
    :class:`RuntimeConflictWarning` when several distributions are."""
    found = installed_runtimes()
    if len(found) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[0]
        drop = " ".join(n for n in found if n != keep)
        warnings.warn(f"{' and '.join(found)} are installed side by side: they install the same `onnxruntime` "
                      f"module and overwrite each other's files (a CUDA provider can go missing). Keep one: "
                      f"pip uninstall -y {' '.join(found)} && pip install {keep}  (or pip uninstall {drop} and "
                      f"reinstall {keep})", RuntimeConflictWarning, stacklevel=3)
    try:
        import onnxruntime  # noqa: PLC0415 - optional at import time: only needed to run a model
    except ImportError as exc:
        raise MissingDependencyError(f"verifying or running an ONNX file needs onnxruntime, which is not installed "
                                     f"({exc}); install it with: {INSTALL_HINT}, or export with verify=False "
                                     "(--no-verify)", package="onnxruntime") from exc
    return onnxruntime


def session(path: str, providers: Sequence[str] | None = None, *, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` (its warnings quiet; ``threads`` intra-op threads)."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=list(providers or DEFAULT_PROVIDERS))


def feeds(sess: Any, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Inputs as onnxruntime feeds: a mapping by input name (keys the file does not have are dropped,
    as torch.onnx drops unused inputs), a sequence in the file's input order."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, Mapping):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}
    return {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}


def run(path_or_session: Any, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        providers: Sequence[str] | None = None) -> tuple[list[np.ndarray], str, list[str]]:
    """Run an ONNX file (or a session) on ``inputs``; returns ``(outputs, provider, output names)``."""
    sess = session(path_or_session, providers) if isinstance(path_or_session, (str, bytes)) or hasattr(
        path_or_session, "__fspath__") else path_or_session
    outputs = sess.run(None, feeds(sess, inputs))
    return outputs, sess.get_providers()[0], [o.name for o in sess.get_outputs()]


def latency_ms(paths: Mapping[str, str], inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *,
               runs: int = 20, warmup: int = 3, threads: int = 1,
               providers: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Wall time in milliseconds of each of ``runs`` onnxruntime runs per named ONNX file (``threads``
    threads each). The files take turns run by run, so a busy machine slows them alike; the first
    ``warmup`` runs are not counted. Returns every sample, so callers can report the spread."""
    sessions = {name: session(path, providers, threads=threads) for name, path in paths.items()}
    fed = {name: feeds(sess, inputs) for name, sess in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(runs + warmup):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, fed[name])
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times
