"""onnxruntime in one place: sessions, runs and latency.

onnxruntime is imported when a model is first run, not with asr-fx (it takes a while to import and
``asr-fx --help`` needs none of it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def session(path: str, providers: Sequence[str] | None = None, *, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path`` (its warnings quiet; ``threads`` intra-op threads)."""
    import onnxruntime as ort  # noqa: PLC0415 - optional at import time: only needed to run a model

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
