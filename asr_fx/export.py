"""ONNX export, verified in onnxruntime and published atomically.

The model is exported into a private temporary folder beside ``path`` under its final file name,
checked with ``onnx.checker``, verified with :func:`asr_fx.verify.verify_onnx`, and only then
renamed into place. torch's dynamo exporter writes the file; where it fails (torch 2.14 cannot export
Hugging Face's Swin: its ONNX decomposition views a transposed attention output) and the inputs are
positional and the weights fit in one file, torch's TorchScript exporter (``dynamo=False``) writes it,
:attr:`ExportReport.exporter` says which one did, and verification is the same.
A model too big for one protobuf (2 GiB) is written as two files, ``NAME.onnx``
and ``NAME.onnx.data`` (its weights): both are renamed into place, the data file first, and must stay
together (move or copy them as a pair). Any failure leaves ``path`` as it was.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch import nn

from asr_fx import atomic
from asr_fx._util import count_parameters
from asr_fx.errors import ExportError, InvalidOptionError, VerificationError
from asr_fx.own_model import LEAVES, graph_form, remove
from asr_fx.passes import trace
from asr_fx.passes.export.export_forms import for_export
from asr_fx.passes.forms.module_form import has_module_form
from asr_fx.passes.graph.modes import preserved_training_modes
from asr_fx.verify import (
    ExportReport,
    Inputs,
    as_args,
    check_runnable,
    default_rtol,
    flatten_outputs,
    onnx_op_counts,
    op_count_diff,
    verify_onnx,
)

#: the oldest opset torch's dynamo ONNX exporter writes natively; it converts to an older one when
#: onnx's version converter can, and otherwise silently keeps this one
MIN_OPSET = 18
#: a model whose weights take more bytes than this is written with its weights in ``NAME.onnx.data``
#: (one protobuf holds at most 2 GiB); :func:`export_onnx`'s ``external_data`` overrides it
EXTERNAL_DATA_BYTES = 2**31 - 2**26
#: the axes ``dynamic=`` may name: batch is dim 0 of every input, height and width its last two
DYNAMIC_AXES = ("batch", "height", "width")


def check_opset(path: str | os.PathLike, opset: int | None) -> None:
    """Raise :class:`ExportError` (``.opset``, ``.written_opset``) when the ONNX file at ``path`` is not
    of the requested default-domain opset."""
    if opset is None:
        return
    proto = onnx.load(str(path), load_external_data=False)
    written = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ExportError(
            f"asked for ONNX opset {opset}, but torch's exporter wrote opset {written}: it supports opsets "
            f"{MIN_OPSET} to {onnx.defs.onnx_opset_version()} (the installed onnx's newest), and older ones only "
            f"where onnx's version converter can convert the model, which it could not here; pass an opset= "
            f"in that range, or leave it out for the exporter's default", opset=opset, written_opset=written)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (what its ONNX file's weights take)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _dynamic_shapes(args: tuple, kwargs: dict, axes: Sequence[str]) -> tuple | dict:
    dims = {name: torch.export.Dim(name, min=1) for name in axes}

    def spec(t: torch.Tensor) -> dict[int, Any]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return {}
        out = {0: dims["batch"]} if "batch" in dims else {}
        if "height" in dims and t.dim() >= 4:
            out[t.dim() - 2] = dims["height"]
        if "width" in dims and t.dim() >= 3:
            out[t.dim() - 1] = dims["width"]
        return out

    return {k: spec(t) for k, t in kwargs.items()} if kwargs else tuple(spec(t) for t in args)


@contextlib.contextmanager
def _quiet_exporter(errors: tuple[type[Warning], ...] = ()):
    """The exporters print graph dumps, warnings and log lines: keep the terminal to our one-line error.
    Warnings of the classes in ``errors`` are raised as exceptions instead."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export", "torch.fx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            for category in errors:
                warnings.simplefilter("error", category)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_dynamo(model: nn.Module, args: tuple, kwargs: dict, path: str, opset: int | None,
                   dynamic: Sequence[str], external_data: bool, input_names: Sequence[str] | None,
                   output_names: Sequence[str] | None) -> None:
    options: dict = {"dynamo": True, "verbose": False, "external_data": external_data}
    if opset is not None:
        options["opset_version"] = opset
    if input_names is not None:
        options["input_names"] = list(input_names)
    if output_names is not None:
        options["output_names"] = list(output_names)
    if kwargs:
        options["kwargs"] = kwargs
    if dynamic:
        if "batch" in dynamic:  # torch.export specializes a dim of size 1: trace with two samples
            def two(a: torch.Tensor) -> torch.Tensor:
                return a.expand(2, *a.shape[1:]).contiguous() if a.dim() and a.shape[0] == 1 else a
            args = tuple(two(a) for a in args)
            options["kwargs"] = {k: two(v) for k, v in kwargs.items()} if kwargs else None
        options["dynamic_shapes"] = _dynamic_shapes(args, kwargs, dynamic)
    with _quiet_exporter():
        # attention calls in forms the exporter takes (passes/export/export_forms.py); the model is not changed
        torch.onnx.export(for_export(model), args, path, **options)


