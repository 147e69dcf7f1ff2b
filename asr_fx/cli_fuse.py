"""``asr-fx fuse``: load a checkpoint, fuse, export ONNX, verify; the steps ``verify`` shares.

Split from :mod:`asr_fx.cli`, which builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asr_fx.cli import EXIT_OK, _say


class Stages:
    """Stage lines (``[2/5] trace  input [1, 3, 32, 32]``) on stdout; nothing with -q or --json."""

    def __init__(self, args: argparse.Namespace, names: Sequence[str]) -> None:
        self.args, self.names = args, list(names)
        self.current: str | None = None
        self.started = 0.0
        self.seconds: dict[str, float] = {}

    def start(self, name: str, detail: str = "") -> None:
        self.stop()
        self.current, self.started = name, time.perf_counter()
        _say(self.args, f"[{self.names.index(name) + 1}/{len(self.names)}] {name:<7} {detail}".rstrip())

    def stop(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = round(time.perf_counter() - self.started, 3)
            summary = getattr(self.args, "summary", None)
            if summary is not None:
                summary.seconds = dict(self.seconds)
        self.current = None


def load_from_args(args: argparse.Namespace, path: Path):
    """:func:`asr_fx.checkpoint.load_checkpoint` with the CLI's checkpoint and ASR options."""
    from asr_fx.checkpoint import load_checkpoint

    options = {"attention": args.attention, "attention_kwargs": args.attention_args, "rule": args.rule,
               "sites": args.sites, "delta": args.delta, "activation": args.activation}
    return load_checkpoint(path, factory=args.model, factory_kwargs=args.factory_args, asr_options=options,
                           trust=args.trust_checkpoint, input_shape=args.input_shape, leaf_modules=args.leaf_modules)


