"""The ``asr-fx`` command line: ``demo``, ``fuse``, ``verify`` (and subcommands other modules register).

Exit codes: 0 success; 1 verification failed (onnxruntime disagrees with torch, or --strict found
an unfolded site or a difference from the vanilla model); 2 usage or input error (bad arguments,
missing or unreadable checkpoint, keys that do not fit, untraceable model, exporter failure).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
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


class UsageError(Exception):
    """argparse found a usage error (raised instead of exiting, so that main() can report it)."""

    def __init__(self, prog: str, usage: str, message: str) -> None:
        super().__init__(message)
        self.prog, self.usage = prog, usage


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 on usage errors; main() keeps it one line
        raise UsageError(self.prog, self.format_usage(), message)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance must be a finite number >= 0")
    return value


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
    p.add_argument("--rtol", type=_non_negative, default=1e-4, help="relative tolerance on max|ref| (default 1e-4)")
    p.add_argument("--atol", type=_non_negative, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's); torch's exporter writes 18 and newer, older ones only "
                   "where it can convert the model down: exit 2 when it cannot")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report instead of tables")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")


def _add_model_source_options(p: argparse.ArgumentParser, model_help: str) -> None:
    """``--model`` (as ``args.factory``), ``--factory-args`` and ``--trust-checkpoint``: how
    :func:`_load_model_source` builds or loads a MODEL argument (``inspect``, ``stripe``)."""
    p.add_argument("--model", dest="factory", default=None, metavar="PKG.MODULE:FACTORY", help=model_help)
    p.add_argument("--factory-args", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments of the factory as a JSON object, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled Python objects (whole modules); they can run code when loaded")


def _load_model_source(spec: str | Path, args: argparse.Namespace) -> Any:
    """The model (eval mode) a MODEL argument names: ``PKG.MODULE:FACTORY`` (random weights) or any
    checkpoint ``asr-fx fuse`` reads, with the options of :func:`_add_model_source_options`."""
    from asr_fx import checkpoint, factory

    kwargs = args.factory_args or {}
    if not Path(spec).exists() and ":" in str(spec):
        return factory.build(str(spec), **kwargs).eval()
    return checkpoint.load_checkpoint(Path(spec), factory=args.factory, factory_kwargs=kwargs,
                                      trust=args.trust_checkpoint).model.eval()


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
                   help="comma-separated module paths (e.g. layer1.0.gate) torch.fx keeps as opaque calls, for "
                   "untraceable modules; a name that matches no module is an error")
    a = p.add_argument_group("ASR options of a state_dict with asr.* keys (as passed to asr_fx.instrument)")
    a.add_argument("--attention", default=None, metavar="NAME|PKG.MODULE:FACTORY",
                   help="attention network: a registered name (default se) or an import path of its factory; "
                   "replaces the one an asr-fx checkpoint names (for a custom attention it registered by name)")
    a.add_argument("--attention-args", type=_json_object, default=None, metavar="JSON",
                   help="attention_kwargs as a JSON object")
    a.add_argument("--rule", default=None, help="placement rule (default: the sites named by the asr.* keys)")
    a.add_argument("--sites", type=_names, default=None, help="comma-separated site keys or module names")
    a.add_argument("--delta", type=int, default=None, help="ASR blocks per site (default: read from the keys)")
    a.add_argument("--activation", default=None, help="sigmoid (default), tanh or hardsigmoid")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asr-fx", description="Attention-alike structural re-parameterization (ASR) with torch.fx.",
                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="instrument a built-in ResNet, train a few steps, fuse, export, verify",
                          description="Instrument the built-in CIFAR ResNet-164 with ASR(SE), train a few steps on "
                          "synthetic data, fuse, export ONNX and verify it in onnxruntime. No download, no GPU.",
                          epilog=EPILOG)
    demo.add_argument("--depth", type=_demo_depth, default=164,
                      help="CIFAR ResNet depth, 9n+2 with n >= 1: 11, 20, ..., 164 (default 164)")
    demo.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    demo.add_argument("--attention", default="se", help="attention network (default se)")
    demo.add_argument("-o", "--out", type=Path, default=Path("asr-fx-demo"),
                      help="folder for the checkpoint and ONNX files (default ./asr-fx-demo); its parent must exist")
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
                      "fused model's parameter count or ONNX op multiset differs from the vanilla model's (with "
                      "--fold-bn: the vanilla model with BN folded too). --strict always exports the vanilla model "
                      "for its op multiset, also with --no-compare or --no-verify")
    fuse.add_argument("--fold-bn", action="store_true", help="also fold BatchNorm into the conv before it")
    fuse.add_argument("--state-dict-out", type=Path, metavar="VANILLA.pt", help="also write the fused weights as a "
                      "state_dict of the vanilla model the checkpoint's factory builds (model.load_state_dict("
                      "torch.load(VANILLA.pt, weights_only=True)) with strict=True); checked to compute what the fused "
                      "model computes, written atomically after the ONNX file verifies; refused (exit 1, nothing "
                      "written) where a site has no place in the vanilla class")
    fuse.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check and the comparison "
                      "(--strict's checks still run)")
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
    verify.add_argument("--strict", action="store_true", help="fail (exit 1) if the op multiset differs from vanilla's "
                        "(the vanilla model is exported for it also with --no-compare)")
    verify.add_argument("--no-compare", action="store_true", help="skip the vanilla/instrumented comparison")
    verify.add_argument("--runs", type=int, default=20, help="onnxruntime runs per latency median (default 20)")
    _add_checkpoint_options(verify)
    _add_verify_options(verify)

    demo.set_defaults(func=_run_demo)
    fuse.set_defaults(func=_run_fuse)
    verify.set_defaults(func=_run_verify)
    for register in _extra_commands():
        register(sub)
    return parser


def _version() -> str:
    from asr_fx import __version__

    return __version__


def _demo_depth(text: str) -> int:
    try:
        depth = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if depth < 11 or (depth - 2) % 9:
        near = max(11, 9 * round((depth - 2) / 9) + 2)
        raise argparse.ArgumentTypeError(f"{depth}: the bottleneck CIFAR ResNet has depth 9n+2 with n >= 1 "
                                         f"(11, 20, ..., 164); e.g. --depth {near}")
    return depth


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


def _run_fuse(args: argparse.Namespace) -> int:
    from asr_fx.cli_fuse import run_fuse

    return run_fuse(args)


def _run_verify(args: argparse.Namespace) -> int:
    from asr_fx.cli_verify import run_verify

    return run_verify(args)


def _say(args: argparse.Namespace, text: str) -> None:
    if not (args.quiet or args.json):
        print(text, flush=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _report_error(args: argparse.Namespace, exc: BaseException, code: int, label: str,
                  cause: BaseException | None = None) -> int:
    if getattr(args, "verbose", False):
        if cause is not None:
            traceback.print_exception(cause)
        else:
            traceback.print_exc()
    message = str(exc) if code == EXIT_VERIFY else _one_line(exc)
    print(f"asr-fx: {label}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        summary = getattr(args, "summary", None)
        payload = summary.to_dict() if summary is not None else {}
        for tolerance in ("rtol", "atol"):
            if payload.get(tolerance) is None and hasattr(args, tolerance):
                payload[tolerance] = getattr(args, tolerance, None)
        print(json.dumps({"ok": False, "exit_code": code, "error": _one_line(exc), **payload}, indent=2))
    return code


def _usage_error(argv: Sequence[str], exc: UsageError) -> int:
    """argparse's usage error: usage and one error line on stderr; with --json also the JSON error object."""
    sys.stderr.write(exc.usage)
    print(f"{exc.prog}: error: {exc}", file=sys.stderr)
    if "--json" in argv:
        def given(option: str, default: float) -> Any:
            for i, arg in enumerate(argv):
                value = arg.split("=", 1)[1] if arg.startswith(option + "=") else (
                    argv[i + 1] if arg == option and i + 1 < len(argv) else None)
                if value is not None:
                    try:
                        return float(value)
                    except ValueError:
                        return value
            return default

        payload: dict[str, Any] = {"ok": False, "exit_code": EXIT_USAGE, "error": f"{exc.prog}: {exc}"}
        if any(command in argv for command in ("demo", "fuse", "verify")):  # the commands with tolerances
            payload.update(rtol=given("--rtol", 1e-4), atol=given("--atol", 0.0))
        print(json.dumps(payload, indent=2))
    return EXIT_USAGE


