"""Verification of an ONNX file against a model in torch: :func:`verify_onnx` and its report.

Both :func:`asr_fx.export_onnx` (on the file it is about to publish) and ``asr-fx verify`` (on an
existing file) use :func:`verify_onnx`. Before comparing numbers it checks that the file is the
reference's model at all (input ranks and static sizes, parameter count) and says so when it is not
(:class:`DifferentModelError`): an 8.9 relative error says less than "11.2M vs 21.3M parameters".

Default tolerances depend on the reference's floating dtype (:data:`DEFAULT_RTOL`): a float16
model cannot agree with onnxruntime within float32's 1e-4.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from tabulate import tabulate
from torch import nn

from asr_fx import onnx_runtime, openvino_runtime
from asr_fx._util import count_parameters, meta_tensors
from asr_fx.errors import (
    DifferentModelError,
    InputShapeError,
    InvalidOptionError,
    OnnxFileError,
    UnsupportedModelError,
    VerificationError,
)
from asr_fx.passes.graph.modes import preserved_training_modes

#: default ``rtol`` per reference dtype: float32's is DESIGN.md's; float16 keeps ~3 significant digits
#: per op and bfloat16 ~2, so errors of a deep net reach those sizes relative to max|reference|
DEFAULT_RTOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]

#: the runtimes :func:`verify_onnx` runs a file in, on CPU (OpenVINO from the ``openvino`` extra)
RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class OutputError:
    """One output's agreement: max abs error, that over max|reference|, and whether it is in tolerance."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class ExportReport:
    """What was exported (or verified) and how well the runtime (``provider``: an onnxruntime execution
    provider, or ``"OpenVINO CPU"``) agrees with torch."""

    path: str
    provider: str = ""
    outputs: list[OutputError] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    param_count: int = 0
    rtol: float = 1e-4
    atol: float = 0.0
    verified: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    external_data: list[str] = field(default_factory=list)
    """files beside ``path`` that hold its weights (empty when the file holds them itself)"""
    exporter: str = "dynamo"
    """torch's exporter that wrote the file: ``"dynamo"``, or ``"torchscript"`` where dynamo failed"""
    exporter_note: str = ""
    """why the TorchScript exporter was used (the dynamo exporter's error), else empty"""

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def table(self) -> str:
        """Per output: max abs and relative error and ok/FAILED against ``rtol``, as a text table."""
        rows = [(o.name, f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", "ok" if o.ok else "FAILED") for o in self.outputs]
        return tabulate(rows, headers=["output", "max abs err", "max rel err", f"rtol {self.rtol:g}"])

    def to_dict(self) -> dict:
        """The report as plain JSON-ready types."""
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
            "input_names": self.input_names,
            "output_names": self.output_names,
            "external_data": self.external_data,
            "exporter": self.exporter,
            "exporter_note": self.exporter_note,
        }


def onnx_op_counts(model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """The op-type multiset of an ONNX model's main graph (and of its local functions)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in proto.graph.node)
    for function in proto.functions:
        counts.update(node.op_type for node in function.node)
    return dict(sorted(counts.items()))


def onnx_parameter_count(proto: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers (the weights) of an ONNX model; no data is read."""
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floating)


def onnx_inputs(proto: onnx.ModelProto) -> list[tuple[str, list[int | str]]]:
    """``(name, dims)`` of each graph input; symbolic dims as their names (``"?"`` when unnamed)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input if i.name not in initializers]


@contextlib.contextmanager
def fp32_matmul_precision():
    """Turn TF32 off (CUDA matmul and cuDNN) for the block and restore both flags afterwards: with TF32,
    CUDA fp32 matmuls and convolutions err by ~1e-4 relative, as much as verification checks against."""
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


def flatten_outputs(out: object) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, or nested tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    return []


def compare(reference: Sequence[torch.Tensor], actual: Sequence[np.ndarray], rtol: float, atol: float,
            names: Sequence[str] | None = None) -> list[OutputError]:
    """Per output: ``max|a - r|`` and that over ``max|r|``; ok when ``max_abs <= atol + rtol * max|r|``.
    Outputs are named ``names`` (the ONNX file's output names), else ``output0``, ``output1``, ..."""
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
        name = names[i] if names is not None and i < len(names) else f"output{i}"
        errors.append(OutputError(name, max_abs, max_abs / scale if scale else max_abs, ok))
    return errors


def op_count_diff(expected: dict[str, int], actual: dict[str, int]) -> str:
    """``"Mul: 3 (expected 0), Conv: 12 (expected 13)"``: the op types whose counts differ."""
    ops = sorted(set(expected) | set(actual))
    return ", ".join(f"{op}: {actual.get(op, 0)} (expected {expected.get(op, 0)})"
                     for op in ops if actual.get(op, 0) != expected.get(op, 0)) or "none"


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter or buffer (float32 when it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def default_rtol(model: nn.Module) -> float:
    """:data:`DEFAULT_RTOL` for ``model``'s dtype (float32's 1e-4 for any other)."""
    return DEFAULT_RTOL.get(model_dtype(model), 1e-4)


def check_runnable(model: nn.Module, what: str = "the model") -> None:
    """Refuse (:class:`UnsupportedModelError`) a model with weights on the meta device (nothing to
    export or compare) or in bfloat16 (onnxruntime cannot run bfloat16 graphs, so nothing verifies)."""
    meta = meta_tensors(model)
    if meta:
        raise UnsupportedModelError(
            f"{what} has {len(meta)} parameter(s)/buffer(s) on the meta device ({meta[0]}, ...): they hold no "
            "values; load real weights first (model.to_empty(device='cpu') then load_state_dict)", reason="meta")
    if model_dtype(model) == torch.bfloat16:
        raise UnsupportedModelError(
            f"{what} is in bfloat16, which onnxruntime cannot run, so its ONNX file cannot be verified: export "
            "a float32 copy (model.float()) and cast at deployment, or export unverified (verify=False)",
            reason="dtype")


def as_args(inputs: Inputs) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``(positional, keyword)`` model inputs: a tensor or a sequence is positional, a mapping keyword."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def _check_inputs_fit(proto: onnx.ModelProto, path: str, args: tuple, kwargs: dict,
                      runtime: str = "onnxruntime") -> None:
    """Raise :class:`InputShapeError` when the file's inputs have another rank or static size than ``inputs``."""
    given = [*args, *kwargs.values()]
    file_inputs = onnx_inputs(proto)
    if len(file_inputs) != len(given):
        return  # the exporter drops unused inputs: onnxruntime's feeds say the rest
    for (name, dims), tensor in zip(file_inputs, given):
        if len(dims) != tensor.dim() or any(isinstance(d, int) and d != s for d, s in zip(dims, tensor.shape)):
            raise InputShapeError(f"{runtime} cannot run {path!r} on an input of shape {list(tensor.shape)}: its "
                                  f"input {name!r} is {dims}; give an input of that shape", shape=list(tensor.shape))


def weight_mismatch(proto: onnx.ModelProto, path: str, reference: nn.Module) -> str | None:
    """Why the file's weights cannot be ``reference``'s, or None when their count fits.

    The exporter folds BatchNorm into convolutions and small constants into ops, and leaves out
    parameters the forward does not use (aux heads): a file holds somewhat fewer weights than its
    model, never more; far fewer is suspect, not proof."""
    in_file = onnx_parameter_count(proto)
    most = count_parameters(reference) + sum(b.numel() for b in reference.buffers() if b.is_floating_point())
    least = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("asr."))
    if in_file > 1.02 * most + 64 or in_file < 0.7 * least:
        return (f"{path!r} is a different model: it holds {in_file:,} weights, the reference model has {least:,} "
                "parameters (not counting ASR blocks); compare it with the model it was exported from")
    return None


def verify_onnx(
    path: str | os.PathLike,
    reference: nn.Module,
    inputs: Inputs,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    providers: Sequence[str] | None = None,
    batches: Sequence[int] = (),
    sizes: Sequence[tuple[int, int]] = (),
    expected_op_counts: dict[str, int] | None = None,
    report: ExportReport | None = None,
    runtime: str = "onnxruntime",
) -> ExportReport:
    """Run the ONNX file at ``path`` in onnxruntime (or ``runtime="openvino"``: OpenVINO's CPU plugin,
    from the ``openvino`` extra) and compare it with ``reference`` in torch.

    ``inputs``: a tensor, a sequence (positional) or a mapping (keyword inputs by name). ``rtol``
    defaults to :data:`DEFAULT_RTOL` of the reference's dtype. The outputs are compared on ``inputs``,
    then (for a file with dynamic axes) on random inputs of each batch size in ``batches`` and each
    ``(height, width)`` in ``sizes`` (the last two dims of every input). Agreement means
    ``max|onnx - torch| <= atol + rtol * max|torch|`` per output; outputs carry the file's names.

    Raises :class:`UnsupportedModelError` for a meta-device or bfloat16 reference,
    :class:`InputShapeError` when the file's inputs do not fit ``inputs`` (before running it),
    :class:`DifferentModelError` when the outputs disagree and the file's weight count cannot be the
    reference's (the count is checked first; it names both counts instead of an error size), and
    :class:`VerificationError` (``.report``) when the numbers disagree or ``expected_op_counts`` is
    given and the op multiset differs; :class:`OnnxFileError` for a file that is not ONNX or that ``runtime``
    cannot load or run; :class:`MissingDependencyError` for ``runtime="openvino"`` without
    OpenVINO installed. Both runtimes are held to the same tolerances. The reference's train/eval modes
    are restored afterwards.
    """
    path = str(path)
    if runtime not in RUNTIMES:
        raise InvalidOptionError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    check_runnable(reference, "the reference model")
    rtol = default_rtol(reference) if rtol is None else rtol
    report = report or ExportReport(path)
    report.rtol, report.atol = rtol, atol
    args, kwargs = as_args(inputs)
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's errors vary by version: the file is not ONNX
        raise OnnxFileError(f"{path!r} is not a readable ONNX model: {_first_line(exc)}", path=path,
                            runtime=runtime) from exc
    report.op_counts = onnx_op_counts(proto)
    report.input_names = [name for name, _ in onnx_inputs(proto)]
    report.output_names = [o.name for o in proto.graph.output]
    _check_inputs_fit(proto, path, args, kwargs, runtime)
    mismatch = weight_mismatch(proto, path, reference)
    start = time.perf_counter()
    with preserved_training_modes(reference):
        reference.eval()
        sess = _open(path, runtime, providers, report)
        try:
            _compare_all(sess, reference, args, kwargs, rtol, atol, batches, sizes, report)
        except VerificationError as exc:  # outputs of another count or shape
            if mismatch:
                raise DifferentModelError(f"{mismatch} ({exc})", report) from None
            raise
    report.verified = True
    report.seconds["verify"] = time.perf_counter() - start
    if not report.ok and mismatch:
        raise DifferentModelError(f"{mismatch}; {runtime} disagrees with it:\n{report.table()}", report)
    if not report.ok:
        raise VerificationError(
            f"{runtime} ({report.provider}) disagrees with torch beyond atol={atol:g} + rtol={rtol:g} * "
            f"max|ref|:\n{report.table()}",
            report)
    if expected_op_counts is not None and report.op_counts != expected_op_counts:
        raise VerificationError("the ONNX op multiset differs from the expected (vanilla) one: "
                                f"{op_count_diff(expected_op_counts, report.op_counts)}", report)
    return report


def _open(path: str, runtime: str, providers: Sequence[str] | None, report: ExportReport) -> object:
    """A runnable session of ``path`` in ``runtime``; sets ``report.provider`` (what ran it)."""
    if runtime == "openvino":
        openvino_runtime.check_installed()  # MissingDependencyError, not "cannot load", when OpenVINO is absent
    try:
        if runtime == "openvino":
            sess = openvino_runtime.session(path)
            report.provider = f"OpenVINO {openvino_runtime.DEVICE}"
        else:
            sess = onnx_runtime.session(path, providers)
            report.provider = sess.get_providers()[0]
    except Exception as exc:  # noqa: BLE001 - the runtimes' errors are long: keep the first line
        raise OnnxFileError(f"{runtime} cannot load {path!r}: {_first_line(exc)}", path=path, runtime=runtime) from exc
    return sess


def _run(sess: object, inputs: tuple | dict) -> list[np.ndarray]:
    module = onnx_runtime if hasattr(sess, "get_providers") else openvino_runtime
    return module.run(sess, inputs)[0]


def _compare_all(sess, reference: nn.Module, args: tuple, kwargs: dict, rtol: float, atol: float,
                 batches: Sequence[int], sizes: Sequence[tuple[int, int]], report: ExportReport) -> None:
    names = report.output_names
    report.outputs = _compare_on(sess, reference, args, kwargs, rtol, atol, names, "")
    for batch in batches:
        shaped = {k: (batch, *t.shape[1:]) for k, t in _named(args, kwargs).items()}
        report.outputs += _compare_on(sess, reference, *_random_like(args, kwargs, shaped, batch), rtol, atol,
                                      names, f" (batch {batch})")
    for height, width in sizes:
        shaped = {k: (*t.shape[:-2], height, width) for k, t in _named(args, kwargs).items()}
        report.outputs += _compare_on(sess, reference, *_random_like(args, kwargs, shaped, height * 1000 + width),
                                      rtol, atol, names, f" ({height}x{width})")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _named(args: tuple, kwargs: dict) -> dict[str | int, torch.Tensor]:
    return {**dict(enumerate(args)), **kwargs}


def _random_like(args: tuple, kwargs: dict, shapes: dict, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)

    def fresh(key: str | int, t: torch.Tensor) -> torch.Tensor:
        return torch.randn(shapes[key], generator=g).to(t.device, t.dtype) if t.is_floating_point() else t

    return (tuple(fresh(i, t) for i, t in enumerate(args)), {k: fresh(k, t) for k, t in kwargs.items()})


def _runtime_name(sess: object) -> str:
    return "onnxruntime" if hasattr(sess, "get_providers") else "openvino"


def _compare_on(sess, reference: nn.Module, args: tuple, kwargs: dict, rtol: float, atol: float,
                names: list[str], label: str) -> list[OutputError]:
    with torch.no_grad(), fp32_matmul_precision():
        expected = flatten_outputs(reference(*args, **kwargs))
    try:
        actual = _run(sess, kwargs if kwargs else args)
    except Exception as exc:  # noqa: BLE001 - the runtimes' errors are long: keep the first line
        raise OnnxFileError(f"{_runtime_name(sess)} cannot run the ONNX file{label}: {_first_line(exc)}",
                            runtime=_runtime_name(sess)) from exc
    errors = compare(expected, actual, rtol, atol, names)
    for e in errors:
        e.name += label
    return errors
