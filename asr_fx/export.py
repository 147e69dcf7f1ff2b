"""ONNX export with verification in onnxruntime, written atomically.

The model is exported to a temporary file beside ``path``, checked with ``onnx.checker``, run in
onnxruntime and compared with the reference in torch; only then is it renamed to ``path``. Any
failure leaves ``path`` as it was (absent, or the file that was there).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from tabulate import tabulate
from torch import nn

from asr_fx.errors import ASRError, VerificationError


class ExportError(ASRError):
    """torch.onnx.export could not export the model."""


@dataclass
class OutputError:
    """One output's agreement: max abs error, that over max|reference|, and whether it is in tolerance."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class ExportReport:
    """What :func:`export_onnx` exported and how well onnxruntime agrees with torch."""

    path: str
    provider: str = ""
    outputs: list[OutputError] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    param_count: int = 0
    rtol: float = 1e-4
    atol: float = 0.0
    verified: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def table(self) -> str:
        """Per output: max abs and relative error and ok/FAILED against ``rtol``, as a text table."""
        rows = [(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", "ok" if o.ok else "FAILED") for o in self.outputs]
        return tabulate(rows, headers=["output", "max abs err", "max rel err", f"rtol {self.rtol:g}"])

    def to_dict(self) -> dict:
        """The report as plain JSON-ready types: path, provider, verified/ok, tolerances, per-output
        errors, ONNX op counts, parameter count and seconds per stage."""
        return {
            "path": self.path,
            "provider": self.provider,
            "verified": self.verified,
            "ok": self.ok,
            "rtol": self.rtol,
            "atol": self.atol,
            "outputs": [o.__dict__ for o in self.outputs],
            "op_counts": self.op_counts,
            "param_count": self.param_count,
            "seconds": self.seconds,
        }


def onnx_op_counts(model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """The op-type multiset of an ONNX model's main graph (and of its local functions)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in proto.graph.node)
    for function in proto.functions:
        counts.update(node.op_type for node in function.node)
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def fp32_matmul_precision():
    """Turn TF32 off (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``)
    for the block and restore both flags afterwards: with TF32, CUDA fp32 matmuls and convolutions
    err by ~1e-4 relative, as much as the tolerance verification checks against."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer torch suggests its fp32_precision API instead
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = matmul
            torch.backends.cudnn.allow_tf32 = cudnn


#: the oldest opset torch's dynamo ONNX exporter writes natively; it converts to an older one when
#: onnx's version converter can, and otherwise silently keeps this one
MIN_OPSET = 18


def check_opset(path: str | os.PathLike, opset: int | None) -> None:
    """Raise :class:`ExportError` when the ONNX file at ``path`` is not of the requested default-domain opset."""
    if opset is None:
        return
    proto = onnx.load(str(path), load_external_data=False)
    written = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(
            f"asked for ONNX opset {opset}, but torch's exporter wrote opset {written}: it supports opsets "
            f"{MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the installed onnx's newest), and older ones only "
            f"where onnx's version converter can convert the model, which it could not here; pass an --opset "
            f"(opset=) in that range, or leave it out for the exporter's default"
        )


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def flatten_outputs(out: object) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    return []


def _export(model: nn.Module, args: tuple, path: str, opset: int | None, dynamic_batch: bool) -> None:
    kwargs: dict = {"dynamo": True, "verbose": False, "external_data": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        # torch.export specializes a dimension of size 1; trace with two samples so batch stays symbolic
        args = tuple(a.expand(2, *a.shape[1:]).contiguous() if a.dim() and a.shape[0] == 1 else a for a in args)
        batch = torch.export.Dim("batch", min=1)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
    # the exporter prints graph dumps and log lines on failure: keep the terminal to our one-line error
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "torch.fx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, path, **kwargs)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _exporter_message(exc: BaseException) -> str:
    """``Type: first line`` of the exporter's error, and of its root cause when that says more."""
    def first(e: BaseException) -> str:
        line = next((ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()), "")
        return f"{type(e).__name__}: {line}".rstrip(": ")

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return first(exc) if root is exc else f"{first(exc)}; cause: {first(root)}"


def run_onnxruntime(path: str, inputs: Sequence[torch.Tensor], providers: Sequence[str] | None = None):
    """Run an ONNX file in onnxruntime; returns ``(outputs, provider)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=list(providers or ["CPUExecutionProvider"]))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds), session.get_providers()[0]


def compare(reference: Sequence[torch.Tensor], actual: Sequence[np.ndarray], rtol: float, atol: float) -> list[OutputError]:
    """Per output: ``max|a - r|`` and that over ``max|r|``; ok when ``max_abs <= atol + rtol * max|r|``."""
    if len(reference) != len(actual):
        raise VerificationError(f"onnxruntime returned {len(actual)} outputs, torch {len(reference)}")
    errors = []
    for i, (ref, act) in enumerate(zip(reference, actual)):
        ref_np = ref.detach().float().cpu().numpy()
        act = np.asarray(act, dtype=np.float32)
        if ref_np.shape != act.shape:
            raise VerificationError(f"output {i}: onnxruntime shape {act.shape} != torch shape {ref_np.shape}")
        scale = float(np.abs(ref_np).max()) if ref_np.size else 0.0
        max_abs = float(np.abs(ref_np - act).max()) if ref_np.size else 0.0
        ok = bool(np.isfinite(act).all()) and max_abs <= atol + rtol * scale
        errors.append(OutputError(f"output{i}", max_abs, max_abs / scale if scale else max_abs, ok))
    return errors


def op_count_diff(expected: dict[str, int], actual: dict[str, int]) -> str:
    """``"Mul: 3 (expected 0), Conv: 12 (expected 13)"``: the op types whose counts differ."""
    ops = sorted(set(expected) | set(actual))
    return ", ".join(f"{op}: {actual.get(op, 0)} (expected {expected.get(op, 0)})"
                     for op in ops if actual.get(op, 0) != expected.get(op, 0)) or "none"


def _verify_at_batch(path: str, reference: nn.Module, args: tuple, batch: int, rtol: float, atol: float,
                     providers: Sequence[str] | None) -> list[OutputError]:
    """Run the (dynamic-batch) ONNX file on random inputs of ``batch`` samples and compare with torch."""
    g = torch.Generator().manual_seed(batch)
    inputs = tuple(torch.randn((batch, *a.shape[1:]), generator=g).to(a.device, a.dtype) for a in args)
    with torch.no_grad(), fp32_matmul_precision():
        expected = flatten_outputs(reference.eval()(*inputs))
    actual, _ = run_onnxruntime(path, inputs, providers)
    errors = compare(expected, actual, rtol, atol)
    for e in errors:
        e.name = f"{e.name} (batch {batch})"
    return errors


def onnxruntime_latency_ms(path: str | os.PathLike, inputs: torch.Tensor | Sequence[torch.Tensor], *, runs: int = 20,
                           warmup: int = 3, providers: Sequence[str] | None = None) -> float:
    """Median wall time in milliseconds of one onnxruntime run of ``path`` on ``inputs`` (one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), _as_tuple(inputs))}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    verify: bool = True,
    reference: nn.Module | None = None,
    rtol: float = 1e-4,
    atol: float = 0.0,
    opset: int | None = None,
    dynamic_batch: bool = False,
    providers: Sequence[str] | None = None,
    verify_batches: Sequence[int] | None = None,
    expected_op_counts: dict[str, int] | None = None,
    on_verify: Callable[[], None] | None = None,
) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path``, check it and verify it in onnxruntime.

    Verification compares onnxruntime's outputs with ``reference`` (default: ``model``) in torch
    on ``example_inputs``, and with ``dynamic_batch`` also on random inputs of each batch size in
    ``verify_batches`` (default 1 and 7). Raises :class:`VerificationError` (with ``.report``) when
    they disagree beyond ``atol + rtol * max|reference|``, or when ``expected_op_counts`` is given
    and the ONNX op multiset differs from it; then nothing is written at ``path``. Raises
    :class:`ExportError` when ``opset`` is given and the exporter wrote another one (it supports
    ``MIN_OPSET`` and newer). The reference runs with TF32 off (:func:`fp32_matmul_precision`).
    ``model``'s and ``reference``'s train/eval modes are restored afterwards.
    """
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ASRError(f"the output {str(path)!r} should end in .onnx")
    if path.is_dir():
        raise ASRError(f"the output {str(path)!r} is a folder: name the .onnx file to write")
    if not path.parent.is_dir():
        raise ASRError(f"the output folder {str(path.parent)!r} does not exist")
    args = _as_tuple(example_inputs)
    modes = {m: m.training for owner in (model, reference) if owner is not None for m in owner.modules()}
    try:
        return _export_verified(model, path, args, verify, reference, rtol, atol, opset, dynamic_batch, providers,
                                verify_batches, expected_op_counts, on_verify)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _export_verified(model, path, args, verify, reference, rtol, atol, opset, dynamic_batch, providers,
                     verify_batches, expected_op_counts, on_verify) -> ExportReport:
    model = model.eval()
    report = ExportReport(str(path), rtol=rtol, atol=atol, param_count=sum(p.numel() for p in model.parameters()))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    try:
        start = time.perf_counter()
        try:
            _export(model, args, tmp, opset, dynamic_batch)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(
                f"torch.onnx.export failed: {_exporter_message(exc)}. "
                "Try another --opset, a fixed batch (no --dynamic-batch), or rewriting data-dependent Python control "
                "flow (torch.export cannot follow it); fuse with --strict to see which site stayed unfolded; "
                "-v prints the exporter's full message"
            ) from exc
        report.seconds["export"] = time.perf_counter() - start
        check_opset(tmp, opset)
        onnx.checker.check_model(tmp)
        report.op_counts = onnx_op_counts(tmp)
        if verify:
            if on_verify is not None:
                on_verify()
            start = time.perf_counter()
            with torch.no_grad(), fp32_matmul_precision():
                expected = flatten_outputs((reference or model).eval()(*args))
            actual, report.provider = run_onnxruntime(tmp, args, providers)
            report.outputs = compare(expected, actual, rtol, atol)
            if dynamic_batch:
                for batch in (1, 7) if verify_batches is None else verify_batches:
                    report.outputs += _verify_at_batch(tmp, reference or model, args, batch, rtol, atol, providers)
            report.verified = True
            report.seconds["verify"] = time.perf_counter() - start
            if not report.ok:
                raise VerificationError(
                    f"onnxruntime disagrees with torch beyond atol={atol:g} + rtol={rtol:g} * max|ref|:\n{report.table()}",
                    report,
                )
        if expected_op_counts is not None and report.op_counts != expected_op_counts:
            raise VerificationError(
                f"the ONNX op multiset differs from the expected (vanilla) one: {op_count_diff(expected_op_counts, report.op_counts)}",
                report,
            )
        from asr_fx.checkpoint import publish

        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return report
