"""``asr-fx demo``: the whole ASR life cycle on the built-in CIFAR ResNet, on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asr_fx.cli import options
from asr_fx.cli.options import EPILOG_VERIFY
from asr_fx.errors import OutputPathError

NAME = "demo"


def depth(text: str) -> int:
    """A bottleneck CIFAR ResNet depth: 9n+2 with n >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 11 or (value - 2) % 9:
        near = max(11, 9 * round((value - 2) / 9) + 2)
        raise argparse.ArgumentTypeError(f"{value}: the bottleneck CIFAR ResNet has depth 9n+2 with n >= 1 "
                                         f"(11, 20, ..., 164); e.g. --depth {near}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        NAME, help="instrument a built-in ResNet, train a few steps, fuse, export, verify", epilog=EPILOG_VERIFY,
        description="Instrument the built-in CIFAR ResNet-164 with ASR(SE), train a few steps on synthetic data, "
        "fuse, export ONNX and verify it in onnxruntime. No download, no GPU. Writes the checkpoint, the vanilla "
        "model's ONNX file (for its op multiset) and the fused model's ONNX file to OUT.")
    p.add_argument("--depth", type=depth, default=164,
                   help="CIFAR ResNet depth, 9n+2 with n >= 1: 11, 20, ..., 164 (default 164)")
    p.add_argument("--steps", type=options.positive_int, default=10, help="training steps (default 10)")
    p.add_argument("--batch", type=options.positive_int, default=16, help="batch size (default 16)")
    p.add_argument("--attention", default="se", metavar="NAME|PKG.MODULE:FACTORY",
                   help="attention network: a registered name (default se) or an import path of its factory")
    p.add_argument("--attention-args", type=options.json_object, default=None, metavar="JSON",
                   help="keyword arguments of the attention network as a JSON object")
    p.add_argument("-o", "--out", type=Path, default=Path("asr-fx-demo"), metavar="OUT",
                   help="folder for the checkpoint and ONNX files (default ./asr-fx-demo); its parent must exist")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the synthetic data and the example input (default 0)")
    options.add_verify_options(p)
    options.add_output_options(p, json_help="print a machine-readable JSON report instead of the table")
    return p


def check_out(out: Path) -> None:
    """``-o`` must be a folder (existing, or new in an existing parent): refused before any work."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"demo -o {str(out)!r}: that is a file, not a folder", path=str(out))
    if not out.parent.is_dir():
        raise OutputPathError(f"demo -o {str(out)!r}: its parent folder {str(out.parent)!r} does not exist",
                              path=str(out))


def run(args: argparse.Namespace) -> int:
    """``asr-fx demo``; the folder ``-o`` is removed again if the demo created it and fails before writing."""
    check_out(args.out)
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    from asr_fx.cli import demo_steps

    return demo_steps.demo(args)
