"""The ``asr-fx`` command line: ``demo`` and ``fuse``.

Exit codes: 0 success; 1 verification failed (onnxruntime disagrees with torch, or --strict found
an unfolded site); 2 usage or input error (bad arguments, unreadable checkpoint, untraceable model).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2

EPILOG = "exit codes: 0 success, 1 verification failed (or --strict found an unfolded site), 2 usage or input error"


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


def _add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance on max|ref| (default 1e-4)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead of tables")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")


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

    fuse = sub.add_parser("fuse", help="fuse an asr-fx checkpoint, export ONNX and verify it",
                          description="Load CKPT (written by asr_fx.save), fold every ASR block into its layer, "
                          "export ONNX to OUT and verify it in onnxruntime against the unfused model. "
                          "OUT is written only when verification passes.", epilog=EPILOG)
    fuse.add_argument("checkpoint", type=Path, help="checkpoint written by asr_fx.save")
    fuse.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    fuse.add_argument("--input-shape", type=_shape, default=None,
                      help="example input shape, e.g. 1,3,224,224 (default: from the checkpoint)")
    fuse.add_argument("--strict", action="store_true", help="fail (exit 1) if any ASR site cannot be folded")
    fuse.add_argument("--fold-bn", action="store_true", help="also fold BatchNorm into the conv before it")
    fuse.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    _add_verify_options(fuse)
    demo.set_defaults(func=_run_demo)
    fuse.set_defaults(func=run_fuse)
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
EXTRA_COMMAND_MODULES: list[str] = []


def _run_demo(args: argparse.Namespace) -> int:
    from asr_fx.demo import run_demo

    return run_demo(args)


def _say(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or args.json):
        print(text, flush=True)


def run_fuse(args: argparse.Namespace) -> int:
    import torch

    import asr_fx
    from asr_fx.checkpoint import load

    if args.output.resolve() == args.checkpoint.resolve():
        raise asr_fx.ASRError(f"refusing to write the ONNX model over the input checkpoint {str(args.checkpoint)!r}")
    _say(args, f"load   {args.checkpoint}")
    model = load(args.checkpoint)
    shape = args.input_shape or (asr_fx.get_config(model) or {}).get("input_shape")
    if not shape:
        raise asr_fx.ASRError("the checkpoint records no input shape: pass --input-shape, e.g. 1,3,224,224")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    _say(args, "fuse")
    fused = asr_fx.fuse(model, strict=args.strict, fold_bn=args.fold_bn, example_inputs=(x,))
    fusion = asr_fx.fusion_report(fused)
    _say(args, f"export {args.output}" + ("" if args.no_verify else " and verify in onnxruntime"))
    report = asr_fx.export_onnx(fused, args.output, x, reference=model, verify=not args.no_verify,
                                rtol=args.rtol, atol=args.atol, opset=args.opset)
    if args.json:
        print(json.dumps({"fusion": fusion.to_dict(), "export": report.to_dict()}, indent=2))
    else:
        _say(args, f"\nfolded {len(fusion.folded)} scale(s): {fusion.summary()}")
        _say(args, f"parameters: instrumented {sum(p.numel() for p in model.parameters()):,}, "
                   f"fused {report.param_count:,}")
        if report.verified:
            _say(args, "\n" + report.table())
        _say(args, f"\nwrote {args.output}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from asr_fx.errors import ASRError, FusionError, VerificationError

    try:
        return args.func(args)
    except (VerificationError, FusionError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"asr-fx: verification failed: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except (ASRError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"asr-fx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
