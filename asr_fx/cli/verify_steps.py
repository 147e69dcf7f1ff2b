"""The work of ``asr-fx verify`` (imports torch): load the checkpoint, check the ONNX file with
:func:`asr_fx.verify_onnx` in onnxruntime or OpenVINO (``--runtime``; a different model is said to be
one), report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from asr_fx.atomic import temp_folder
from asr_fx.cli import source
from asr_fx.cli.summary import (
    CommandSummary,
    ModelRow,
    Stages,
    compare_models,
    finish,
    measure_latency,
    summary_on_failure,
)
from asr_fx.errors import (
    ASRError,
    CheckpointError,
    DifferentModelError,
    ExportError,
    OnnxFileError,
    VerificationError,
)
from asr_fx.testing import compare_with_vanilla
from asr_fx.verify import ExportReport, onnx_inputs, verify_onnx


def onnx_input_shape(path: str | Path) -> list[int | str]:
    """The first input's shape of an ONNX file (symbolic dims as their names)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's errors vary by version; the file is not ONNX
        raise OnnxFileError(f"{str(path)!r} is not a readable ONNX model: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}", path=str(path)) from exc
    inputs = onnx_inputs(proto)
    if not inputs:
        raise OnnxFileError(f"{str(path)!r} has no graph inputs", path=str(path))
    return inputs[0][1]


def other_sizes(dims: Sequence[int | str], shape: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    """``(batches, sizes)`` to verify a file at besides ``shape``: batch 1 and 7 when its batch is symbolic;
    a larger height and/or width (1.5x, 1.25x) when those are."""
    batches = tuple(b for b in (1, 7) if b != shape[0]) if dims and not isinstance(dims[0], int) else ()
    sizes = []
    if len(dims) >= 4 and not (isinstance(dims[-2], int) and isinstance(dims[-1], int)):
        height, width = shape[-2], shape[-1]
        sizes.append((height if isinstance(dims[-2], int) else height + height // 2,
                      width if isinstance(dims[-1], int) else width + width // 4))
    return batches, sizes


def verify(args: argparse.Namespace) -> int:
    """Load ``--against``, run ``OUT.onnx`` in onnxruntime or OpenVINO, compare; exit 1 when they disagree."""
    onnx_path: Path = args.onnx
    if not onnx_path.is_file():
        raise OnnxFileError(f"ONNX file {str(onnx_path)!r} does not exist", path=str(onnx_path))
    source.check_opset_option(args.opset)
    source.torch_device(args.device)
    summary = CommandSummary("verify", str(args.against), output=str(onnx_path), device=args.device,
                             rtol=args.rtol, atol=args.atol)
    with summary_on_failure(summary):
        verify_steps(args, summary)
    return finish(args, summary)


def verify_steps(args: argparse.Namespace, summary: CommandSummary) -> None:
    """The stages of :func:`verify`, filling ``summary``."""
    onnx_path: Path = args.onnx
    stages = Stages(args, summary, ("load", "trace", "export", "verify"))
    dims = onnx_input_shape(onnx_path)
    stages.start("load", f"{args.against}")
    loaded = source.load_from_args(args, args.against)
    summary.checkpoint_format, summary.notes = loaded.kind, loaded.notes
    fixed = [d for d in dims if isinstance(d, int)]
    shape: list[int] | None = args.input_shape or (fixed if len(fixed) == len(dims) else None)
    if shape is None:
        try:
            shape = source.input_shape_for(args, loaded)
        except ASRError:
            if len(fixed) < len(dims) - 1 or isinstance(dims[0], int):  # more than the batch is symbolic
                raise
            shape = [1, *fixed]  # only the batch is symbolic
    shape = list(shape)
    stages.start("trace", f"input {shape}")
    model, x = source.prepare_model(args, loaded, shape)
    summary.input_shape = shape
    stages.start("export", "vanilla and instrumented models, for comparison" if args.compare else "skipped")
    with temp_folder(name="verify") as workdir:
        if args.compare:
            summary.models = compare_models({"vanilla": loaded.vanilla, "instrumented": model}, x, workdir)
        elif args.strict:  # --strict's op check needs the vanilla model's ops even without the comparison
            summary.models = compare_models({"vanilla": loaded.vanilla}, x, workdir)
        stages.start("verify", f"{onnx_path} in {args.runtime}")
        batches, sizes = other_sizes(dims, shape)
        report = ExportReport(str(onnx_path))
        summary.export = report
        try:
            verify_onnx(onnx_path, model, x, rtol=args.rtol, atol=args.atol, batches=batches, sizes=sizes,
                        report=report, runtime=args.runtime)
        except DifferentModelError:
            raise
        except VerificationError as exc:
            raise VerificationError(f"{onnx_path} disagrees with {args.against}: {exc}", exc.report) from exc
        if summary.models:
            summary.models["fused"] = ModelRow(op_counts=report.op_counts, note="the file verified")
        if args.compare:
            measure_latency(summary.models, {"vanilla": workdir / "vanilla.onnx",
                                             "instrumented": workdir / "instrumented.onnx", "fused": onnx_path},
                            x.cpu(), runs=args.runs)
    if args.strict:
        check_strict(args, loaded.vanilla, x, summary, report)
    stages.stop()


def check_strict(args: argparse.Namespace, vanilla: nn.Module | None, x: torch.Tensor, summary: CommandSummary,
                 report: ExportReport) -> None:
    """``--strict``: the file's op multiset is the vanilla model's (:func:`asr_fx.testing.compare_with_vanilla`)."""
    if vanilla is None:
        raise CheckpointError("--strict: cannot compare the op multiset with the vanilla model's (no vanilla model "
                              "is known): pass --model and --factory-args for a checkpoint that does not name its "
                              "factory", reason="no-factory")
    row = summary.models.get("vanilla")
    versus = compare_with_vanilla(vanilla, (x,), onnx_file=args.onnx, opset=args.opset,
                                  vanilla_op_counts=row.op_counts if row is not None else None)
    if versus.vanilla_op_counts is None:
        raise ExportError(f"--strict: cannot compare the op multiset with the vanilla model's "
                          f"({versus.vanilla_note or (row.note if row is not None else '')})", opset=args.opset)
    if versus.same_op_counts is False:
        raise VerificationError(f"--strict: {versus.problems()[0]}", report)
