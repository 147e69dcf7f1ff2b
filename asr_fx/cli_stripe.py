"""``asr-fx stripe MODEL --data ... -o DIR``: the Stripe Observation on a model's own attention.

Runs the model on the data, records every input-dependent channel attention (SE, ECA, ...) and
writes the paper's Fig. 1 panels and a summary table to DIR:

- ``stripes.png`` (Fig. 1a, one site: ``--site``), ``std_histogram.png`` (Fig. 1b, every site),
- ``epoch_difference.png`` (Fig. 1c) when ``--checkpoints`` lists several checkpoints of one run,
- ``summary.md`` (per site: attention std, pooled-feature std, their ratio), also printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DATA_HELP = ("'random' (Gaussian inputs of --input-shape), 'digits' (scikit-learn's 8x8 digits, resized to the "
             "H,W of --input-shape, channels repeated), or a .pt file holding a tensor of inputs, an (inputs, "
             "targets) pair or a dict with 'x'/'inputs' (loaded with weights_only=True)")


def register(subparsers: Any) -> None:
    """Add the ``stripe`` subcommand."""
    from asr_fx.cli import EPILOG, _add_model_source_options, _shape

    p = subparsers.add_parser(
        "stripe", help="measure and draw the Stripe Observation of a model's channel attention",
        description="Run MODEL on the data, record the output of every input-dependent channel attention "
        "(x * sigmoid(F(GAP(x))): SE, ECA, torchvision's SqueezeExcitation, ...) and write the paper's Fig. 1 "
        "panels and a summary table to DIR.", epilog=EPILOG)
    p.add_argument("model", help="PKG.MODULE:FACTORY (a function returning the model, random weights) or a "
                   "checkpoint: asr_fx.save's, or a training checkpoint / state_dict with --model")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for the PNGs and summary.md")
    _add_model_source_options(p, "builds the model a state_dict checkpoint (MODEL or --checkpoints) is loaded into")
    p.add_argument("--checkpoints", type=Path, nargs="+", default=None, metavar="CKPT",
                   help="checkpoints of one training run, in order, for the change over epochs (Fig. 1c)")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="one batch's shape for --data random/digits, e.g. 32,3,64,64 (default: 32,3,224,224)")
    p.add_argument("--batches", type=int, default=8, help="batches of random/digits data (default 8)")
    p.add_argument("--max-inputs", type=int, default=None, help="stop after this many inputs")
    p.add_argument("--site", default="0", help="the site drawn in Fig. 1a/1c: an index or a module path (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")
    p.set_defaults(func=run)


def load_data(args: argparse.Namespace) -> list[torch.Tensor]:
    """The input batches named by ``--data``."""
    import torch

    from asr_fx.errors import ASRError

    shape = list(args.input_shape or [32, 3, 224, 224])
    g = torch.Generator().manual_seed(args.seed)
    if args.data == "random":
        return [torch.randn(*shape, generator=g) for _ in range(args.batches)]
    if args.data == "digits":
        import torch.nn.functional as F

        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ASRError("--data digits needs scikit-learn: pip install 'asr-fx[examples]'") from None
        if len(shape) != 4:
            raise ASRError(f"--data digits makes images: --input-shape should be N,C,H,W, got {shape}")
        x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=tuple(shape[2:]), mode="bilinear", align_corners=False).repeat(1, shape[1], 1, 1)
        x = (x - x.mean()) / x.std()
        x = x[torch.randperm(len(x), generator=g)[: shape[0] * args.batches]]
        return list(x.split(shape[0]))
    path = Path(args.data)
    if not path.is_file():
        raise ASRError(f"--data {args.data!r}: not 'random', 'digits' or an existing .pt file")
    from asr_fx.checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("x", "inputs", "images") if isinstance(obj.get(k), torch.Tensor)), None)
    elif isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() < 2:
        raise ASRError(f"--data {str(path)!r} should hold a tensor of inputs (N x ...), an (inputs, targets) pair "
                       "or a dict with 'x'/'inputs'")
    return list(obj.float().split(args.input_shape[0] if args.input_shape else 32))


def _site(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def run(args: argparse.Namespace) -> int:
    import torch

    from asr_fx import plot, stripe
    from asr_fx.cli import EXIT_OK, _load_model_source, _say
    from asr_fx.progress import progress

    model = _load_model_source(args.model, args)
    data = load_data(args)
    show = not (args.quiet or args.json)
    stats = stripe.collect(model, progress(data, "collect", enabled=None if show else False),
                           max_inputs=args.max_inputs)
    site = _site(args.site)
    stats[site]  # an unknown site fails here, before any figure is drawn
    over_epochs = None
    if args.checkpoints:
        tracked = [torch.cat(data)[:64]]
        runs = [stripe.collect(_load_model_source(path, args), tracked)
                for path in progress(args.checkpoints, "checkpoints", enabled=None if show else False)]
        over_epochs = stripe.values_over_checkpoints(runs, site)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot.plot_all(stats, args.out, site=site, over_epochs=over_epochs)
    table = stats.table()
    summary = args.out / "summary.md"
    summary.write_text(f"# Stripe Observation: {args.model}\n\ndata: {args.data}, {stats[0].n_inputs} inputs\n\n"
                       f"{table}\n")
    if args.json:
        print(json.dumps({**stats.to_dict(), "files": [str(p) for p in [*paths, summary]]}, indent=2))
    else:
        _say(args, table)
        _say(args, "\nwrote " + ", ".join(str(p) for p in [*paths, summary]))
    return EXIT_OK
