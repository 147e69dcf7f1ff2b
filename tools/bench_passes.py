"""Wall time of the asr-fx passes: trace, instrument, fuse, export, verify; and how it grows with graph size.

Models: torchvision ResNet-18/50/101/152 (random weights, 1x3x64x64 input) and a synthetic chain of
N residual blocks (``x + BN(conv3x3(x))`` then ReLU; 8 channels, 8x8 input) for N = 50 .. 1600.
For the chain, each pass's time is fitted against the number of graph nodes: time per node (least
squares slope), and the growth exponent ``k`` in ``t ~ nodes^k`` between consecutive sizes and over
the largest sizes, and ``k`` fitted (least squares on log-log) over all sizes (linear: ``k ~ 1``; a pass
whose fitted ``k`` is 1.2 or more is flagged as superlinear; not judged when it never takes 0.5 s).

    OMP_NUM_THREADS=1 python tools/bench_passes.py           # writes tools/results/bench_passes.md
    python tools/bench_passes.py --chain 50 100 200 --no-resnets --no-write
    OMP_NUM_THREADS=1 python tools/bench_passes.py --big      # writes tools/results/bench_passes_memory.md

``--big``: big models (timm ViT-S/B/L/H-14 and ConvNeXt-L from configs, random weights; the CIFAR
ResNet-164), each in its own subprocess (:mod:`_pass_memory`), one after another: ``instrument`` and
``fuse`` (with ``example_inputs``, checks on; ``instrument`` also with ``check=False``: the passes
without the numerical self-check), each step's time and its **peak memory**: the peak
resident set above what was resident when the step started, as a multiple of the model's bytes
(1.0x = one whole copy); with ``inplace=True`` on both where this asr-fx has it. Then the exponent
``k`` of pass time ``t ~ params^k`` fitted over the ViT rows.

- trace: ``asr_fx.passes.capture.trace`` (torch.fx symbolic trace with asr-fx's leaf rules);
- instrument: ``asr_fx.instrument`` (deep copy, trace, locate, insert);
- fuse: ``asr_fx.fuse`` of the instrumented model in eval mode (deep copy, trace, constant-fold,
  fold, cleanup);
- export / verify: ``asr_fx.export_onnx`` of the fused model (torch.onnx dynamo exporter + checker;
  then onnxruntime vs the instrumented model in torch). Fastest of ``--repeats`` runs (export: one run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from _bench_common import machine, report, set_threads, table
from torch import nn

import asr_fx
from asr_fx.passes import trace

PASSES = ("trace", "instrument", "fuse", "export", "verify")


class ChainBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.bn(self.conv(x)))


class Chain(nn.Module):
    """A stem conv, ``n`` residual blocks, global pooling and a linear head."""

    def __init__(self, n: int, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(ChainBlock(channels) for _ in range(n)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def timed(fn, repeats: int):
    """(fastest of ``repeats`` calls in seconds, last result): on a shared machine the minimum is the
    least disturbed run of this deterministic work."""
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), out


def measure(model: nn.Module, x: torch.Tensor, repeats: int, export: bool, folder: Path) -> dict:
    model.eval()
    row: dict = {}
    row["trace"], _ = timed(lambda: trace(model), repeats)
    row["instrument"], asr = timed(lambda: asr_fx.instrument(model), repeats)
    asr.eval()
    with torch.no_grad():  # move psi off its init so the folds are not trivial
        for name, p in asr.named_parameters():
            if name.startswith("asr."):
                p.add_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["fuse"], fused = timed(lambda: asr_fx.fuse(asr, strict=True), repeats)
    row["nodes"] = len(asr.graph.nodes)
    row["sites"] = len(asr_fx.get_config(asr)["sites"])
    if export:
        report = asr_fx.export_onnx(fused, folder / "fused.onnx", x, reference=asr)
        row["export"], row["verify"] = report.seconds["export"], report.seconds["verify"]
    return row


def growth(ns: list[int], ts: list[float]) -> list[float]:
    """Exponents ``log(t2/t1) / log(n2/n1)`` between consecutive sizes."""
    return [math.log(t2 / t1) / math.log(n2 / n1)
            for n1, n2, t1, t2 in zip(ns, ns[1:], ts, ts[1:]) if t1 > 0 and t2 > 0]


def slope(ns: list[int], ts: list[float]) -> float:
    mean_n, mean_t = statistics.fmean(ns), statistics.fmean(ts)
    return sum((n - mean_n) * (t - mean_t) for n, t in zip(ns, ts)) / sum((n - mean_n) ** 2 for n in ns)


def fmt_s(value) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


BIG = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224",
       "convnext_large", "cifar_resnet164"]


def big_row(name: str, inplace: bool) -> dict:
    """One row of ``--big``, measured in a subprocess of its own (the memory of one model at a time)."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(here / "_pass_memory.py"), name, *(["inplace"] if inplace else [])],
                         capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "inplace": inplace, "note": f"failed (exit {run.returncode}): {tail[:120]}"}
    return json.loads(lines[-1])


