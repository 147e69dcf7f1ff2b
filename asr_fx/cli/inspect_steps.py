"""The work of ``asr-fx inspect`` (imports torch): load the model, find its sites, print them."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from tabulate import tabulate

import asr_fx
from asr_fx.cli import source
from asr_fx.cli.options import EXIT_OK
from asr_fx.passes.placement.rules import placement_rule

HEADERS = ["node", "module", "rule", "channel dim", "channels", "folds into", "can fold"]

CHANNEL_DIM_NOTE = ("channel dim: the dimension of the site's output that holds its channels, counted from the end "
                    "(-3: N,C,H,W images; -1: N,L,C tokens); the ASR scale has one value per channel along it")


def site_rows(sites: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per site dict (:meth:`asr_fx.Site.to_dict`)."""
    return [[s["node"], s["module"] or "-", s["rule"], s["channel_pos"], s["channels"], s["fold_target"],
             "yes" if s["foldable"] else f"no: {s['reason']}"] for s in sites]


def inspect_model(args: argparse.Namespace) -> int:
    """Load MODEL, find (or read) its sites, print the table or JSON."""
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
        rule = placement_rule(args.rule)
        looked = rule.looks_for if rule is not None else "the given sites"
        print(f"\nno site with rule {args.rule!r}: it looks for {looked}. Try another --rule.")
    return EXIT_OK
