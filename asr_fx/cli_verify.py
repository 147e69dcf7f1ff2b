"""The verification report of ``asr-fx fuse`` and ``asr-fx verify``, and the ``verify`` command.

The report holds, per output, the max abs and relative error of onnxruntime against the model as
trained (in torch); the onnxruntime provider; for the fused, vanilla and instrumented models their
parameter counts, ONNX op counts and onnxruntime latency (median of several runs, one thread) as a
ratio to the vanilla model's. ``to_dict()`` is what ``--json`` prints; ``tables()`` what a terminal shows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from asr_fx.errors import ASRError, DifferentModelError, VerificationError
from asr_fx.export import ExportReport, export_onnx, onnx_op_counts, op_count_diff
from asr_fx.verify import verify_onnx

MODEL_ROWS = ("vanilla", "instrumented", "fused")


@dataclass
class ModelRow:
    """One model in the comparison: parameters, ONNX op counts and onnxruntime latency."""

    params: int | None = None
    op_counts: dict[str, int] | None = None
    latency_ms: float | None = None
    note: str = ""

    @property
    def total_ops(self) -> int | None:
        return sum(self.op_counts.values()) if self.op_counts is not None else None


@dataclass
class VerificationSummary:
    """Everything ``asr-fx fuse`` / ``asr-fx verify`` found; ``to_dict()`` is the ``--json`` report."""

    command: str
    checkpoint: str
    checkpoint_format: str = ""
    notes: list[str] = field(default_factory=list)
    output: str | None = None
    input_shape: list[int] | None = None
    device: str = "cpu"
    export: ExportReport | None = None
    fusion: dict | None = None
    models: dict[str, ModelRow] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rtol: float | None = None
    atol: float | None = None

    def ratio(self, name: str) -> float | None:
        base, row = self.models.get("vanilla"), self.models.get(name)
        if not base or not row or not base.latency_ms or row.latency_ms is None:
            return None
        return row.latency_ms / base.latency_ms

    def same_as_vanilla(self) -> dict[str, bool | None]:
        base, fused = self.models.get("vanilla"), self.models.get("fused")
        if not base or not fused:
            return {"op_counts": None, "params": None}
        return {
            "op_counts": None if base.op_counts is None or fused.op_counts is None else base.op_counts == fused.op_counts,
            "params": None if base.params is None or fused.params is None else base.params == fused.params,
        }

    def to_dict(self) -> dict[str, Any]:
        export = self.export.to_dict() if self.export else None
        return {
            "command": self.command,
            "checkpoint": {"path": self.checkpoint, "format": self.checkpoint_format, "notes": self.notes},
            "output": self.output,
            "input_shape": self.input_shape,
            "device": self.device,
            "provider": export["provider"] if export else None,
            "verified": bool(export and export["verified"]),
            "outputs": export["outputs"] if export else [],
            "rtol": export["rtol"] if export else self.rtol,
            "atol": export["atol"] if export else self.atol,
            "fusion": self.fusion,
            "models": {
                name: {"params": row.params, "op_counts": row.op_counts, "total_ops": row.total_ops,
                       "latency_ms": row.latency_ms, "latency_ratio_to_vanilla": self.ratio(name), "note": row.note}
                for name, row in self.models.items()
            },
            "same_as_vanilla": self.same_as_vanilla(),
            "seconds": self.seconds,
        }

    def tables(self) -> str:
        parts = []
        if self.export and self.export.verified:
            parts.append(self.export.table())
            parts.append(f"onnxruntime provider: {self.export.provider}")
        if len(self.models) > 1:
            rows = []
            for name in MODEL_ROWS:
                row = self.models.get(name)
                if row is None:
                    continue
                ratio = self.ratio(name)
                rows.append((name, f"{row.params:,}" if row.params is not None else "n/a",
                             row.total_ops if row.total_ops is not None else "n/a",
                             f"{row.latency_ms:.3f}" if row.latency_ms is not None else "n/a",
                             f"{ratio:.2f}x" if ratio is not None else "n/a", row.note))
            parts.append(tabulate(rows, headers=["model", "parameters", "ONNX ops", "latency ms (median)",
                                                 "vs vanilla", "note"]))
            counted = {n: r.op_counts for n, r in self.models.items() if r.op_counts is not None}
            names = [n for n in MODEL_ROWS if n in counted]
            ops = sorted({op for counts in counted.values() for op in counts})
            if ops:
                parts.append(tabulate([(op, *(counted[n].get(op, 0) for n in names)) for op in ops],
                                      headers=["ONNX op", *names]))
        return "\n\n".join(parts)


def _export_for_comparison(model: nn.Module, path: str, x: torch.Tensor, opset: int | None,
                           dynamic_batch: bool = False) -> ModelRow:
    row = ModelRow(params=sum(p.numel() for p in model.parameters()))
    try:
        export_onnx(model, path, x, verify=False, opset=opset, dynamic_batch=dynamic_batch)
        row.op_counts = onnx_op_counts(path)
    except ASRError as exc:
        row.note = f"export failed: {str(exc).splitlines()[0][:80]}"
    return row


def compare_models(models: dict[str, nn.Module | None], x: torch.Tensor, workdir: str,
                   opset: int | None = None, dynamic_batch: bool = False) -> dict[str, ModelRow]:
    """Export each model (``None``: unknown, reported as such) into ``workdir`` for op counts."""
    rows = {}
    for name, model in models.items():
        if model is None:
            rows[name] = ModelRow(note="not known for this checkpoint")
        else:
            rows[name] = _export_for_comparison(model, os.path.join(workdir, f"{name}.onnx"), x, opset, dynamic_batch)
    return rows


def measure_latency(rows: dict[str, ModelRow], paths: dict[str, str], x: torch.Tensor, runs: int = 20) -> None:
    """Fill ``latency_ms``: the median of ``runs`` onnxruntime runs (one thread) for every row with
    an ONNX file. The models take turns run by run, so a busy machine slows them alike."""
    import time

    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        if name in rows and os.path.isfile(path):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            sessions[name] = (session, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(runs + 3):
        for name, (session, feeds) in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            if step >= 3:  # warm-up runs are not counted
                times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        rows[name].latency_ms = float(np.median(values) * 1e3)


def onnx_input_shape(path: str | os.PathLike) -> tuple[list[int | str], str]:
    """The first input's shape (symbolic dims as strings) and element type of an ONNX file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise ASRError(f"{str(path)!r} is not a readable ONNX model: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not proto.graph.input:
        raise ASRError(f"{str(path)!r} has no graph inputs")
    tensor_type = proto.graph.input[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return dims, onnx.TensorProto.DataType.Name(tensor_type.elem_type)


def run_verify(args: argparse.Namespace) -> int:
    """``asr-fx verify OUT.onnx --against CKPT``: re-check an existing export against its checkpoint."""
    from asr_fx import cli, cli_fuse

    onnx_path: Path = args.onnx
    if not onnx_path.is_file():
        raise ASRError(f"ONNX file {str(onnx_path)!r} does not exist")
    summary = VerificationSummary("verify", str(args.against), output=str(onnx_path), device=args.device,
                                  rtol=args.rtol, atol=args.atol)
    args.summary = summary
    cli_fuse.check_opset_option(args)
    stages = cli_fuse.Stages(args, ("load", "trace", "export", "verify"))
    dims, _ = onnx_input_shape(onnx_path)
    stages.start("load", f"{args.against}")
    loaded = cli_fuse.load_from_args(args, args.against)
    summary.checkpoint_format, summary.notes = loaded.kind, loaded.notes
    dynamic = bool(dims) and not isinstance(dims[0], int)
    static = [d for d in dims if isinstance(d, int)] if not dynamic else None
    shape = args.input_shape or (dims if static and len(static) == len(dims) else None) or loaded.input_shape
    if dynamic and shape is None and all(isinstance(d, int) for d in dims[1:]):
        shape = [1, *dims[1:]]
    if not shape:
        raise ASRError("no input shape: the ONNX input, the checkpoint and the model do not give one; "
                       "pass --input-shape, e.g. 1,3,224,224")
    stages.start("trace", f"input {list(shape)}")
    model, x = cli_fuse.prepare_model(args, loaded, shape)
    summary.input_shape = list(shape)
    stages.start("export", "vanilla and instrumented models, for comparison" if not args.no_compare else "skipped")
    with tempfile.TemporaryDirectory(prefix="asr-fx-verify-") as workdir:
        if not args.no_compare:
            summary.models = compare_models({"vanilla": loaded.vanilla, "instrumented": model}, x, workdir,
                                            dynamic_batch=dynamic)
        elif args.strict:  # --strict's op check needs the vanilla model's ops even without the comparison
            summary.models = compare_models({"vanilla": loaded.vanilla}, x, workdir, dynamic_batch=dynamic)
        stages.start("verify", f"{onnx_path} in onnxruntime")
        try:
            report = verify_onnx(onnx_path, model, (x,), rtol=args.rtol, atol=args.atol,
                                 batches=(1, 7) if dynamic else ())
        except DifferentModelError:
            raise
        except VerificationError as exc:  # disagreement: reported with the summary below
            if exc.report is None:
                raise
            report = exc.report
        except ASRError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are long; keep the first line
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise ASRError(f"onnxruntime cannot run {str(onnx_path)!r} on an input of shape {list(shape)} "
                           f"(its input is {dims}): {first}; pass --input-shape to match") from exc
        summary.export = report
        if summary.models:
            summary.models["fused"] = ModelRow(op_counts=report.op_counts, note="the file verified")
        if not args.no_compare:
            measure_latency(summary.models, {"vanilla": f"{workdir}/vanilla.onnx",
                                             "instrumented": f"{workdir}/instrumented.onnx", "fused": str(onnx_path)},
                            x.cpu(), runs=args.runs)
    if not report.ok:
        raise VerificationError(f"{onnx_path} disagrees with {args.against} beyond atol={args.atol:g} + "
                                f"rtol={args.rtol:g} * max|ref|:\n{report.table()}", report)
    same = summary.same_as_vanilla()
    if args.strict and same["op_counts"] is None:
        vanilla_row = summary.models.get("vanilla")
        why = vanilla_row.note if vanilla_row is not None and vanilla_row.note else "no vanilla model"
        raise ASRError(f"--strict: cannot compare the op multiset with the vanilla model's ({why}); "
                       "pass --model and --factory-args for a checkpoint that does not name its factory")
    if args.strict and same["op_counts"] is False:
        raise VerificationError("--strict: the ONNX op multiset differs from the vanilla model's: "
                                f"{op_count_diff(summary.models['vanilla'].op_counts, report.op_counts)}", report)
    stages.stop()
    cli_fuse.finish(args, summary)
    return cli.EXIT_OK
