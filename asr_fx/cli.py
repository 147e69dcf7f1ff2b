"""The ``asr-fx`` command line: ``demo``, ``fuse``, ``verify`` (and subcommands other modules register).

Exit codes: 0 success; 1 verification failed (onnxruntime disagrees with torch, or --strict found
an unfolded site or a difference from the vanilla model); 2 usage or input error (bad arguments,
missing or unreadable checkpoint, keys that do not fit, untraceable model, exporter failure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2

EPILOG = ("exit codes: 0 success, 1 verification failed (or --strict found an unfolded site or a "
          "difference from the vanilla model), 2 usage or input error")

CHECKPOINT_HELP = (
    "CKPT is an asr-fx checkpoint (asr_fx.save), or a training checkpoint or bare state_dict "
    "({'state_dict': ...}, {'model': ...}, keys prefixed by DDP's 'module.', Lightning's 'model.' or "
    "torch.compile's '_orig_mod.') with --model and --factory-args; a state_dict with asr.* keys was "
    "instrumented and is instrumented again with the ASR options. Pickled whole modules load only "
    "with --trust-checkpoint."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; keep it one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224")
    return dims


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg}); e.g. '{{\"depth\": 11}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} should be a JSON object, e.g. '{{\"depth\": 11}}'")
    return value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _device(text: str) -> str:
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu, cuda or cuda:N")
    return text


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance on max|ref| (default 1e-4)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead of tables")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint", CHECKPOINT_HELP)
    g.add_argument("--model", metavar="PKG.MODULE:FACTORY", default=None,
                   help="function that builds the vanilla model (needed for a state_dict / training checkpoint)")
    g.add_argument("--factory-args", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments of --model as a JSON object, e.g. '{\"depth\": 11}'")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled Python objects (whole modules); they can run code when loaded")
    g.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape, e.g. 1,3,224,224 (default: from the checkpoint or the model)")
    g.add_argument("--device", type=_device, default="cpu", help="run torch on cpu (default) or cuda[:N]")
    g.add_argument("--leaf-modules", type=_names, default=None, metavar="NAMES",
                   help="comma-separated module names torch.fx keeps as opaque calls (for untraceable modules)")
    a = p.add_argument_group("ASR options of a state_dict with asr.* keys (as passed to asr_fx.instrument)")
    a.add_argument("--attention", default=None, help="attention network name (default se)")
    a.add_argument("--attention-args", type=_json_object, default=None, metavar="JSON",
                   help="attention_kwargs as a JSON object")
    a.add_argument("--rule", default=None, help="placement rule (default: the sites named by the asr.* keys)")
    a.add_argument("--sites", type=_names, default=None, help="comma-separated site keys or module names")
    a.add_argument("--delta", type=int, default=None, help="ASR blocks per site (default: read from the keys)")
    a.add_argument("--activation", default=None, help="sigmoid (default), tanh or hardsigmoid")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asr-fx", description="Attention-alike structural re-parameterization (ASR) with torch.fx.",
                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="instrument a built-in ResNet, train a few steps, fuse, export, verify",
                          description="Instrument the built-in CIFAR ResNet-164 with ASR(SE), train a few steps on "
                          "synthetic data, fuse, export ONNX and verify it in onnxruntime. No download, no GPU.",
                          epilog=EPILOG)
    demo.add_argument("--depth", type=int, default=164, help="CIFAR ResNet depth, 9n+2 (default 164)")
    demo.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    demo.add_argument("--attention", default="se", help="attention network (default se)")
    demo.add_argument("-o", "--out", type=Path, default=Path("asr-fx-demo"),
                      help="folder for the checkpoint and ONNX files (default ./asr-fx-demo)")
    demo.add_argument("--seed", type=int, default=0)
    _add_verify_options(demo)

    fuse = sub.add_parser("fuse", help="fuse a checkpoint, export ONNX and verify it",
                          description="Load CKPT, fold every ASR block into its layer, export ONNX to OUT and verify "
                          "it in onnxruntime against the unfused model. OUT is written (atomically: a temporary file "
                          "beside it, then a rename) only when verification passes.", epilog=EPILOG)
    fuse.add_argument("checkpoint", type=Path, metavar="CKPT", help="the checkpoint (formats: see below)")
    fuse.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="ONNX file to write")
    fuse.add_argument("--dynamic-batch", action="store_true",
                      help="export with a dynamic batch dimension (verified at batch 1 and 7 too)")
    fuse.add_argument("--strict", action="store_true", help="fail (exit 1) if an ASR site cannot be folded, or if the "
                      "fused model's parameter count or ONNX op multiset differs from the vanilla model's")
    fuse.add_argument("--fold-bn", action="store_true", help="also fold BatchNorm into the conv before it")
    fuse.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check and the comparison")
    fuse.add_argument("--no-compare", action="store_true",
                      help="skip exporting the vanilla and instrumented models for op counts and latency")
    fuse.add_argument("--runs", type=int, default=20, help="onnxruntime runs per latency median (default 20)")
    _add_checkpoint_options(fuse)
    _add_verify_options(fuse)

    verify = sub.add_parser("verify", help="re-check an existing ONNX export against its checkpoint",
                            description="Run ONNX in onnxruntime and compare it with the model in CKPT (as trained, "
                            "in torch); report errors, op counts and latency against the vanilla and instrumented "
                            "models.", epilog=EPILOG)
    verify.add_argument("onnx", type=Path, metavar="OUT.onnx", help="the ONNX file to check")
    verify.add_argument("--against", type=Path, required=True, metavar="CKPT", help="the checkpoint it came from")
    verify.add_argument("--strict", action="store_true", help="fail (exit 1) if the op multiset differs from vanilla's")
    verify.add_argument("--no-compare", action="store_true", help="skip the vanilla/instrumented comparison")
    verify.add_argument("--runs", type=int, default=20, help="onnxruntime runs per latency median (default 20)")
    _add_checkpoint_options(verify)
    _add_verify_options(verify)

    demo.set_defaults(func=_run_demo)
    fuse.set_defaults(func=run_fuse)
    verify.set_defaults(func=_run_verify)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules: each exposes ``register(subparsers)``, which adds
    a parser and sets ``func=run(args) -> exit code`` on it."""
    import importlib

    for name in EXTRA_COMMAND_MODULES:
        yield importlib.import_module(name).register


