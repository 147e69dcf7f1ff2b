"""``asr-fx inspect MODEL``: a table of every ASR site placement finds (or a checkpoint records).

MODEL is ``PKG.MODULE:FACTORY`` (a function returning the model; random weights) or a checkpoint
(``asr_fx.save``'s, or a training checkpoint / state_dict with ``--model``). For a vanilla model the
sites are what :func:`asr_fx.find_sites` finds with ``--rule``, followed by the model's own channel
attention (rule ``existing``; ``instrument(..., convert_existing=True)`` converts those); for an
instrumented checkpoint, the sites it was instrumented at.
"""

from __future__ import annotations

import argparse
from typing import Any

from asr_fx.cli import options
from asr_fx.cli.options import EPILOG_USAGE

NAME = "inspect"

def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand."""
    p = subparsers.add_parser(
        NAME, help="list the ASR sites of a model: node, module, rule, channels, fold target", epilog=EPILOG_USAGE,
        description="Trace MODEL, find the ASR sites with --rule and print one row per site: graph node, module "
        "path, rule, channel dimension (counted from the end: -3 is C of N,C,H,W) and size, the layer its scale "
        "folds into, and whether it can fold. The model's own channel attention (SE, ECA, ...) is listed with "
        "rule 'existing'.")
    p.add_argument("source", metavar="MODEL", help="PKG.MODULE:FACTORY (a function returning the model, random "
                   "weights, built with --factory-args) or a checkpoint")
    p.add_argument("--rule", default="auto", help="placement rule: auto (default), residual, norm-act, branch, "
                   "transformer")
    p.add_argument("--exclude", type=options.names, default=None, metavar="NAMES",
                   help="comma-separated node or module names to leave out")
    options.add_model_source(p, model_help="function that builds the model a state_dict checkpoint is loaded into",
                             input_shape_help="example input shape, e.g. 1,3,224,224: lets layers whose channel "
                             "dimension depends on the input rank (BatchNorm1d, GroupNorm) take a site")
    options.add_output_options(p, json_help="print the sites as JSON instead of a table", quiet=False)
    return p


def run(args: argparse.Namespace) -> int:
    """``asr-fx inspect``."""
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    from asr_fx.cli import inspect_steps

    return inspect_steps.inspect_model(args)
