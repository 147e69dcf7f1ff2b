"""The ``asr-fx`` command line: ``demo``, ``fuse``, ``verify``, ``inspect``, ``stripe``.

Each command is a module of this package with ``NAME``, ``register(subparsers)`` (adds its parser)
and ``run(args) -> exit code``, listed in :data:`COMMANDS`. Building the parser imports no torch:
``asr-fx --help`` and every ``asr-fx CMD --help`` answer at once; a command's ``run`` imports what it
needs. This module parses, runs the command and turns errors into exit codes and one-line messages:

Exit codes: 0 success; 1 verification failed (onnxruntime disagrees with torch, --strict found an
unfolded site or a difference from the vanilla model, or --state-dict-out found a fold the vanilla
class has no place for); 2 usage or input error (bad arguments, missing or unreadable checkpoint,
keys that do not fit, untraceable model, exporter failure). A library error's way out is given in
flags (:mod:`asr_fx.cli.advice`).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from asr_fx import __version__
from asr_fx.cli import demo, fuse, inspect, options, stripe, verify
from asr_fx.cli.advice import cli_message
from asr_fx.cli.options import EPILOG_VERIFY, EXIT_USAGE, EXIT_VERIFY, CommandFailed, Parser, one_line
from asr_fx.errors import ASRError, FusionError, UsageError, VanillaModelError, VerificationError

#: the subcommands, in the order ``asr-fx --help`` lists them
COMMANDS = (demo, fuse, verify, inspect, stripe)

#: commands with --rtol/--atol (a --json usage error reports them)
TOLERANCE_COMMANDS = ("demo", "fuse", "verify")


def build_parser() -> tuple[Parser, dict[str, Parser]]:
    """The ``asr-fx`` parser and each subcommand's parser by name."""
    parser = Parser(prog="asr-fx", description="Attention-alike structural re-parameterization (ASR) with torch.fx.",
                    epilog=EPILOG_VERIFY)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    commands = {}
    for command in COMMANDS:
        p = command.register(sub)
        p.set_defaults(run=command.run)
        commands[command.NAME] = p
    return parser, commands


def report_error(args: argparse.Namespace, exc: BaseException, code: int, label: str, summary: Any = None) -> int:
    """One line on stderr (the whole message for a verification failure), with the flags that get past a
    library error (:func:`asr_fx.cli.advice.cli_message`); with --json also the JSON object, holding what
    the command found before the error (``summary``, a :class:`~asr_fx.cli.summary.CommandSummary`)."""
    message = cli_message(exc, str(exc) if code == EXIT_VERIFY else one_line(exc))
    options.print_error(f"asr-fx: {label}: {message}")
    if getattr(args, "json", False):
        payload = summary.to_dict() if summary is not None else {}
        for tolerance in ("rtol", "atol"):
            if payload.get(tolerance) is None and hasattr(args, tolerance):
                payload[tolerance] = getattr(args, tolerance, None)
        print(json.dumps({"ok": False, "exit_code": code, "error": cli_message(exc, one_line(exc)), **payload},
                         indent=2))
    return code


def usage_error(argv: Sequence[str], error: UsageError) -> int:
    """argparse's error: one line on stderr naming the command's --help; with --json also the JSON object."""
    options.print_error(options.usage_line(error))
    if "--json" in argv:
        print(json.dumps(options.json_usage_error(argv, error, TOLERANCE_COMMANDS), indent=2))
    return EXIT_USAGE


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported by the subcommand it was given to."""
    parser, commands = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        raise commands[args.command].unknown_options(extras)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``asr-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
    except UsageError as exc:
        return usage_error(argv, exc)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        options.print_error("asr-fx: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes an exit code and a message
        return command_error(argv, args, exc)


def command_error(argv: Sequence[str], args: argparse.Namespace, exc: Exception) -> int:
    """The exit code and message of a command's error (unwrapping :class:`~asr_fx.cli.summary.CommandFailed`,
    which carries what the command found before it)."""
    summary = None
    if isinstance(exc, CommandFailed):
        summary, exc = exc.summary, exc.error
    if getattr(args, "verbose", False):
        traceback.print_exception(exc)
    if isinstance(exc, UsageError):
        return usage_error(argv, exc)
    if isinstance(exc, (VerificationError, FusionError, VanillaModelError)):
        return report_error(args, exc, EXIT_VERIFY, "verification failed", summary)
    if isinstance(exc, (ASRError, OSError, ValueError)):  # ValueError: the library's refusal of an option value
        return report_error(args, exc, EXIT_USAGE, "error", summary)
    # no raw traceback unless -v
    unexpected = RuntimeError(f"unexpected {type(exc).__name__}: {one_line(exc)} (run with -v for the traceback)")
    return report_error(args, unexpected, EXIT_USAGE, "error", summary)