#: the issue's targets: peak of instrument and of fuse (checks on) at most one copy of the model, a quarter
#: of it with inplace=True; pass time at most linear in parameters from ViT-S to ViT-H
PEAK_TARGET = {False: 1.25, True: 0.25}
EXPONENT_TARGET = 1.1


def peak_verdict(r: dict) -> str:
    """``ok`` when instrument's and fuse's peaks (with their checks where measured) meet :data:`PEAK_TARGET`,
    else which step is over."""
    target = PEAK_TARGET[bool(r["inplace"])]
    peaks = {step: r.get(f"{step}_x", r.get(f"{step}_nocheck_x")) for step in ("instrument", "fuse")}
    if any(v is None for v in peaks.values()):
        return "-"
    over = [f"{step} {v:.2f} > {target:g}" for step, v in peaks.items() if v > target]
    checked = "" if "instrument_x" in r and "fuse_x" in r else " (check=False only)"
    return ("OVER: " + ", ".join(over) if over else f"ok (<= {target:g})") + checked


def big_table(names: list[str], write: bool) -> None:
    rows, raw = [], []
    for name in names:
        for inplace in (False, True):
            r = big_row(name, inplace)
            raw.append(r)
            rows.append({"model": name, "inplace": "yes" if inplace else "no",
                         "params (M)": f"{r['params'] / 1e6:.1f}" if "params" in r else "-",
                         "model MiB": f"{r['bytes'] / 2**20:.0f}" if "bytes" in r else "-",
                         **{f"{step} {kind}{label}{unit}": (fmt_s(r.get(f"{step}{key}_s")) if kind == "s" else
                                                             f"{r[f'{step}{key}_x']:.2f}" if f"{step}{key}_x" in r
                                                             else "-")
                            for step in ("instrument", "fuse")
                            for key, label in (("_nocheck", ", check=False"), ("", ""))
                            for kind, unit in (("s", ""), ("peak", " (x model)"))},
                         **{f"{step} peak MiB": f"{r[f'{step}_x'] * r['bytes'] / 2**20:.0f}"
                            if f"{step}_x" in r and "bytes" in r else "-" for step in ("instrument", "fuse")},
                         "verdict (peak)": peak_verdict(r), "note": r.get("note", "")})
            print(table(rows[-1:]), flush=True)
    fits = []
    for step, key, label in (("instrument", "_nocheck", ", check=False"), ("fuse", "_nocheck", ", check=False"),
                             ("instrument", "", ""), ("fuse", "", "")):
        vits = [r for r in raw if r["model"].startswith("vit_") and not r["inplace"] and f"{step}{key}_s" in r]
        if len(vits) >= 2:
            xs = [math.log(r["params"]) for r in vits]
            k = slope(xs, [math.log(r[f"{step}{key}_s"]) for r in vits])
            fits.append({"step": step + label, "rows": ", ".join(r["model"] for r in vits),
                         "exponent k (t ~ params^k)": f"{k:.2f}",
                         f"verdict (k <= {EXPONENT_TARGET:g})": "ok" if k <= EXPONENT_TARGET else "OVER"})
    settings = [
        f"machine: {machine()}",
        "models: timm from configs (pretrained=False), random weights; CIFAR ResNet-164 from asr_fx.models; input "
        "1x3x224x224 (ResNet-164: 1x3x32x32); instrument(model, example_inputs=(x,)) then fuse(instrumented, "
        "example_inputs=(x,)), each with check=False (the passes alone) then as called by default (with the numerical "
        "self-check: forward and, for instrument, gradients), unless the shared machine lacks the memory (note); one "
        "run each, each model in its own subprocess, one at a time",
        "peak: resident set (sampled every 2 ms) above what was resident when the step started (after gc and "
        "malloc_trim), divided by the model's parameter and buffer bytes; 1.00 = one whole copy of the model; "
        "`peak MiB`: the same peak (checks on) in MiB, where a small model's ratio is mostly the passes' fixed cost "
        "(graphs, Python objects)",
        f"verdict: the issue's targets, stated for ViT-L, applied to every row: peak of instrument and of fuse "
        f"(checks on) <= {PEAK_TARGET[False]:g}x the model, <= {PEAK_TARGET[True]:g}x with inplace=True; pass time "
        f"exponent over the ViT rows <= {EXPONENT_TARGET:g}",
        "command: `OMP_NUM_THREADS=1 python tools/bench_passes.py --big`",
    ]
    body = "## Peak memory and time of instrument and fuse\n\n" + table(rows) + "\n\n"
    body += "## Pass time against parameters (ViT rows)\n\n"
    body += (table(fits) if fits else "(too few rows)") + "\n"
    report("bench_passes_memory.md", "bench_passes --big: memory and time of the passes on big models", settings, body,
           [], write=write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", nargs="*", default=None, metavar="MODEL",
                        help=f"the big-model memory table instead (default rows: {' '.join(BIG)})")
    parser.add_argument("--resnets", nargs="*", default=["resnet18", "resnet50", "resnet101", "resnet152"])
    parser.add_argument("--no-resnets", action="store_true")
    parser.add_argument("--chain", nargs="*", type=int, default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--export-max", type=int, default=200,
                        help="export+verify the chain only up to this N (torch's exporter takes minutes beyond)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.big is not None:
        big_table(args.big or BIG, write=not args.no_write)
        return
    torch.manual_seed(0)
    resnet_rows, chain_rows, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        measure(Chain(4), torch.randn(1, 3, 8, 8), 1, True, folder)  # warm-up: imports and first-call costs
        for name in [] if args.no_resnets else args.resnets:
            model = getattr(torchvision.models, name)()
            row = measure(model, torch.randn(1, 3, 64, 64), args.repeats, True, folder)
            resnet_rows.append({"model": name, "nodes": row["nodes"], "sites": row["sites"],
                                **{p: fmt_s(row.get(p)) for p in PASSES},
                                "instrument+fuse": fmt_s(row["instrument"] + row["fuse"]),
                                "export+verify": fmt_s(row["export"] + row["verify"])})
            print(table(resnet_rows[-1:]), flush=True)
        raw = []
        for n in args.chain:
            row = measure(Chain(n), torch.randn(1, 3, 8, 8), args.repeats, n <= args.export_max, folder)
            raw.append(row)
            chain_rows.append({"N blocks": n, "nodes": row["nodes"], "sites": row["sites"],
                               **{p: fmt_s(row.get(p)) for p in PASSES},
                               **{f"{p} us/node": f"{1e6 * row[p] / row['nodes']:.0f}" for p in PASSES if p in row}})
            print(table(chain_rows[-1:]), flush=True)
    fits = []
    for p in PASSES:
        pts = [(r["nodes"], r[p]) for r in raw if p in r]
        if len(pts) < 2:
            continue
        ns, ts = [n for n, _ in pts], [t for _, t in pts]
        ks = growth(ns, ts)
        k_large = ks[-1] if len(ks) < 2 else math.log(ts[-1] / ts[-3]) / math.log(ns[-1] / ns[-3])
        k_fit = slope([math.log(n) for n in ns], [math.log(t) for t in ts])
        fits.append({"pass": p, "sizes (nodes)": f"{ns[0]}..{ns[-1]}", "slope us/node": f"{1e6 * slope(ns, ts):.0f}",
                     "exponent between sizes": " ".join(f"{k:.2f}" for k in ks),
                     "exponent, largest sizes": f"{k_large:.2f}", "exponent, fit": f"{k_fit:.2f}",
                     "linear": "yes" if k_fit < 1.2 else "NO" if max(ts) >= 0.5 else "n/a: under 0.5 s, noise"})
        if k_fit >= 1.2 and max(ts) >= 0.5:
            notes.append(f"`{p}` grows superlinearly on the chain (t ~ nodes^{k_fit:.2f} fitted over all sizes)")
    settings = [
        f"machine: {machine()}",
        f"ResNets: torchvision, random weights, input 1x3x64x64; chain: N residual blocks of 8 channels, input "
        f"1x3x8x8; trace/instrument/fuse: fastest of {args.repeats} runs; export and verify: one "
        f"run (chain: N <= {args.export_max})",
        "nodes: nodes of the instrumented graph; instrument and fuse include the deep copy and trace they do",
        "command: `OMP_NUM_THREADS=1 python tools/bench_passes.py`",
    ]
    body = ""
    if resnet_rows:
        body += "## ResNets (seconds)\n\n" + table(resnet_rows) + "\n\n"
    body += "## Chain of N residual blocks (seconds)\n\n" + table(chain_rows) + "\n\n"
    body += "## Growth with node count (chain)\n\n" + table(fits) + "\n"
    report("bench_passes.md", "bench_passes: wall time of the asr-fx passes", settings, body, notes,
           write=not args.no_write)


if __name__ == "__main__":
    main()