def _torch_device(name: str):
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _usage(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise _usage(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def _usage(message: str) -> Exception:
    from asr_fx.errors import ASRError

    return ASRError(message)


def check_opset_option(args: argparse.Namespace) -> None:
    """Refuse an ``--opset`` no exporter writes, before any work (one older than 18 is tried: torch's
    exporter converts down when it can, and :func:`asr_fx.export.check_opset` refuses the file when not)."""
    import onnx

    if args.opset is not None and not 7 <= args.opset <= onnx.defs.onnx_opset_version():
        raise _usage(f"--opset {args.opset}: ONNX opsets go from 7 to {onnx.defs.onnx_opset_version()} (the installed "
                     "onnx's newest); torch's exporter writes 18 and newer, older ones where it can convert the model")


def check_leaf_modules(model: Any, names: Sequence[str] | None) -> None:
    """Refuse ``--leaf-modules`` names that are not module paths of ``model``."""
    import difflib

    if not names:
        return
    paths = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in names if n not in paths]
    if unknown:
        hints = "".join(f"; {n!r}: did you mean {m[0]!r}?" for n in unknown
                        if (m := difflib.get_close_matches(n, paths, n=1)))
        raise _usage(f"--leaf-modules: {', '.join(repr(n) for n in unknown)} match(es) no module of the model "
                     f"(give module paths as named by model.named_modules(), such as {paths[0]!r}){hints}")


def prepare_model(args: argparse.Namespace, loaded: Any, shape: Sequence[int]):
    """Move the model to ``--device``, check it traces and runs on an input of ``shape``; ``(model, x)``."""
    import torch

    from asr_fx.passes import trace

    device = _torch_device(args.device)
    model = loaded.model.to(device).eval()
    if loaded.vanilla is not None:
        loaded.vanilla.to(device)
    check_leaf_modules(model, args.leaf_modules)
    trace(model, args.leaf_modules)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise _usage(f"the model does not run on an input of shape {list(shape)}: {type(exc).__name__}: {first}; "
                     "pass the shape it expects with --input-shape") from exc
    return model, x


def finish(args: argparse.Namespace, summary: Any) -> None:
    """Print the report: JSON with --json, tables otherwise, nothing with -q."""
    if args.json:
        print(json.dumps({"ok": True, "exit_code": EXIT_OK, **summary.to_dict()}, indent=2))
        return
    tables = summary.tables()
    if tables:
        _say(args, "\n" + tables + "\n")
    if summary.command == "fuse":
        verified = summary.export is not None and summary.export.verified
        _say(args, f"wrote {summary.output}" + ("" if verified else " (not verified: --no-verify)"))
    else:
        _say(args, f"{summary.output} agrees with {summary.checkpoint}")


def check_state_dict_out(args: argparse.Namespace) -> None:
    """Refuse a ``--state-dict-out`` path that cannot be written, before any work."""
    from asr_fx.errors import ASRError

    path: Path | None = getattr(args, "state_dict_out", None)
    if path is None:
        return
    if path.is_dir():
        raise ASRError(f"--state-dict-out {str(path)!r} is a folder: name the file to write, e.g. {path / 'vanilla.pt'}")
    if not path.parent.is_dir():
        raise ASRError(f"the folder {str(path.parent)!r} of --state-dict-out {str(path)!r} does not exist: create it first")
    if path.resolve() in (args.checkpoint.resolve(), args.output.resolve()):
        raise ASRError(f"--state-dict-out {str(path)!r} would overwrite the checkpoint or the ONNX output: name another file")


def vanilla_into(args: argparse.Namespace, loaded: Any, model: Any, fused: Any, x: Any) -> Any:
    """For ``--state-dict-out``: a fresh copy of the factory's vanilla model holding the fused weights
    (:func:`asr_fx.into_vanilla.fuse_into`, which refuses with the site's name where one has no place)."""
    import copy

    from asr_fx.api import get_config
    from asr_fx.errors import ASRError
    from asr_fx.into_vanilla import fuse_into

    if loaded.vanilla is None:
        raise ASRError("--state-dict-out writes the weights of the vanilla model, and this checkpoint names no factory "
                       "that builds it: pass --model package.module:factory (and --factory-args)")
    return fuse_into(fused, copy.deepcopy(loaded.vanilla), model, example_inputs=(x,), config=get_config(model),
                     leaf_modules=args.leaf_modules)


def run_fuse(args: argparse.Namespace) -> int:
    import tempfile

    import asr_fx
    from asr_fx.cli_verify import ModelRow, VerificationSummary, compare_models, measure_latency
    from asr_fx.errors import ASRError, FusionError

    out: Path = args.output
    if out.is_dir():
        raise ASRError(f"the output {str(out)!r} is a folder: name the .onnx file to write, e.g. -o {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":
        raise ASRError(f"the output {str(out)!r} should end in .onnx")
    if out.resolve() == args.checkpoint.resolve():
        raise ASRError(f"refusing to write the ONNX model over the input checkpoint {str(args.checkpoint)!r}")
    if not out.parent.is_dir():
        raise ASRError(f"the output folder {str(out.parent)!r} (of -o {str(out)!r}) does not exist: create it first")
    check_opset_option(args)
    check_state_dict_out(args)
    _torch_device(args.device)
    summary = VerificationSummary("fuse", str(args.checkpoint), output=str(out), device=args.device,
                                  rtol=args.rtol, atol=args.atol)
    args.summary = summary
    stages = Stages(args, ("load", "trace", "fuse", "export", "verify"))
    stages.start("load", str(args.checkpoint))
    loaded = load_from_args(args, args.checkpoint)
    summary.checkpoint_format, summary.notes = loaded.kind, loaded.notes
    _say(args, f"        format: {loaded.kind}" + "".join(f"; {n}" for n in loaded.notes))
    shape = args.input_shape or loaded.input_shape
    if not shape:
        raise ASRError("the checkpoint records no input shape: pass --input-shape, e.g. 1,3,224,224")
    summary.input_shape = list(shape)
    stages.start("trace", f"input {list(shape)}")
    model, x = prepare_model(args, loaded, shape)
    stages.start("fuse")
    fused = asr_fx.fuse(model, strict=args.strict, fold_bn=args.fold_bn, example_inputs=(x,),
                        leaf_modules=args.leaf_modules)
    fusion = asr_fx.fusion_report(fused)
    summary.fusion = fusion.to_dict() if fusion else None
    _say(args, f"        folded {len(fusion.folded) if fusion else 0} scale(s): {fusion.summary() if fusion else {}}")
    into = vanilla_into(args, loaded, model, fused, x) if args.state_dict_out is not None else None
    vanilla = loaded.vanilla
    if args.fold_bn and vanilla is not None:  # compare like with like: the vanilla model with BN folded too
        vanilla = asr_fx.fuse(vanilla.eval(), fold_bn=True, example_inputs=(x,), leaf_modules=args.leaf_modules)
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("vanilla", vanilla), ("instrumented", model), ("fused", fused)) if m is not None}
    if args.strict and vanilla is None:
        summary.notes.append("--strict: no vanilla model is known for this checkpoint, so only the folding of "
                             "every site was checked (pass --model to compare parameters and ops)")
        _say(args, f"        {summary.notes[-1]}")
    if args.strict and "vanilla" in n_params and n_params["fused"] != n_params["vanilla"]:
        raise FusionError(f"--strict: the fused model has {n_params['fused']:,} parameters, the vanilla model"
                          f"{' (BN folded)' if args.fold_bn else ''} {n_params['vanilla']:,}")
    compare = not (args.no_verify or args.no_compare)
    stages.start("export", f"{out}" + (" (and the vanilla and instrumented models, for comparison)" if compare else ""))
    with tempfile.TemporaryDirectory(prefix="asr-fx-fuse-") as workdir:
        if compare:
            summary.models = compare_models({"vanilla": vanilla, "instrumented": model}, x, workdir, args.opset,
                                            args.dynamic_batch)
        elif args.strict and vanilla is not None:  # --strict's op check needs the vanilla model's ops
            summary.models = compare_models({"vanilla": vanilla}, x, workdir, args.opset, args.dynamic_batch)
        if args.strict and "vanilla" in summary.models and summary.models["vanilla"].op_counts is None:
            raise FusionError(f"--strict: the vanilla model did not export, so its ONNX ops cannot be compared "
                              f"({summary.models['vanilla'].note})")
        if args.fold_bn and "vanilla" in summary.models:
            summary.models["vanilla"].note = ("BN folded too (--fold-bn); " + summary.models["vanilla"].note).strip("; ")
        vanilla_ops = summary.models["vanilla"].op_counts if "vanilla" in summary.models else None
        summary.models.setdefault("fused", ModelRow())
        summary.models["fused"].params = n_params["fused"]
        report = asr_fx.export_onnx(
            fused, out, x, reference=model, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
            opset=args.opset, dynamic_batch=args.dynamic_batch,
            expected_op_counts=vanilla_ops if args.strict else None,
            on_verify=lambda: stages.start("verify", "in onnxruntime against the unfused model in torch"))
        summary.export = report
        summary.models["fused"].op_counts = report.op_counts
        if compare:
            measure_latency(summary.models, {"vanilla": f"{workdir}/vanilla.onnx",
                                             "instrumented": f"{workdir}/instrumented.onnx", "fused": str(out)},
                            x.cpu(), runs=args.runs)
    stages.stop()
    if into is not None:
        asr_fx.save_vanilla_state_dict(into, args.state_dict_out)
        summary.notes.append(f"wrote the vanilla-format state_dict {args.state_dict_out}")
        _say(args, f"wrote {args.state_dict_out} (state_dict of {type(into).__name__}, checked against the fused model)")
    finish(args, summary)
    return EXIT_OK
