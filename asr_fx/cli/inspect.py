"""``asr-fx inspect MODEL``: a table of every ASR site placement finds (or a checkpoint records).

MODEL is ``PKG.MODULE:FACTORY`` (a function returning the model; random weights) or a checkpoint
(``asr_fx.save``'s, or a training checkpoint / state_dict with ``--model``). For a vanilla model the
sites are what :func:`asr_fx.find_sites` finds with ``--rule``, followed by the model's own channel
attention (rule ``existing``; ``instrument(..., convert_existing=True)`` converts those); for an
instrumented checkpoint, the sites it was instrumented at.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from asr_fx.cli import options
from asr_fx.cli.options import EPILOG_USAGE, EXIT_OK

NAME = "inspect"

HEADERS = ["node", "module", "rule", "channel dim", "channels", "folds into", "can fold"]

CHANNEL_DIM_NOTE = ("channel dim: the dimension of the site's output that holds its channels, counted from the end "
                    "(-3: N,C,H,W images; -1: N,L,C tokens); the ASR scale has one value per channel along it")


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


def site_rows(sites: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per site dict (:meth:`asr_fx.Site.to_dict`)."""
    return [[s["node"], s["module"] or "-", s["rule"], s["channel_pos"], s["channels"], s["fold_target"],
             "yes" if s["foldable"] else f"no: {s['reason']}"] for s in sites]


def run(args: argparse.Namespace) -> int:
    """``asr-fx inspect``."""
    # torch-importing modules load only when a command runs, so `asr-fx --help` stays fast
    import torch
    from tabulate import tabulate

    import asr_fx
    from asr_fx.api import RULE_ALIASES
    from asr_fx.cli import source
    from asr_fx.passes.rules import LOOKS_FOR

    model = source.load_model_source(args.source, args)
    config = asr_fx.get_config(model)
    if config and config.get("sites"):
        sites = list(config["sites"])
        origin = f"instrumented at {len(sites)} site(s) (rule {config.get('rule')!r})"
    else:
        example = (torch.randn(*args.input_shape).to(args.device),) if args.input_shape else None
        found = asr_fx.find_sites(model, args.rule, exclude=args.exclude, example_inputs=example,
                                  leaf_modules=args.leaf_modules)
        sites = [s.to_dict() for s in found]
        placed = sum(s["rule"] != "existing" for s in sites)
        origin = f"{placed} site(s) with rule {args.rule!r}, {len(sites) - placed} existing channel attention"
    if args.json:
        print(json.dumps({"model": args.source, "sites": sites}, indent=2))
        return EXIT_OK
    print(f"{args.source}: {type(model).__name__}, {origin}\n")
    print(tabulate(site_rows(sites), headers=HEADERS, disable_numparse=True))
    if sites:
        print(f"\n{CHANNEL_DIM_NOTE}")
    if not any(s["rule"] != "existing" for s in sites):
        looked = LOOKS_FOR.get(RULE_ALIASES.get(args.rule, args.rule), "the given sites")
        print(f"\nno site with rule {args.rule!r}: it looks for {looked}. Try another --rule.")
    return EXIT_OK
