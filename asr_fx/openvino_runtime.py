"""OpenVINO in one place: compiled models, runs, latency and the ops the CPU plugin really runs.

The same shape of API as :mod:`asr_fx.onnx_runtime`: :func:`session` (a compiled model), :func:`run`
and :func:`latency_ms`. OpenVINO reads the ONNX file itself (no conversion step) and compiles it for
its CPU plugin. It is an optional dependency (``pip install "asr-fx[openvino]"``): imported when a
model is first run, never with asr-fx.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from asr_fx.errors import MissingDependencyError

#: the OpenVINO device models are compiled for (asr-fx verifies on CPU only)
DEVICE = "CPU"
INSTALL_HINT = 'pip install "asr-fx[openvino]"'


def check_installed() -> None:
    """Raise :class:`MissingDependencyError` (naming the ``openvino`` extra) when OpenVINO is not installed."""
    _openvino()


def _openvino() -> Any:
    """The ``openvino`` module, or :class:`MissingDependencyError` naming the extra that installs it."""
    try:
        import openvino  # noqa: PLC0415 - optional dependency (the "openvino" extra), imported on first use
    except ImportError as exc:
        raise MissingDependencyError(
            f"--runtime openvino needs OpenVINO, which is not installed ({exc}); install it with: {INSTALL_HINT}",
            package="openvino") from exc
    return openvino


def session(path: str, threads: int | None = None) -> Any:
    """The ONNX file at ``path`` read and compiled by OpenVINO for its CPU plugin (``threads`` inference
    threads; OpenVINO's default otherwise)."""
    ov = _openvino()
    core = ov.Core()
    config: dict[str, int | str] = {"INFERENCE_NUM_THREADS": int(threads)} if threads is not None else {}
    # f32 inference: the CPU plugin may otherwise pick bf16/f16 on CPUs that have them, and verification
    # compares against float32 torch within 1e-4
    config["INFERENCE_PRECISION_HINT"] = "f32"
    return core.compile_model(core.read_model(str(path)), DEVICE, config)


def _is_path(obj: Any) -> bool:
    return isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__")


def feeds(compiled: Any, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Inputs by the compiled model's input names: a mapping by name (names the file lacks are dropped, as
    torch.onnx drops unused inputs), a sequence in the file's input order."""
    names = [port.get_any_name() for port in compiled.inputs]
    if isinstance(inputs, Mapping):
        return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}
    return {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}


def output_names(compiled: Any) -> list[str]:
    """The compiled model's output names (the ONNX file's)."""
    return [port.get_any_name() for port in compiled.outputs]


def run(path_or_session: Any, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        threads: int | None = None) -> tuple[list[np.ndarray], str, list[str]]:
    """Run an ONNX file (or a compiled model) in OpenVINO; returns ``(outputs, device, output names)``
    like :func:`asr_fx.onnx_runtime.run` (the device reads ``"OpenVINO CPU"``)."""
    compiled = session(path_or_session, threads) if _is_path(path_or_session) else path_or_session
    result = compiled.create_infer_request().infer(feeds(compiled, inputs))
    outputs = [np.asarray(result[port]) for port in compiled.outputs]
    return outputs, f"OpenVINO {DEVICE}", output_names(compiled)


def runtime_op_counts(path_or_session: Any, threads: int | None = None) -> dict[str, int]:
    """The op types the CPU plugin executes after its own graph transformations (the compiled model's
    runtime model, e.g. ``Convolution`` and fused ``Subgraph`` nodes), not the ONNX file's ops.
    Parameters, results and constants are not counted."""
    compiled = session(path_or_session, threads) if _is_path(path_or_session) else path_or_session
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        kind = op.get_rt_info()["layerType"].astype(str) if "layerType" in op.get_rt_info() else op.get_type_name()
        if kind not in ("Parameter", "Result", "Input", "Output", "Constant", "Const"):
            counts[kind] += 1
    return dict(sorted(counts.items()))


def latency_ms(paths: Mapping[str, str], inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *,
               runs: int = 20, warmup: int = 3, threads: int = 1) -> dict[str, list[float]]:
    """Wall time in milliseconds of each of ``runs`` synchronous OpenVINO runs per named ONNX file
    (``threads`` threads each), the files taking turns run by run as in
    :func:`asr_fx.onnx_runtime.latency_ms`; the first ``warmup`` runs are not counted."""
    requests = {name: session(path, threads).create_infer_request() for name, path in paths.items()}
    fed = {name: feeds(req.get_compiled_model(), inputs) for name, req in requests.items()}
    times: dict[str, list[float]] = {name: [] for name in requests}
    for step in range(runs + warmup):
        for name, req in requests.items():
            start = time.perf_counter()
            req.infer(fed[name])
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times