def _without_guards(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GraphModules have no shape guards (``torch._assert`` nodes, which shape-aware
    capture adds): TorchScript's tracer cannot trace a guard's comparison of a traced size with a bool. The
    guarded expressions stay symbolic, so the copy computes what ``model`` computes wherever the guards hold."""
    copy = deepcopy(model)
    for module in copy.modules():
        if isinstance(module, fx.GraphModule):
            guards = [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch._assert]
            for node in guards:
                module.graph.erase_node(node)
            if guards:
                module.graph.eliminate_dead_code()
                module.recompile()
    return copy


def _export_torchscript(model: nn.Module, args: tuple, path: str, opset: int | None, dynamic: Sequence[str],
                        input_names: Sequence[str] | None, output_names: Sequence[str] | None) -> None:
    """torch's TorchScript-based exporter (``dynamo=False``) on the model without its shape guards:
    positional inputs; dynamic axes as ``dynamic_axes``. TorchScript traces one run: a Python value read
    from a tensor (``if x.sum() > 0``, ``int(x.size(0))`` turned into a constant) would be frozen into the
    file, so every ``TracerWarning`` (the tracer's "might cause the trace to be incorrect") is an error."""
    model = _without_guards(model)
    options: dict = {"dynamo": False, "verbose": False}
    if opset is not None:
        options["opset_version"] = opset
    if dynamic:
        input_names = list(input_names or (f"input_{i}" for i in range(len(args))))
        if output_names is None:
            with torch.no_grad():
                output_names = [f"output_{i}" for i in range(len(flatten_outputs(model(*args))))]
        axes = {name: {int(d) % t.dim(): str(dim) for d, dim in spec.items()}
                for name, t, spec in zip(input_names, args, _dynamic_shapes(args, {}, dynamic))}
        if "batch" in dynamic:
            axes.update({name: {0: "batch"} for name in output_names})
        options["dynamic_axes"] = axes
    if input_names is not None:
        options["input_names"] = list(input_names)
    if output_names is not None:
        options["output_names"] = list(output_names)
    with _quiet_exporter(errors=(torch.jit.TracerWarning,)):
        torch.onnx.export(model, args, path, **options)


class _ExportFailed(Exception):
    """Both exporters failed: ``errors`` is ``{exporter: exception}``."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        super().__init__("; ".join(f"{k}: {_exporter_message(e)}" for k, e in errors.items()))
        self.errors = errors


def _traced(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule | None:
    """``model``'s inference graph (asr-fx's trace, eval mode) when it is no GraphModule and traces, else None."""
    if isinstance(model, fx.GraphModule) or kwargs:
        return None
    try:
        return trace(model, model.__dict__.get(LEAVES), bind_training=False, example_inputs=args)
    except Exception:  # noqa: BLE001 - no traced form: the exporters' errors stand
        return None


def exportable(model: nn.Module, args: tuple = ()) -> nn.Module:
    """What is exported for ``model``: an instrumented model in the module form as its graph form (the
    blocks as graph nodes: exporters need not follow hooks), any other model as it is."""
    if not has_module_form(model):
        return model
    vanilla = deepcopy(model).eval()
    blocks = remove(vanilla)
    return graph_form(vanilla, blocks, model.__dict__.get(LEAVES), args or None)


def _export(model: nn.Module, args: tuple, kwargs: dict, path: str, opset: int | None, dynamic: Sequence[str],
            external_data: bool, input_names: Sequence[str] | None,
            output_names: Sequence[str] | None) -> tuple[str, str]:
    """Export with torch's dynamo exporter; where it fails, retry with the TorchScript exporter
    (``dynamo=False``) when the call has positional inputs only and its weights fit in one file.
    Returns the exporter that wrote ``path`` (``"dynamo"`` or ``"torchscript"``) and why the first one was
    not used (empty for dynamo); the caller verifies the file in a runtime either way. Raises
    :class:`_ExportFailed` with each exporter's error."""
    try:
        _export_dynamo(model, args, kwargs, path, opset, dynamic, external_data, input_names, output_names)
        return "dynamo", ""
    except Exception as exc:  # noqa: BLE001 - retried, then re-raised with the retry's error
        first = exc
    traced = _traced(model, args, kwargs)
    if traced is not None:  # the user's own class: its traced graph takes the export forms (for_export)
        for stale in Path(path).parent.iterdir():
            stale.unlink()
        try:
            _export_dynamo(traced, args, kwargs, path, opset, dynamic, external_data, input_names, output_names)
            return "dynamo", ""
        except Exception:  # noqa: BLE001 - the first error is the one reported
            pass
    if kwargs or external_data:
        raise _ExportFailed({"dynamo": first}) from first
    for stale in Path(path).parent.iterdir():  # anything the failed export left in the private folder
        stale.unlink()
    try:
        _export_torchscript(model, args, path, opset, dynamic, input_names, output_names)
    except Exception as exc:  # noqa: BLE001
        raise _ExportFailed({"dynamo": first, "torchscript": exc}) from first
    return "torchscript", f"the dynamo exporter failed: {_exporter_message(first)}"


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


def _dynamic_axes(dynamic: Sequence[str] | None, dynamic_batch: bool) -> tuple[str, ...]:
    axes = tuple(dict.fromkeys([*(["batch"] if dynamic_batch else []), *(dynamic or ())]))
    unknown = [a for a in axes if a not in DYNAMIC_AXES]
    if unknown:
        raise InvalidOptionError(f"unknown dynamic axis {unknown[0]!r}: the axes that can be dynamic are "
                                 f"{', '.join(DYNAMIC_AXES)}")
    return axes


def _check_inputs(args: tuple, kwargs: dict) -> None:
    bad = [type(v).__name__ for v in (*args, *kwargs.values()) if not isinstance(v, torch.Tensor)]
    if bad:
        raise InvalidOptionError(f"example inputs must be tensors (a tensor, a sequence of tensors, or a dict of "
                                 f"named tensors for keyword inputs); got a {bad[0]}")


def _verify_sizes(args: tuple, kwargs: dict, dynamic: Sequence[str], verify_batches: Sequence[int] | None,
                  verify_sizes: Sequence[tuple[int, int]] | None) -> tuple[Sequence[int], Sequence[tuple[int, int]]]:
    batches = ((1, 7) if verify_batches is None else verify_batches) if "batch" in dynamic else ()
    sizes: Sequence[tuple[int, int]] = ()
    if "height" in dynamic or "width" in dynamic:
        first = next(iter(kwargs.values()), None) if kwargs else (args[0] if args else None)
        if verify_sizes is not None:
            sizes = verify_sizes
        elif first is not None and first.dim() >= 3:
            h, w = (first.shape[-2], first.shape[-1]) if first.dim() >= 4 else (1, first.shape[-1])
            grow_h, grow_w = "height" in dynamic, "width" in dynamic
            sizes = [(h + (h // 2 if grow_h else 0), w + (w // 4 if grow_w else 0))] if first.dim() >= 4 else []
    return batches, sizes


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Inputs,
    *,
    verify: bool = True,
    reference: nn.Module | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    opset: int | None = None,
    dynamic_batch: bool = False,
    dynamic: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    external_data: bool | None = None,
    providers: Sequence[str] | None = None,
    verify_batches: Sequence[int] | None = None,
    verify_sizes: Sequence[tuple[int, int]] | None = None,
    expected_op_counts: dict[str, int] | None = None,
    on_verify: Callable[[], None] | None = None,
    runtime: str = "onnxruntime",
) -> ExportReport:
    """Export ``model`` (eval mode) to ONNX at ``path``, check it and verify it in onnxruntime.

    ``example_inputs``: a tensor, a sequence of tensors (positional inputs) or a dict of named tensors
    (keyword inputs). ``input_names``/``output_names`` name the file's inputs and outputs (the report
    uses the names in the file). ``dynamic`` names the axes left symbolic, any of ``"batch"`` (dim 0),
    ``"height"`` and ``"width"`` (the last two dims); ``dynamic_batch=True`` is ``dynamic=("batch",)``.
    ``external_data``: write the weights into ``NAME.onnx.data`` beside the file; by default only when
    they exceed :data:`EXTERNAL_DATA_BYTES` (a protobuf holds at most 2 GiB). Keep the two files together.

    Verification (:func:`asr_fx.verify_onnx`) compares the outputs of ``runtime`` (``"onnxruntime"``, or
    ``"openvino"`` from the ``openvino`` extra; same tolerances) with ``reference``
    (default: ``model``) in torch on ``example_inputs``, and for dynamic axes also on random inputs of
    each batch size in ``verify_batches`` (default 1 and 7) and each ``(height, width)`` in
    ``verify_sizes`` (default one larger size). ``rtol`` defaults by dtype (1e-4 for float32, 1e-2
    for float16; see :data:`asr_fx.verify.DEFAULT_RTOL`). A bfloat16 or meta-device model is refused
    with :class:`UnsupportedModelError` unless ``verify=False`` (meta always).

    Raises :class:`VerificationError` (``.report``) on disagreement or, with ``expected_op_counts``, a
    different op multiset; :class:`ExportError` when the exporter fails or writes another ``opset``
    than asked for; :class:`OutputPathError` before any work when ``path`` cannot be written. Nothing
    is written at ``path`` on failure. ``model``'s and ``reference``'s train/eval modes are restored.
    """
    path = atomic.check_writable(path, suffix=".onnx")
    args, kwargs = as_args(example_inputs)
    _check_inputs(args, kwargs)
    axes = _dynamic_axes(dynamic, dynamic_batch)
    if verify:
        check_runnable(model)
        if reference is not None:
            check_runnable(reference, "the reference model")
    elif any(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        check_runnable(model)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_BYTES
    with preserved_training_modes(model, reference), atomic.temp_folder(path.parent, "export") as folder:
        model.eval()
        report = ExportReport(str(path), param_count=count_parameters(model),
                              rtol=default_rtol(reference or model) if rtol is None else rtol, atol=atol)
        tmp = folder / path.name
        start = time.perf_counter()
        try:
            report.exporter, report.exporter_note = _export(exportable(model, args), args, kwargs, str(tmp), opset, axes,
                                                            external_data, input_names, output_names)
        except _ExportFailed as exc:
            cause = exc.errors["dynamo"]
            retried = exc.errors.get("torchscript")
            retry = f"; the TorchScript exporter (dynamo=False) failed too: {_exporter_message(retried)}" \
                if retried is not None else ""
            raise ExportError(
                f"torch.onnx.export failed: {_exporter_message(cause)}{retry}. "
                "Try another opset=, fixed shapes (no dynamic= axes), or rewriting data-dependent Python control "
                "flow (torch.export cannot follow it); fuse(..., strict=True) shows a site that stayed unfolded; "
                "the exception's __cause__ holds the exporter's full message", opset=opset) from cause
        report.seconds["export"] = time.perf_counter() - start
        check_opset(tmp, opset)
        onnx.checker.check_model(str(tmp))
        report.op_counts = onnx_op_counts(tmp)
        report.external_data = sorted(p.name for p in folder.iterdir() if p != tmp)
        if verify:
            if on_verify is not None:
                on_verify()
            batches, sizes = _verify_sizes(args, kwargs, axes, verify_batches, verify_sizes)
            verify_onnx(tmp, reference or model, kwargs or args, rtol=report.rtol, atol=atol, providers=providers,
                        batches=batches, sizes=sizes, expected_op_counts=expected_op_counts, report=report,
                        runtime=runtime)
        elif expected_op_counts is not None and report.op_counts != expected_op_counts:
            raise VerificationError("the ONNX op multiset differs from the expected (vanilla) one: "
                                    f"{op_count_diff(expected_op_counts, report.op_counts)}", report)
        report.path = str(path)
        companions = [folder / name for name in report.external_data]
        atomic.publish([*((p, path.parent / p.name) for p in companions), (tmp, path)])
    return report