_TRACE_HINT = re.compile(r"pass leaf_modules=\[(?P<quoted>'(?P<name>[^']*)')\] \(or its class (?P<cls>\w+)\)")


def _cli_trace_message(exc: BaseException) -> str:
    """A TraceError's way out in the CLI's words: ``--leaf-modules NAME`` rather than ``leaf_modules=[...]``."""
    return _TRACE_HINT.sub(lambda m: f"pass --leaf-modules {m['name']} (leaf_modules=[{m['quoted']}] or "
                                     f"[{m['cls']}] in Python)", str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asr-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _usage_error(argv, exc)
    from asr_fx.errors import ASRError, FusionError, TraceError, VerificationError

    try:
        return args.func(args)
    except UsageError as exc:
        return _usage_error(argv, exc)
    except TraceError as exc:
        return _report_error(args, TraceError(_cli_trace_message(exc)), EXIT_USAGE, "error", cause=exc)
    except (VerificationError, FusionError) as exc:
        summary = getattr(args, "summary", None)
        if summary is not None and getattr(exc, "report", None) is not None and summary.export is None:
            summary.export = exc.report
        return _report_error(args, exc, EXIT_VERIFY, "verification failed")
    except (ASRError, OSError, ValueError) as exc:  # ValueError: the library's refusal of an option value
        return _report_error(args, exc, EXIT_USAGE, "error")
    except Exception as exc:  # noqa: BLE001 - no raw traceback unless -v
        return _report_error(args, RuntimeError(f"unexpected {type(exc).__name__}: {_one_line(exc)} "
                                                "(run with -v for the traceback)"), EXIT_USAGE, "error")
    except KeyboardInterrupt:
        print("asr-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
