"""The work of ``asr-fx stripe`` (imports torch): load the model and data, collect, draw, summarize."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from asr_fx import plot
from asr_fx import stripe as observation
from asr_fx.atomic import check_writable
from asr_fx.checkpoint import read_checkpoint
from asr_fx.cli import source
from asr_fx.cli.options import EXIT_OK, say
from asr_fx.errors import InputShapeError, InvalidOptionError, MissingDependencyError

RANDOM_WEIGHTS_NOTE = ("note: MODEL is a factory, so its weights are random: an untrained attention gives about "
                       "the same value for every input, and these numbers say nothing about the Stripe Observation. "
                       "Pass a trained checkpoint (or --checkpoints of a training run) to measure it.")


def load_data(args: argparse.Namespace) -> list[torch.Tensor]:
    """The input batches named by ``--data``."""
    shape = list(args.input_shape or [32, 3, 224, 224])
    g = torch.Generator().manual_seed(args.seed)
    if args.data == "random":
        return [torch.randn(*shape, generator=g) for _ in range(args.batches)]
    if args.data == "digits":
        try:
            from sklearn.datasets import load_digits  # optional dependency (the examples extra)
        except ImportError:
            raise MissingDependencyError("--data digits needs scikit-learn: pip install 'asr-fx[examples]'",
                                         package="scikit-learn") from None
        if len(shape) != 4:
            raise InputShapeError(f"--data digits makes images: --input-shape should be N,C,H,W, got {shape}",
                                  shape=list(shape))
        x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=tuple(shape[2:]), mode="bilinear", align_corners=False).repeat(1, shape[1], 1, 1)
        x = (x - x.mean()) / x.std()
        x = x[torch.randperm(len(x), generator=g)[: shape[0] * args.batches]]
        return list(x.split(shape[0]))
    path = Path(args.data)
    if not path.is_file():
        raise InvalidOptionError(f"--data {args.data!r}: not 'random', 'digits' or an existing .pt file")
    obj = read_checkpoint(path)
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("x", "inputs", "images") if isinstance(obj.get(k), torch.Tensor)), None)
    elif isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]
    if not isinstance(obj, torch.Tensor) or obj.dim() < 2:
        raise InvalidOptionError(f"--data {str(path)!r} should hold a tensor of inputs (N x ...), an (inputs, "
                                 f"targets) pair "
                       "or a dict with 'x'/'inputs'")
    return list(obj.float().split(args.input_shape[0] if args.input_shape else 32))


def site_key(text: str) -> int | str:
    """``--site``: an index (``0``, ``-1``) or a module path."""
    return int(text) if text.lstrip("-").isdigit() else text


def stripe(args: argparse.Namespace) -> int:
    """Collect the attention statistics, write the figures and summary.md, print the table."""
    existing = next(folder for folder in (args.out, *args.out.parents) if folder.exists())
    check_writable(existing / "summary.md")  # the nearest existing folder, before the model loads
    model = source.load_model_source(args.source, args)
    random_weights = not Path(args.source).exists()
    device = next(model.parameters(), torch.zeros(0)).device
    data = [x.to(device) for x in load_data(args)]
    quiet = args.quiet or args.json
    stats = observation.collect(model, tqdm(data, desc="collect", disable=None if not quiet else True, leave=False),
                                leaf_modules=args.leaf_modules, max_inputs=args.max_inputs)
    site = site_key(args.site)
    stats[site]  # an unknown site fails here, before any figure is drawn
    over_epochs = None
    if args.checkpoints:
        tracked = [torch.cat(data)[:64]]
        runs = [observation.collect(source.load_model_source(path, args), tracked, leaf_modules=args.leaf_modules)
                for path in tqdm(args.checkpoints, desc="checkpoints", disable=None if not quiet else True,
                                 leave=False)]
        over_epochs = observation.values_over_checkpoints(runs, site)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot.plot_all(stats, args.out, site=site, over_epochs=over_epochs)
    table = stats.table()
    note = RANDOM_WEIGHTS_NOTE if random_weights and not args.checkpoints else ""
    summary = args.out / "summary.md"
    summary.write_text(f"# Stripe Observation: {args.source}\n\ndata: {args.data}, {stats[0].n_inputs} inputs\n\n"
                       f"{table}\n" + (f"\n{note}\n" if note else ""))
    files = [str(p) for p in [*paths, summary]]
    if args.json:
        print(json.dumps({**stats.to_dict(), "files": files, "note": note or None}, indent=2))
    else:
        say(args, table)
        if note:
            say(args, f"\n{note}")
        say(args, "\nwrote " + ", ".join(files))
    return EXIT_OK
