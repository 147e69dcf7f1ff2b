"""The parser, option types and option groups every ``asr-fx`` command shares.

Imports nothing heavy (no torch): building the whole parser, for ``--help`` or a usage error, takes
milliseconds. One model-source group (:func:`add_model_source`) spells ``--model``, ``--factory-args``,
``--input-shape``, ``--leaf-modules``, ``--attention``, ``--attention-args`` and ``--device`` the same
way in every command that loads a model.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from asr_fx.errors import UsageError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2

#: the epilog of a command whose exit codes are 0, 1 and 2 (fuse, verify, demo)
EPILOG_VERIFY = ("exit codes: 0 success, 1 verification failed (or --strict found an unfolded site or a "
                 "difference from the vanilla model), 2 usage or input error")
#: the epilog of a command that never fails verification (inspect, stripe)
EPILOG_USAGE = "exit codes: 0 success, 2 usage or input error"

CHECKPOINT_HELP = (
    "A checkpoint is an asr-fx checkpoint (asr_fx.save), or a training checkpoint or bare state_dict "
    "({'state_dict': ...}, {'model': ...}, keys prefixed by DDP's 'module.', Lightning's 'model.' or "
    "torch.compile's '_orig_mod.') with --model and --factory-args; a state_dict with asr.* keys was "
    "instrumented and is instrumented again with the ASR options. Pickled whole modules load only "
    "with --trust-checkpoint."
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of printing usage and exiting, and takes
    options only as spelled (no abbreviations: ``--leaf`` is not silently ``--leaf-modules``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, self.format_usage(), message)

    def unknown_options(self, extras: Sequence[str]) -> UsageError:
        """The error for arguments this parser does not know, with the nearest option's spelling."""
        known = [o for action in self._actions for o in action.option_strings]
        hints = []
        for arg in extras:
            if arg.startswith("-"):
                spelled = arg.split("=", 1)[0]
                near = ([o for o in known if o.startswith(spelled)] or  # an abbreviation: the options it starts
                        difflib.get_close_matches(spelled, known, n=1, cutoff=0.6))
                if near:
                    hints.append(f"{arg}: did you mean {' or '.join(near)}?")
        message = f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")
        return UsageError(self.prog, self.format_usage(), message)


class CommandFailed(Exception):
    """``error`` raised while a command filled ``summary`` (a :class:`~asr_fx.cli.summary.CommandSummary`):
    :func:`asr_fx.cli.main` reports both (with ``--json``, what was found before the error). Only the CLI
    raises and catches it."""

    def __init__(self, error: Exception, summary: Any) -> None:
        super().__init__(str(error))
        self.error, self.summary = error, summary


def usage_line(error: UsageError) -> str:
    """One line: ``asr-fx fuse: error: MESSAGE (see `asr-fx fuse --help`)``."""
    message = " ".join(str(error).split())
    return f"{error.prog}: error: {message} (see `{error.prog} --help`)"


# --- option types: each raises ArgumentTypeError with the problem and an example ----------------------