#: modules adding subcommands (``register(subparsers)``); keep this list short and sorted
EXTRA_COMMAND_MODULES: list[str] = ["asr_fx.cli_inspect", "asr_fx.cli_stripe"]


def _run_demo(args: argparse.Namespace) -> int:
    from asr_fx.demo import run_demo

    return run_demo(args)


def _run_verify(args: argparse.Namespace) -> int:
    from asr_fx.cli_verify import run_verify

    return run_verify(args)


def _say(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or args.json):
        print(text, flush=True)


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


def prepare_model(args: argparse.Namespace, loaded: Any, shape: Sequence[int]):
    """Move the model to ``--device``, check it traces and runs on an input of ``shape``; ``(model, x)``."""
    import torch

    from asr_fx.passes import trace

    device = _torch_device(args.device)
    model = loaded.model.to(device).eval()
    if loaded.vanilla is not None:
        loaded.vanilla.to(device)
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
    _say(args, "\n" + summary.tables())
    if summary.command == "fuse":
        _say(args, f"\nwrote {summary.output}")
    else:
        _say(args, f"\n{summary.output} agrees with {summary.checkpoint}")


def run_fuse(args: argparse.Namespace) -> int:
    import tempfile

    import asr_fx
    from asr_fx.cli_verify import ModelRow, VerificationSummary, compare_models, measure_latency
    from asr_fx.errors import ASRError, FusionError

    out: Path = args.output
    if out.suffix.lower() != ".onnx":
        raise ASRError(f"the output {str(out)!r} should end in .onnx")
    if out.resolve() == args.checkpoint.resolve():
        raise ASRError(f"refusing to write the ONNX model over the input checkpoint {str(args.checkpoint)!r}")
    if not out.parent.is_dir():
        raise ASRError(f"the output folder {str(out.parent)!r} does not exist")
    _torch_device(args.device)
    summary = VerificationSummary("fuse", str(args.checkpoint), output=str(out), device=args.device)
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
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("vanilla", loaded.vanilla), ("instrumented", model), ("fused", fused)) if m is not None}
    if args.strict and not args.fold_bn and "vanilla" in n_params and n_params["fused"] != n_params["vanilla"]:
        raise FusionError(f"--strict: the fused model has {n_params['fused']:,} parameters, the vanilla model "
                          f"{n_params['vanilla']:,}")
    compare = not (args.no_verify or args.no_compare)
    stages.start("export", f"{out}" + (" (and the vanilla and instrumented models, for comparison)" if compare else ""))
    with tempfile.TemporaryDirectory(prefix="asr-fx-fuse-") as workdir:
        if compare:
            summary.models = compare_models({"vanilla": loaded.vanilla, "instrumented": model}, x, workdir, args.opset,
                                            args.dynamic_batch)
        vanilla_ops = summary.models["vanilla"].op_counts if "vanilla" in summary.models else None
        summary.models.setdefault("fused", ModelRow())
        summary.models["fused"].params = n_params["fused"]
        report = asr_fx.export_onnx(
            fused, out, x, reference=model, verify=not args.no_verify, rtol=args.rtol, atol=args.atol,
            opset=args.opset, dynamic_batch=args.dynamic_batch,
            expected_op_counts=vanilla_ops if args.strict and not args.fold_bn else None,
            on_verify=lambda: stages.start("verify", "in onnxruntime against the unfused model in torch"))
        summary.export = report
        summary.models["fused"].op_counts = report.op_counts
        if compare:
            measure_latency(summary.models, {"vanilla": f"{workdir}/vanilla.onnx",
                                             "instrumented": f"{workdir}/instrumented.onnx", "fused": str(out)},
                            x.cpu(), runs=args.runs)
    stages.stop()
    finish(args, summary)
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _report_error(args: argparse.Namespace, exc: BaseException, code: int, label: str) -> int:
    if getattr(args, "verbose", False):
        traceback.print_exc()
    message = str(exc) if code == EXIT_VERIFY else _one_line(exc)
    print(f"asr-fx: {label}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        summary = getattr(args, "summary", None)
        payload = summary.to_dict() if summary is not None else {}
        print(json.dumps({"ok": False, "exit_code": code, "error": _one_line(exc), **payload}, indent=2))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from asr_fx.errors import ASRError, FusionError, VerificationError

    try:
        return args.func(args)
    except (VerificationError, FusionError) as exc:
        summary = getattr(args, "summary", None)
        if summary is not None and getattr(exc, "report", None) is not None and summary.export is None:
            summary.export = exc.report
        return _report_error(args, exc, EXIT_VERIFY, "verification failed")
    except (ASRError, OSError) as exc:
        return _report_error(args, exc, EXIT_USAGE, "error")
    except Exception as exc:  # noqa: BLE001 - no raw traceback unless -v
        return _report_error(args, RuntimeError(f"unexpected {type(exc).__name__}: {_one_line(exc)} "
                                                "(run with -v for the traceback)"), EXIT_USAGE, "error")
    except KeyboardInterrupt:
        print("asr-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
