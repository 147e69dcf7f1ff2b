"""What ``asr-fx fuse`` and ``asr-fx verify`` found (:class:`CommandSummary`): stage lines, the comparison,
the tables and the ``--json`` object.

The summary holds, per output, the max abs and relative error of onnxruntime against the model as
trained (in torch); the onnxruntime provider; and, with ``--compare``, for the vanilla, instrumented
and fused models their parameter counts, ONNX op counts and onnxruntime latency. Latency is shown
only with its spread (median and 25th-75th percentiles over interleaved runs) beside an A/A control:
a second session of the vanilla file, whose ratio to vanilla is the noise of the measurement.
``to_dict()`` is what ``--json`` prints; ``tables()`` what a terminal shows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tabulate import tabulate
from torch import nn

from asr_fx import onnx_runtime
from asr_fx._util import count_parameters
from asr_fx.cli.options import EXIT_OK, CommandFailed, say
from asr_fx.errors import ASRError, VerificationError
from asr_fx.export import export_onnx
from asr_fx.verify import ExportReport, onnx_op_counts


@contextmanager
def summary_on_failure(summary: CommandSummary) -> Iterator[CommandSummary]:
    """Run a command's steps; an error leaves as :class:`CommandFailed` with ``summary`` (a verification
    error's report becomes the summary's export report when the command had none yet)."""
    try:
        yield summary
    except Exception as exc:  # noqa: BLE001 - every error is the command's result, reported by main
        if isinstance(exc, VerificationError) and exc.report is not None and summary.export is None:
            summary.export = exc.report
        raise CommandFailed(exc, summary) from exc


#: the A/A control: the vanilla file run in a second session
CONTROL = "vanilla (A/A)"
MODEL_ROWS = ("vanilla", CONTROL, "instrumented", "fused")


@dataclass
class ModelRow:
    """One model in the comparison: parameters, ONNX op counts and onnxruntime latency (median, 25th, 75th)."""

    params: int | None = None
    op_counts: dict[str, int] | None = None
    latency_ms: float | None = None
    latency_p25_ms: float | None = None
    latency_p75_ms: float | None = None
    note: str = ""

    @property
    def total_ops(self) -> int | None:
        return sum(self.op_counts.values()) if self.op_counts is not None else None


@dataclass
class CommandSummary:
    """Everything ``asr-fx fuse`` / ``asr-fx verify`` found; ``to_dict()`` is the ``--json`` object."""

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
            "op_counts": None if base.op_counts is None or fused.op_counts is None
            else base.op_counts == fused.op_counts,
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
                       "latency_ms": row.latency_ms, "latency_p25_ms": row.latency_p25_ms,
                       "latency_p75_ms": row.latency_p75_ms, "latency_ratio_to_vanilla": self.ratio(name),
                       "note": row.note}
                for name, row in self.models.items()
            },
            "same_as_vanilla": self.same_as_vanilla(),
            "seconds": self.seconds,
        }

    def tables(self) -> str:
        parts = []
        if self.export and self.export.verified:
            parts.append(self.export.table())
            provider = self.export.provider  # "OpenVINO CPU" with --runtime openvino
            parts.append(f"runtime: {provider}" if provider.startswith("OpenVINO")
                         else f"onnxruntime provider: {provider}")
        if len(self.models) > 1:
            timed = any(row.latency_ms is not None for row in self.models.values())
            rows = []
            for name in MODEL_ROWS:
                row = self.models.get(name)
                if row is None:
                    continue
                ratio = self.ratio(name)
                cells = [name, f"{row.params:,}" if row.params is not None else "n/a",
                         row.total_ops if row.total_ops is not None else "n/a"]
                if timed:
                    cells += [f"{row.latency_ms:.3f} [{row.latency_p25_ms:.3f}, {row.latency_p75_ms:.3f}]"
                              if row.latency_ms is not None else "n/a", f"{ratio:.2f}x" if ratio is not None else "n/a"]
                rows.append((*cells, row.note))
            headers = ["model", "parameters", "ONNX ops"]
            if timed:
                headers += ["latency ms median [25th, 75th]", "vs vanilla"]
            parts.append(tabulate(rows, headers=[*headers, "note"], disable_numparse=True))
            if timed:
                parts.append(f"{CONTROL}: the vanilla file again, in its own session; its distance from 1.00x is "
                             "the noise of this measurement (one thread, runs interleaved)")
            counted = {n: r.op_counts for n, r in self.models.items() if r.op_counts is not None and n != CONTROL}
            names = [n for n in MODEL_ROWS if n in counted]
            ops = sorted({op for counts in counted.values() for op in counts})
            if ops:
                parts.append(tabulate([(op, *(counted[n].get(op, 0) for n in names)) for op in ops],
                                      headers=["ONNX op", *names]))
        return "\n\n".join(parts)


class Stages:
    """Stage lines (``[2/5] trace  input [1, 3, 32, 32]``) on stdout; nothing with -q or --json."""

    def __init__(self, args: argparse.Namespace, summary: CommandSummary, names: Sequence[str]) -> None:
        self.args, self.summary, self.names = args, summary, list(names)
        self.current: str | None = None
        self.started = 0.0

    def start(self, name: str, detail: str = "") -> None:
        self.stop()
        self.current, self.started = name, time.perf_counter()
        say(self.args, f"[{self.names.index(name) + 1}/{len(self.names)}] {name:<7} {detail}".rstrip())

    def stop(self) -> None:
        if self.current is not None:
            self.summary.seconds[self.current] = round(time.perf_counter() - self.started, 3)
        self.current = None


def export_for_comparison(model: nn.Module, path: str, x: torch.Tensor, opset: int | None) -> ModelRow:
    """Export ``model`` without verification, for its op counts (a failure is a note, not an error)."""
    row = ModelRow(params=count_parameters(model))
    try:
        export_onnx(model, path, x, verify=False, opset=opset)
        row.op_counts = onnx_op_counts(path)
    except ASRError as exc:
        row.note = f"export failed: {str(exc).splitlines()[0][:80]}"
    return row


def compare_models(models: dict[str, nn.Module | None], x: torch.Tensor, workdir: str | os.PathLike,
                   opset: int | None = None) -> dict[str, ModelRow]:
    """Export each model (``None``: unknown, reported as such) into ``workdir`` for op counts."""
    rows = {}
    for name, model in models.items():
        if model is None:
            rows[name] = ModelRow(note="not known for this checkpoint")
        else:
            rows[name] = export_for_comparison(model, os.path.join(workdir, f"{name}.onnx"), x, opset)
    return rows


def measure_latency(rows: dict[str, ModelRow], paths: dict[str, str | os.PathLike], x: torch.Tensor,
                    runs: int = 20) -> None:
    """Fill the latency of every row with an ONNX file, and add the A/A control row (a second session of
    the vanilla file), through :func:`asr_fx.onnx_runtime.latency_ms`: one thread per session, the
    sessions take turns run by run (a busy machine slows them alike), 3 warm-up runs not counted."""
    files = {name: str(path) for name, path in paths.items() if name in rows and os.path.isfile(path)}
    if "vanilla" in files:
        rows[CONTROL] = ModelRow(params=rows["vanilla"].params, op_counts=rows["vanilla"].op_counts,
                                 note="A/A control")
        files = {"vanilla": files["vanilla"], CONTROL: files["vanilla"], **files}
    samples = onnx_runtime.latency_ms(files, (x,), runs=runs, warmup=3, threads=1)
    for name, values in samples.items():
        p25, median, p75 = np.percentile(np.array(values), [25, 50, 75])
        row = rows[name]
        row.latency_ms, row.latency_p25_ms, row.latency_p75_ms = float(median), float(p25), float(p75)


def finish(args: argparse.Namespace, summary: CommandSummary) -> int:
    """Print the summary: JSON with --json, tables otherwise, nothing with -q."""
    if args.json:
        print(json.dumps({"ok": True, "exit_code": EXIT_OK, **summary.to_dict()}, indent=2))
        return EXIT_OK
    tables = summary.tables()
    if tables:
        say(args, "\n" + tables + "\n")
    if summary.command == "fuse":
        verified = summary.export is not None and summary.export.verified
        say(args, f"wrote {summary.output}" + ("" if verified else " (not verified: --no-verify)"))
    else:
        say(args, f"{summary.output} agrees with {summary.checkpoint}")
    return EXIT_OK