def non_negative(text: str) -> float:
    """A finite number >= 0 (a tolerance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a tolerance must be a finite number >= 0")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def shape(text: str) -> list[int]:
    """``1,3,224,224`` (or ``1x3x224x224``): positive whole numbers."""
    try:
        dims = [int(d) for d in re.split(r"[,x]", text) if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224 (positive whole numbers)")
    return dims


def json_object(text: str) -> dict:
    """A JSON object, e.g. ``{"depth": 11}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg}); e.g. '{{\"depth\": 11}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} should be a JSON object, e.g. '{{\"depth\": 11}}'")
    return value


def names(text: str) -> list[str]:
    """A comma-separated list: ``a,b`` -> ``["a", "b"]``."""
    return [n.strip() for n in text.split(",") if n.strip()]


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``."""
    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: choose cpu, cuda or cuda:N")
    return text


DYNAMIC_DIMS = ("batch", "height", "width")


def dynamic_dims(text: str) -> list[str]:
    """``batch,height,width`` (any of them): the input dimensions the ONNX file leaves symbolic."""
    dims = names(text)
    wrong = [d for d in dims if d not in DYNAMIC_DIMS]
    if not dims or wrong:
        raise argparse.ArgumentTypeError(f"{text!r}: name dimensions among {', '.join(DYNAMIC_DIMS)}, "
                                         "e.g. batch,height,width")
    return [d for d in DYNAMIC_DIMS if d in dims]


# --- option groups ----------------------------------------------------------------------------------


def add_model_source(p: argparse.ArgumentParser, *, input_shape_help: str, model_help: str | None = None) -> None:
    """The model-source options, spelled the same in every command that loads a model.

    Destinations: ``model``, ``factory_args``, ``input_shape``, ``leaf_modules``, ``attention``,
    ``attention_args``, ``device``, ``trust_checkpoint``.
    """
    g = p.add_argument_group("model source", CHECKPOINT_HELP)
    g.add_argument("--model", metavar="PKG.MODULE:FACTORY", default=None,
                   help=model_help or "function that builds the vanilla model (needed for a state_dict or a "
                   "training checkpoint)")
    g.add_argument("--factory-args", type=json_object, default=None, metavar="JSON",
                   help="keyword arguments of --model as a JSON object, e.g. '{\"depth\": 11}'")
    g.add_argument("--input-shape", type=shape, default=None, metavar="N,C,H,W", help=input_shape_help)
    g.add_argument("--leaf-modules", type=names, default=None, metavar="NAMES",
                   help="comma-separated module paths (e.g. layer1.0.gate) torch.fx keeps as opaque calls, for "
                   "untraceable modules; a name that matches no module is an error")
    g.add_argument("--attention", default=None, metavar="NAME|PKG.MODULE:FACTORY",
                   help="attention network of a state_dict with asr.* keys: a registered name (default se) or an "
                   "import path of its factory; replaces the one an asr-fx checkpoint names (for a custom "
                   "attention it registered by name)")
    g.add_argument("--attention-args", type=json_object, default=None, metavar="JSON",
                   help="keyword arguments of the attention network as a JSON object")
    g.add_argument("--device", type=device, default="cpu", help="run torch on cpu (default) or cuda[:N]")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow pickled Python objects (whole modules); they can run code when loaded")


def add_asr_options(p: argparse.ArgumentParser) -> None:
    """How a state_dict with ``asr.*`` keys is instrumented again (``fuse``, ``verify``)."""
    a = p.add_argument_group("ASR options of a state_dict with asr.* keys (as passed to asr_fx.instrument)")
    a.add_argument("--rule", default=None, help="placement rule (default: the sites named by the asr.* keys)")
    a.add_argument("--sites", type=names, default=None, metavar="NAMES",
                   help="comma-separated site keys or module names")
    a.add_argument("--delta", type=positive_int, default=None, help="ASR blocks per site (default: read from the keys)")
    a.add_argument("--activation", default=None, help="sigmoid (default), tanh or hardsigmoid")


def add_verify_options(p: argparse.ArgumentParser) -> None:
    """Tolerances and opset of the onnxruntime check (``fuse``, ``verify``, ``demo``)."""
    p.add_argument("--rtol", type=non_negative, default=1e-4, help="relative tolerance on max|ref| (default 1e-4)")
    p.add_argument("--atol", type=non_negative, default=0.0, help="absolute tolerance (default 0)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the exporter's); torch's exporter writes 18 and newer, older ones only "
                   "where it can convert the model down: exit 2 when it cannot")


def add_output_options(p: argparse.ArgumentParser, *, json_help: str, quiet: bool = True) -> None:
    """``--json``, ``-q`` and ``-v``."""
    p.add_argument("--json", action="store_true", help=json_help)
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")


def say(args: argparse.Namespace, text: str) -> None:
    """Print ``text`` unless ``-q`` or ``--json``."""
    if not (getattr(args, "quiet", False) or getattr(args, "json", False)):
        print(text, flush=True)


def one_line(exc: BaseException) -> str:
    """An error message on one line."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def json_usage_error(argv: Sequence[str], error: UsageError, commands_with_tolerances: Sequence[str]) -> dict[str, Any]:
    """The ``--json`` object of a usage error (with the tolerances given, for commands that have them)."""
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

    payload: dict[str, Any] = {"ok": False, "exit_code": EXIT_USAGE, "error": f"{error.prog}: {error}"}
    if any(command in argv for command in commands_with_tolerances):
        payload.update(rtol=given("--rtol", 1e-4), atol=given("--atol", 0.0))
    return payload


def print_error(text: str) -> None:
    """One line on stderr."""
    print(text, file=sys.stderr)
