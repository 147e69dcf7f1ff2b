"""The way out of a library error, in the command line's words.

Library errors say what is wrong and the Python way out (``trust=True``, ``factory_kwargs``,
``leaf_modules=[...]``); they never name a flag. They carry the problem as data
(:mod:`asr_fx.errors`), and :func:`cli_message` turns that data into the flag to pass. Imports
nothing heavy (no torch).
"""

from __future__ import annotations

from pathlib import Path

from asr_fx.errors import (
    CheckpointError,
    DifferentModelError,
    ExportError,
    FactoryError,
    InputShapeError,
    OutputPathError,
    StateDictMismatchError,
    TraceError,
    UnknownAttentionError,
    UnsupportedModelError,
)


def _factory_message(exc: FactoryError) -> str:
    """A refused factory keyword on one line: the factory, the keyword, its nearest match, the flag."""
    hint = f"; did you mean {exc.suggestion!r}?" if exc.suggestion else ""
    takes = f" It takes ({', '.join(exc.accepted)})" if exc.accepted else ""
    return (f"factory {exc.factory!r} does not take the keyword argument {exc.keyword!r}{hint}{takes}: "
            "fix --factory-args")


def _state_dict_advice(exc: StateDictMismatchError) -> str:
    if exc.attention:
        return f"on the command line: pass --attention {exc.attention}"
    if exc.asr_keys:
        return ("check --model, --factory-args and the ASR options it was trained with (--attention, "
                "--attention-args, --delta, --sites)")
    return "check --model and --factory-args"


def advice(exc: BaseException) -> str | None:
    """The flags that get past ``exc``, as a clause to append to its message; None when no flag does."""
    if isinstance(exc, TraceError) and exc.module:
        return f"on the command line: pass --leaf-modules {exc.module}"
    if isinstance(exc, StateDictMismatchError):
        return _state_dict_advice(exc)
    if isinstance(exc, FactoryError):
        return "check --model and --factory-args"
    if isinstance(exc, CheckpointError) and exc.reason == "no-factory" and "--model" in str(exc):
        return None  # the CLI's own message names the flag
    if isinstance(exc, CheckpointError):
        return {
            "pickled": "pass --trust-checkpoint if you trust the file's source",
            "no-factory": "pass --model package.module:factory (and --factory-args '{...}' for its arguments)",
            "attention": "pass --attention package.module:Factory (and --attention-args for its arguments)",
        }.get(exc.reason or "")
    if isinstance(exc, UnknownAttentionError):
        return f"pass --attention {' or '.join(exc.registered) or 'NAME'}, or an import path package.module:Factory"
    if isinstance(exc, InputShapeError):
        return None if "--input-shape" in str(exc) else "pass the shape it expects with --input-shape"
    if isinstance(exc, ExportError):
        if exc.written_opset is not None:
            return "pass an --opset in that range, or leave --opset out"
        return ("Try another --opset, fixed shapes (no --dynamic-shape or --dynamic-batch), or fuse with --strict to "
                "see which site stayed unfolded; -v prints the exporter's full message")
    if isinstance(exc, UnsupportedModelError) and exc.reason == "dtype":
        return "on the command line: save a float32 checkpoint, or pass --no-verify to export it unverified"
    if isinstance(exc, DifferentModelError):
        return "pass the checkpoint it was exported from as --against"
    if isinstance(exc, OutputPathError):
        if not Path(exc.path).parent.exists():
            return "create it first"
        return "choose another folder or fix its permissions"
    return None


def cli_message(exc: BaseException, message: str) -> str:
    """``message`` (``exc`` on one line) with the command line's way out appended, or rebuilt from the
    error's data where the library's sentence would name a Python keyword the CLI spells as a flag."""
    if isinstance(exc, FactoryError) and exc.keyword:
        return _factory_message(exc)
    way_out = advice(exc)
    if not way_out:
        return message
    if isinstance(exc, OutputPathError):
        return f"{message}: {way_out}"
    joiner = ". " if way_out[0].isupper() else "; "  # a sentence of its own, or a clause
    return f"{message.rstrip('. ')}{joiner}{way_out}"
