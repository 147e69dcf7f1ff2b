"""``asr-fx fuse CKPT -o OUT.onnx``: load a checkpoint, fold every ASR block, export ONNX, verify it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asr_fx import atomic
from asr_fx.cli import options
from asr_fx.cli.options import EPILOG_VERIFY
from asr_fx.errors import InvalidOptionError

NAME = "fuse"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``fuse`` subcommand."""
    p = subparsers.add_parser(
        NAME, help="fuse a checkpoint, export ONNX and verify it", epilog=EPILOG_VERIFY,
        description="Load CKPT, fold every ASR block into its layer, export ONNX to OUT and verify it in "
        "onnxruntime against the unfused model. OUT is written (atomically: a temporary file beside it, then a "
        "rename) only when verification passes.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="the checkpoint (formats: see 'model source')")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx", help="ONNX file to write")
    add_onnx_options(p)
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if an ASR site cannot be folded, or if the "
                   "fused model's parameter count or ONNX op multiset differs from the vanilla model's (with "
                   "--fold-bn: the vanilla model with BN folded too); exports the vanilla model for its op multiset")
    p.add_argument("--fold-bn", action="store_true", help="also fold BatchNorm into the conv before it")
    p.add_argument("--state-dict-out", type=Path, default=None, metavar="VANILLA.pt",
                   help="also write the fused weights as a state_dict of the vanilla model the checkpoint's factory "
                   "builds (model.load_state_dict(torch.load(VANILLA.pt, weights_only=True)) with strict=True); "
                   "checked to compute what the fused model computes, written atomically after the ONNX file "
                   "verifies; refused (exit 1, nothing written) where a site has no place in the vanilla class")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check and the comparison "
                   "(--strict's checks still run)")
    add_compare_options(p)
    add_runtime_option(p)
    options.add_model_source(p, input_shape_help="example input shape, e.g. 1,3,224,224 (default: from the "
                             "checkpoint, or the size the model documents: timm's pretrained_cfg, a Hugging Face "
                             "config's image_size, torchvision's weights)")
    options.add_asr_options(p)
    options.add_verify_options(p)
    options.add_output_options(p, json_help="print a machine-readable JSON report instead of tables")
    return p


def add_onnx_options(p: argparse.ArgumentParser) -> None:
    """Names and dynamic dimensions of the ONNX file (``fuse``; ``verify`` checks the file's own)."""
    p.add_argument("--input-names", type=options.names, default=None, metavar="NAMES",
                   help="comma-separated names of the ONNX graph inputs (default: the exporter's, from forward's "
                   "arguments)")
    p.add_argument("--output-names", type=options.names, default=None, metavar="NAMES",
                   help="comma-separated names of the ONNX graph outputs (default output0,output1,...; the report "
                   "uses the same names)")
    p.add_argument("--dynamic-shape", type=options.dynamic_dims, default=None, metavar="DIMS",
                   help="input dimensions left symbolic: any of batch,height,width (verified at several sizes: "
                   "batch 1 and 7 besides the example; 1.5x the height and 1.25x the width)")
    p.add_argument("--dynamic-batch", dest="dynamic_shape", action="store_const", const=["batch"],
                   help="the same as --dynamic-shape batch")


def add_compare_options(p: argparse.ArgumentParser) -> None:
    """``--compare``: export the vanilla and instrumented models too, for op counts and latency."""
    p.add_argument("--compare", action="store_true",
                   help="also export the vanilla and instrumented models, for their op counts and onnxruntime "
                   "latency (median and 25th-75th percentiles, with an A/A control); off by default: it roughly "
                   "doubles the time")
    p.add_argument("--runs", type=options.positive_int, default=20,
                   help="onnxruntime runs per latency measurement with --compare (default 20)")


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    """``--runtime``: what runs the ONNX file for verification (``fuse``, ``verify``)."""
    p.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                   help="run the ONNX file for verification in onnxruntime (default) or in OpenVINO's CPU plugin "
                   '(pip install "asr-fx[openvino]"); the same tolerances either way')


def check_output(args: argparse.Namespace) -> None:
    """Refuse a bad ``-o`` or ``--state-dict-out`` before any work: a folder, a missing or read-only folder, not
    ``.onnx``, or the checkpoint (or the other output) itself."""
    out = atomic.check_writable(args.output, suffix=".onnx")
    if out.resolve() == args.checkpoint.resolve():
        raise InvalidOptionError(f"refusing to write the ONNX model over the input checkpoint "
                                 f"{str(args.checkpoint)!r}: name another -o")
    if args.state_dict_out is not None:
        state_dict_out = atomic.check_writable(args.state_dict_out)
        if state_dict_out.resolve() in (args.checkpoint.resolve(), out.resolve()):
            raise InvalidOptionError(f"--state-dict-out {str(state_dict_out)!r} would overwrite the checkpoint or the "
                                     "ONNX output: name another file")


def run(args: argparse.Namespace) -> int:
    """``asr-fx fuse``."""
    check_output(args)
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    from asr_fx.cli import fuse_steps

    return fuse_steps.fuse(args)
