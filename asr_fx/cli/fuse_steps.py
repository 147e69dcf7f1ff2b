"""The work of ``asr-fx fuse`` (imports torch): load, trace, fuse, export, verify, report."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

import asr_fx
from asr_fx.atomic import temp_folder
from asr_fx.cli import source
from asr_fx.cli.options import say
from asr_fx.cli.summary import (
    CommandSummary,
    ModelRow,
    Stages,
    compare_models,
    finish,
    measure_latency,
    summary_on_failure,
)
from asr_fx.errors import CheckpointError, FusionError
from asr_fx.foreign_checkpoints import LoadedCheckpoint
from asr_fx.into_vanilla import fuse_into
from asr_fx.testing import compare_with_vanilla
from asr_fx.verify import flatten_outputs


def default_output_names(count: int) -> list[str]:
    """``output0``, ``output1``, ...: what the file calls the outputs when ``--output-names`` is not given."""
    return [f"output{i}" for i in range(count)]


def vanilla_into(args: argparse.Namespace, loaded: LoadedCheckpoint, model: nn.Module, fused: nn.Module,
                 x: torch.Tensor) -> nn.Module:
    """For ``--state-dict-out``: a fresh copy of the factory's vanilla model holding the fused weights
    (:func:`asr_fx.into_vanilla.fuse_into`, which refuses with the site's name where one has no place)."""
    if loaded.vanilla is None:
        raise CheckpointError("--state-dict-out writes the weights of the vanilla model, and this checkpoint names no "
                              "factory that builds it: pass --model package.module:factory (and --factory-args)",
                              reason="no-factory")
    return fuse_into(fused, copy.deepcopy(loaded.vanilla), model, example_inputs=(x,), leaf_modules=args.leaf_modules)


def fuse(args: argparse.Namespace) -> int:
    """Load CKPT, fuse, export OUT verified; every cheap check runs before the checkpoint is loaded."""
    source.check_opset_option(args.opset)
    source.torch_device(args.device)
    summary = CommandSummary("fuse", str(args.checkpoint), output=str(args.output), device=args.device,
                             rtol=args.rtol, atol=args.atol)
    with summary_on_failure(summary):
        into = fuse_steps(args, summary)
        if into is not None:
            asr_fx.save_vanilla_state_dict(into, args.state_dict_out)
            summary.notes.append(f"wrote the vanilla-format state_dict {args.state_dict_out}")
            say(args, f"wrote {args.state_dict_out} (state_dict of {type(into).__name__}, checked against the "
                "fused model)")
    return finish(args, summary)


def fuse_steps(args: argparse.Namespace, summary: CommandSummary) -> nn.Module | None:
    """The stages of :func:`fuse`, filling ``summary``; returns the vanilla model holding the fused weights
    for ``--state-dict-out`` (else None)."""
    out: Path = args.output
    stages = Stages(args, summary, ("load", "trace", "fuse", "export", "verify"))
    stages.start("load", str(args.checkpoint))
    loaded = source.load_from_args(args, args.checkpoint)
    summary.checkpoint_format, summary.notes = loaded.kind, loaded.notes
    say(args, f"        format: {loaded.kind}" + "".join(f"; {n}" for n in loaded.notes))
    shape = source.input_shape_for(args, loaded)
    summary.input_shape = shape
    stages.start("trace", f"input {shape}")
    model, x = source.prepare_model(args, loaded, shape)
    stages.start("fuse")
    fused = asr_fx.fuse(model, strict=args.strict, fold_bn=args.fold_bn, example_inputs=(x,),
                        leaf_modules=args.leaf_modules)
    fusion = asr_fx.fusion_report(fused)
    summary.fusion = fusion.to_dict() if fusion else None
    say(args, f"        folded {len(fusion.folded) if fusion else 0} scale(s): {fusion.summary() if fusion else {}}")
    into = vanilla_into(args, loaded, model, fused, x) if args.state_dict_out is not None else None
    # the vanilla model (with --fold-bn: with BN folded too, like with like) and the fused one's size
    versus = compare_with_vanilla(loaded.vanilla, (x,), fused=fused, fold_bn=args.fold_bn,
                                  leaf_modules=args.leaf_modules) if loaded.vanilla is not None else None
    vanilla = versus.reference if versus is not None else None
    if args.strict and versus is None:
        summary.notes.append("--strict: no vanilla model is known for this checkpoint, so only the folding of "
                             "every site was checked (pass --model to compare parameters and ops)")
        say(args, f"        {summary.notes[-1]}")
    if args.strict and versus is not None and versus.same_params is False:
        raise FusionError(f"--strict: {versus.problems()[0]}", fusion)
    with torch.no_grad():
        n_outputs = len(flatten_outputs(fused(x)))
    source.check_name_counts(args.input_names, args.output_names, 1, n_outputs)
    compare = args.compare and not args.no_verify
    stages.start("export", f"{out}" + (" (and the vanilla and instrumented models, for comparison)" if compare else ""))
    with temp_folder(name="fuse") as workdir:
        if compare:
            summary.models = compare_models({"vanilla": vanilla, "instrumented": model}, x, workdir, args.opset)
        elif args.strict and vanilla is not None:  # --strict's op check needs the vanilla model's ops
            summary.models = compare_models({"vanilla": vanilla}, x, workdir, args.opset)
        vanilla_row = summary.models.get("vanilla")
        if args.strict and vanilla_row is not None and vanilla_row.op_counts is None:
            raise FusionError(f"--strict: the vanilla model did not export, so its ONNX ops cannot be compared "
                              f"({vanilla_row.note})", fusion)
        if args.fold_bn and vanilla_row is not None:
            vanilla_row.note = ("BN folded too (--fold-bn); " + vanilla_row.note).strip("; ")
        summary.models.setdefault("fused", ModelRow())
        summary.models["fused"].params = asr_fx.count_parameters(fused)
        report = asr_fx.export_onnx(
            fused, out, x, reference=model, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
            opset=args.opset, dynamic=args.dynamic_shape or (), input_names=args.input_names,
            output_names=args.output_names or default_output_names(n_outputs),
            expected_op_counts=vanilla_row.op_counts if args.strict and vanilla_row is not None else None,
            runtime=args.runtime,
            on_verify=lambda: stages.start("verify", f"in {args.runtime} against the unfused model in torch"))
        summary.export = report
        summary.models["fused"].op_counts = report.op_counts
        if compare:
            measure_latency(summary.models, {"vanilla": workdir / "vanilla.onnx",
                                             "instrumented": workdir / "instrumented.onnx", "fused": out},
                            x.cpu(), runs=args.runs)
    stages.stop()
    return into
