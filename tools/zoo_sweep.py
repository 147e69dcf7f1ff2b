"""Sweep asr-fx over every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)``, with random
weights and the smallest input size it accepts (tried in ``SIZES``):

    instrument (rule auto) -> one SGD step -> eval -> fuse -> ONNX export -> onnxruntime verify
    -> the fused model's ONNX op multiset and parameter count against the vanilla model's.

The vanilla reference is the vanilla model itself when ``fuse`` returned the model's own class (the
module form); where it returned a GraphModule, ``fuse(vanilla)``: fuse also folds a model's own constant
per-channel multiplies (ConvNeXt's layer scale) there, so that is the deploy graph it must match.

The model is instrumented in eval mode: torchvision's stochastic depth takes ``self.training`` as a
Python bool, which tracing would freeze at its value (train mode would keep dropping rows in eval).

Usage::

    OMP_NUM_THREADS=1 python tools/zoo_sweep.py                  # all models -> tools/results/torchvision.md
    python tools/zoo_sweep.py resnet18 vgg11_bn --out /tmp/x.md  # a few
    python tools/zoo_sweep.py --zoo timm                         # -> tools/results/zoo_timm.md
    python tools/zoo_sweep.py --zoo hf ViT Swin --no-onnx        # zoos: timm hf yolo tvtasks smp (testkit/zoos.py)

The other zoos (``--zoo``, tools/testkit/zoo_run.py) run batch 2 with ONNX on (``--no-onnx`` turns it off) at the
smallest input size the model runs on. timm: one model per architecture family, built for each of the
sizes 64, 96, 128, 160, 192, 224, 240, 256 and its pretrained_cfg input size (``img_size=`` where the
constructor takes it), smallest first, until one runs; a model over 60M parameters is built from a reduced
config: the constructor keywords of ``testkit.zoos.SHRINK_KWARGS`` (``depth=2``, ``embed_dim=192,
num_heads=3``, ``intermediate_size=768``, ``channel_multiplier=0.25``, ``num_features=2016``,
``num_blocks=2``, ``mlp_ratio=0.25``) are tried in order, each kept when the model builds with it and has
fewer parameters (counted on the meta device), until it is under 60M; one whose constructor takes none of
them runs as it is up to 100M parameters (``testkit.zoo_run.MAX_PARAMS``). The results table lists the input
size and the keywords used.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torchvision
from _bench_common import commit, machine
from tabulate import tabulate
from tqdm import tqdm

from testkit.torchvision_zoo import Row, sweep_model
from testkit.zoo_run import STAGES, ZooRow, run_entry
from testkit.zoos import ZOOS

RESULTS = Path(__file__).resolve().parent / "results" / "torchvision.md"


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1e}"


def table(rows: list[Row], fmt: str = "github") -> str:
    body = [(r.model, r.input, r.sites, r.rules, f"{r.params_vanilla:,}",
             "" if not r.params_fused else ("yes" if r.params_fused == r.params_reference else "no"),
             _fmt(r.fuse_err), _fmt(r.ort_err), "" if not r.params_fused else ("yes" if r.ops_equal else "no"),
             r.kept if r.kept in ("", "yes") else "NO", r.status, f"{r.seconds:.0f}") for r in rows]
    headers = ["model", "input", "sites", "rule (auto)", "params (vanilla)", "fused params == vanilla",
               "max fuse err", "max ORT err", "ONNX ops == vanilla", "model kept", "status", "s"]
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)


def _provenance(rows: list) -> str:
    """Which code each row ran at: one commit for a whole sweep, several where rows were rerun with --update."""
    counts = collections.Counter(r.commit or "an unrecorded commit" for r in rows)
    if len(counts) <= 1:
        return f"Run at {next(iter(counts), commit())}."
    main, _ = counts.most_common(1)[0]
    others = "; ".join(f"{c}: {', '.join(r.model for r in rows if (r.commit or 'an unrecorded commit') == c)}"
                       for c in counts if c != main)
    return f"Run at {main}; rows rerun with --update at other commits: {others}."


def write_markdown(rows: list[Row], path: Path, total: int, batch: int) -> None:
    ok = sum(r.ok for r in rows)
    lines = [
        "# asr-fx on the torchvision classification zoo",
        "",
        f"Written by `tools/zoo_sweep.py` (torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"batch {batch}, random weights, CPU).",
        "Per model: instrument (rule auto) -> one SGD step -> eval -> fuse -> ONNX -> onnxruntime verify; "
        "parameters and ONNX op multiset compared with `fuse(vanilla)`. `model kept`: the vanilla model's state, "
        "hooks, attributes, modes and outputs were the same after every pass as before, also where one raised.",
        "",
        f"{_provenance(rows)} Machine: {machine()}.",
        "",
        f"**{ok} of {len(rows)} models pass**"
        + (f" ({len(rows)} of {total} swept so far)" if len(rows) < total else ""),
        "",
        table(rows),
        "",
    ]
    failures = [r for r in rows if not r.ok]
    if failures:
        lines += ["## Not passing", ""]
        lines += [f"- `{r.model}`: {r.status}" + (f" ({r.notes[0][:300]})" if r.notes and not r.status.startswith(
            "error") else "") for r in failures]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


#: how the zoo sweeps choose sizes and configs (the results header says it)
_ZOO_INPUTS = (
    "Inputs: batch 2 at the smallest input size the model runs on: a timm model is built for each size "
    "(`img_size=` where its constructor takes it) of 64, 96, 128, 160, 192, 224, 240, 256 and its "
    "pretrained_cfg input size, smallest first; other zoos: the entry's own size, then 96, 128, 160, 224. "
    "A timm model over 60M parameters is built from a reduced config: the constructor keywords of "
    "`tools/testkit/zoos.SHRINK_KWARGS` (depth=2; embed_dim=192, num_heads=3; intermediate_size=768; "
    "channel_multiplier=0.25; num_features=2016; num_blocks=2; mlp_ratio=0.25) are tried in that order and each one "
    "kept "
    "when the model builds with it and gets smaller, until it is under 60M (column `config`); a model whose "
    "constructor takes none of them runs as it is up to 100M parameters, larger ones are skipped.")


def _zoo_markdown(zoo: str, rows: list, total: int, onnx: bool, minutes: float | None = None) -> str:
    ok = sum(r.ok for r in rows)
    body = [(r.model, r.input, r.config, r.sites, r.parts or "", getattr(r, "form", ""), _fmt(r.fuse_err),
             _fmt(r.ort_err) or ("n/a: " + r.onnx_note if getattr(r, "onnx_note", "") else ""),
             "yes" if r.params_ok else "no", r.kept if r.kept in ("", "yes") else "NO",
             " / ".join(f"{r.seconds.get(s, 0):.0f}" for s in STAGES), r.status[:300])
            for r in rows]
    headers = ["model", "input", "config", "sites", "parts", "form", "max fuse err", "max ORT err", "params ok",
               "model kept", "seconds: " + " / ".join(STAGES), "status"]
    total_s = sum(sum(r.seconds.values()) for r in rows)
    took = f" Time: {total_s / 60:.0f} min, the sum of every row's stage times" + (
        f"; this run's wall time {minutes:.0f} min." if minutes is not None else
        " (rows rerun with --update keep their new times).")
    return "\n".join([
        f"# asr-fx on the {zoo} zoo", "",
        f"Written by `tools/zoo_sweep.py --zoo {zoo}` (torch {torch.__version__}, random weights, CPU, batch 2). "
        "Per model: instrument -> one SGD step -> eval (batch independence) -> fuse(strict=True) -> parameters "
        "against fuse(vanilla)" + (" -> ONNX verified in onnxruntime" if onnx else " (ONNX not run: --no-onnx)")
        + "; detectors: eval outputs of the fused model against the instrumented one. `parts`: captured parts "
        "when the whole forward does not trace (partial capture). `form`: `module`, the instrumented model is the "
        "library's own class with the blocks attached (fused: that class again, parameters == the vanilla model's); "
        "`graph`, a GraphModule (parameters == fuse(vanilla)'s); `parts`, the parts are one or the other. "
        "`model kept`: the vanilla model's state, hooks, attributes, modes and outputs were the same after every "
        "pass as before, also where one raised." + took, "",
        f"{_provenance(rows)} Machine: {machine()}.", "",
        _ZOO_INPUTS, "",
        f"**{ok} of {len(rows)} pass**" + (f" ({len(rows)} of {total} swept)" if len(rows) < total else ""), "",
        tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), ""])


def zoo_main(zoo: str, names: list[str], onnx: bool, out: Path | None, update: bool = False) -> int:
    """Sweep one of the zoos of tools/testkit/zoos.py; writes tools/results/zoo_<zoo>.md (and .json)."""
    entries = ZOOS[zoo]()
    chosen = [n for n in entries if not names or n in names or n.split("/")[0] in names]
    out = out or RESULTS.parent / f"zoo_{zoo}.md"
    saved = out.with_suffix(".json")
    rows = []
    if update and saved.exists():
        rows = [ZooRow(**r) for r in json.loads(saved.read_text()) if r["model"] not in chosen]
    order = list(entries)
    began = time.perf_counter()
    for name in tqdm(chosen, desc=zoo):
        row = run_entry(name, entries[name], onnx=onnx)
        row.commit = commit()
        rows.append(row)
        rows.sort(key=lambda r: order.index(r.model) if r.model in order else len(order))
        print(f"{name:40s} {row.status[:160]} {row.seconds}", flush=True)
        out.write_text(_zoo_markdown(zoo, rows, len(entries) if update else len(chosen), onnx,
                                     None if update else (time.perf_counter() - began) / 60))
        saved.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(f"\n{sum(r.ok for r in rows)} of {len(rows)} ok; wrote {out}")
    return 0 if all(r.ok or r.status.startswith("skipped") for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every classification model)")
    parser.add_argument("--zoo", default="torchvision", choices=["torchvision", *ZOOS],
                        help="which zoo (default torchvision classification)")
    parser.add_argument("--no-onnx", action="store_true", help="other zoos: skip the ONNX export and check")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the verified input (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"markdown file (default {RESULTS})")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the named models and replace their rows in the saved results (OUT.json)")
    args = parser.parse_args(argv)
    if args.zoo != "torchvision":
        return zoo_main(args.zoo, args.models, not args.no_onnx, None if args.out == RESULTS else args.out,
                        args.update)
    every = torchvision.models.list_models(module=torchvision.models)
    names = args.models or every
    saved = args.out.with_suffix(".json")
    rows: list[Row] = []
    if args.update and saved.exists():
        rows = [Row(**r) for r in json.loads(saved.read_text()) if r["model"] not in names]
    total = len(every) if args.update else len(names)
    for name in tqdm(names, desc="zoo"):
        row = sweep_model(name, batch=args.batch)
        row.commit = commit()
        rows.append(row)
        rows.sort(key=lambda r: every.index(r.model) if r.model in every else len(every))
        print(f"{name:24s} {row.status[:150]} ({row.seconds:.0f}s)", flush=True)
        write_markdown(rows, args.out, total, args.batch)
        saved.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(table(rows, fmt="simple"))
    print(f"\n{sum(r.ok for r in rows)} of {len(rows)} ok; wrote {args.out}")
    return 0 if all(r.ok or r.status.startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
