"""``asr-fx verify OUT.onnx --against CKPT``: re-check an existing ONNX export against its checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asr_fx.cli import options
from asr_fx.cli.fuse import add_compare_options, add_runtime_option
from asr_fx.cli.options import EPILOG_VERIFY

NAME = "verify"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand."""
    p = subparsers.add_parser(
        NAME, help="re-check an existing ONNX export against its checkpoint", epilog=EPILOG_VERIFY,
        description="Run OUT.onnx in onnxruntime and compare it with the model in CKPT (as trained, in torch), "
        "at the example shape and, for each dimension the file leaves symbolic, at other sizes too; with "
        "--compare, report op counts and latency against the vanilla and instrumented models.")
    p.add_argument("onnx", type=Path, metavar="OUT.onnx", help="the ONNX file to check")
    p.add_argument("--against", type=Path, required=True, metavar="CKPT", help="the checkpoint it came from")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if the op multiset differs from vanilla's "
                   "(the vanilla model is exported for it, also without --compare)")
    add_compare_options(p)
    add_runtime_option(p)
    options.add_model_source(p, input_shape_help="example input shape, e.g. 1,3,224,224 (default: the ONNX "
                             "file's fixed input shape, else the checkpoint's or the model's documented size)")
    options.add_asr_options(p)
    options.add_verify_options(p)
    options.add_output_options(p, json_help="print a machine-readable JSON report instead of tables")
    return p


def run(args: argparse.Namespace) -> int:
    """``asr-fx verify``."""
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    from asr_fx.cli import verify_steps

    return verify_steps.verify(args)
