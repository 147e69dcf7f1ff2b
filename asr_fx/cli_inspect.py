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


def register(subparsers: Any) -> None:
    """Add the ``inspect`` subcommand."""
    from asr_fx.cli import EPILOG, _add_model_source_options, _shape

    p = subparsers.add_parser(
        "inspect", help="list the ASR sites of a model: node, module, rule, channels, fold target",
        description="Trace MODEL, find the ASR sites with --rule and print one row per site: graph node, module "
        "path, rule, channel dimension and size, the layer its scale folds into, and whether it can fold. "
        "The model's own channel attention (SE, ECA, ...) is listed with rule 'existing'.", epilog=EPILOG)
    p.add_argument("model", help="PKG.MODULE:FACTORY (a function returning the model) or a checkpoint")
    p.add_argument("--rule", default="auto", help="placement rule: auto (default), residual, norm-act, branch, "
                   "transformer")
    p.add_argument("--exclude", nargs="+", default=None, metavar="NAME", help="node or module names to leave out")
    p.add_argument("--input-shape", type=_shape, default=None,
                   help="example input shape, e.g. 1,3,224,224: lets layers whose channel dimension depends on the "
                   "input rank (BatchNorm1d, GroupNorm) take a site")
    _add_model_source_options(p, "builds the model a state_dict checkpoint is loaded into")
    p.add_argument("--leaf", nargs="+", default=None, metavar="MODULE",
                   help="module names torch.fx keeps as opaque calls (for untraceable modules)")
    p.add_argument("--json", action="store_true", help="print the sites as JSON instead of a table")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")
    p.set_defaults(func=run)


def site_rows(sites: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per site dict (:meth:`asr_fx.Site.to_dict`)."""
    return [[s["node"], s["module"] or "-", s["rule"], s["channel_pos"], s["channels"], s["fold_target"],
             "yes" if s["foldable"] else f"no: {s['reason']}"] for s in sites]


HEADERS = ["node", "module", "rule", "channel dim", "channels", "folds into", "can fold"]


def run(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    import asr_fx
    from asr_fx.cli import _load_model_source

    model = _load_model_source(args.model, args)
    config = asr_fx.get_config(model)
    if config and config.get("sites"):
        sites = list(config["sites"])
        origin = f"instrumented at {len(sites)} site(s) (rule {config.get('rule')!r})"
    else:
        example = (torch.randn(*args.input_shape),) if args.input_shape else None
        found = asr_fx.find_sites(model, args.rule, exclude=args.exclude, example_inputs=example,
                                  leaf_modules=args.leaf)
        sites = [s.to_dict() for s in found]
        placed = sum(s["rule"] != "existing" for s in sites)
        origin = f"{placed} site(s) with rule {args.rule!r}, {len(sites) - placed} existing channel attention"
    if args.json:
        print(json.dumps({"model": args.model, "sites": sites}, indent=2))
        return 0
    print(f"{args.model}: {type(model).__name__}, {origin}\n")
    print(tabulate(site_rows(sites), headers=HEADERS, disable_numparse=True))
    if not any(s["rule"] != "existing" for s in sites):
        from asr_fx.passes.placement import placement_rule

        rule = placement_rule(args.rule)
        looked = rule.looks_for if rule is not None else "the given sites"
        print(f"\nno site with rule {args.rule!r}: it looks for {looked}. Try another --rule.")
    return 0
