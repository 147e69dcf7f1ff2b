"""``asr-fx stripe MODEL --data ... -o DIR``: the Stripe Observation on a model's own attention.

Runs the model on the data, records every input-dependent channel attention (SE, ECA, ...) and
writes the paper's Fig. 1 panels and a summary table to DIR:

- ``stripes.png`` (Fig. 1a, one site: ``--site``), ``std_histogram.png`` (Fig. 1b, every site),
- ``epoch_difference.png`` (Fig. 1c) when ``--checkpoints`` lists several checkpoints of one run,
- ``summary.md`` (per site: attention std, pooled-feature std, their ratio), also printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asr_fx.cli import options
from asr_fx.cli.options import EPILOG_USAGE

NAME = "stripe"

DATA_HELP = ("'random' (Gaussian inputs of --input-shape), 'digits' (scikit-learn's 8x8 digits, resized to the "
             "H,W of --input-shape, channels repeated), or a .pt file holding a tensor of inputs, an (inputs, "
             "targets) pair or a dict with 'x'/'inputs' (loaded with weights_only=True)")


def paths(text: str) -> list[Path]:
    """A comma-separated list of files."""
    return [Path(p) for p in options.names(text)]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``stripe`` subcommand."""
    p = subparsers.add_parser(
        NAME, help="measure and draw the Stripe Observation of a model's channel attention", epilog=EPILOG_USAGE,
        description="Run MODEL on the data, record the output of every input-dependent channel attention "
        "(x * sigmoid(F(GAP(x))): SE, ECA, torchvision's SqueezeExcitation, ...) and write the paper's Fig. 1 "
        "panels and a summary table to DIR. On random weights (a factory MODEL) the numbers are meaningless: "
        "measure a trained checkpoint.")
    p.add_argument("source", metavar="MODEL", help="PKG.MODULE:FACTORY (a function returning the model, random "
                   "weights) or a checkpoint: asr_fx.save's, or a training checkpoint / state_dict with --model")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="folder for the PNGs and summary.md")
    p.add_argument("--checkpoints", type=paths, default=None, metavar="CKPTS",
                   help="comma-separated checkpoints of one training run, in order, for the change over epochs "
                   "(Fig. 1c)")
    p.add_argument("--batches", type=options.positive_int, default=8, help="batches of random/digits data (default 8)")
    p.add_argument("--max-inputs", type=options.positive_int, default=None, help="stop after this many inputs")
    p.add_argument("--site", default="0", help="the site drawn in Fig. 1a/1c: an index or a module path (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of the digits' order (default 0)")
    options.add_model_source(p, model_help="function that builds the model a state_dict checkpoint (MODEL or "
                             "--checkpoints) is loaded into",
                             input_shape_help="one batch's shape for --data random/digits, e.g. 32,3,64,64 "
                             "(default: 32,3,224,224); for a .pt file, its first number is the batch size")
    options.add_output_options(p, json_help="print the summary as JSON instead of a table")
    return p


def run(args: argparse.Namespace) -> int:
    """``asr-fx stripe``."""
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    from asr_fx.cli import stripe_steps

    return stripe_steps.stripe(args)
