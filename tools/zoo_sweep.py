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
    python tools/zoo_sweep.py --zoo hf ViT Swin --no-onnx        # zoos: timm hf yolo tvtasks smp (tools/_zoos.py)

The other zoos (``--zoo``, tools/_zoo_run.py) run batch 2 with ONNX on (``--no-onnx`` turns it off) at the
smallest input size the model runs on. timm: one model per architecture family, built for each of the
sizes 64, 96, 128, 160, 192, 224, 240, 256 and its pretrained_cfg input size (``img_size=`` where the
constructor takes it), smallest first, until one runs; a model over 60M parameters is built from a reduced
config: the constructor keywords of ``tools/_zoos.SHRINK_KWARGS`` (``depth=2``, ``embed_dim=192,
num_heads=3``, ``intermediate_size=768``, ``channel_multiplier=0.25``, ``num_features=2016``,
``num_blocks=2``, ``mlp_ratio=0.25``) are tried in order, each kept when the model builds with it and has
fewer parameters (counted on the meta device), until it is under 60M; one whose constructor takes none of
them runs as it is up to 100M parameters (``tools/_zoo_run.MAX_PARAMS``). The results table lists the input
size and the keywords used.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import math
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from tqdm import tqdm

import asr_fx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the zoo modules beside this script
from _zoo_run import STAGES, ZooRow, run_entry  # noqa: E402
from _zoos import ZOOS  # noqa: E402

SIZES = (32, 64, 96, 128, 160, 224)
RESULTS = Path(__file__).resolve().parent / "results" / "torchvision.md"
#: ONNX's single-file limit: export_onnx writes no external data
ONNX_LIMIT_BYTES = 2**31

#: constructor arguments: the ViTs take a small image size; the aux heads only exist in train mode
#: and change the output type, so they are off
MODEL_KWARGS: dict[str, dict] = {
    "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 32}, "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32}, "vit_h_14": {"image_size": 28},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@dataclass
class Row:
    model: str
    input: str = ""
    sites: int = 0
    rules: str = ""
    params_vanilla: int = 0
    params_fused: int = 0
    params_reference: int = 0
    fuse_err: float = math.nan
    ort_err: float = math.nan
    ops_equal: bool = False
    op_diff: str = ""
    status: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def smallest_input(model: torch.nn.Module, name: str) -> int:
    """The smallest size in ``SIZES`` (or the model's fixed one) a batch of 2 goes through in eval mode."""
    fixed = MODEL_KWARGS.get(name, {}).get("image_size")
    if fixed:
        return fixed
    with torch.no_grad():
        for size in SIZES:
            try:
                model(torch.zeros(2, 3, size, size))
                return size
            except Exception:  # noqa: BLE001 - too small: try the next size
                continue
    raise RuntimeError(f"{name} accepts none of the input sizes {SIZES}")


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    loss = (out - torch.linspace(-1, 1, out.numel()).reshape(out.shape)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one step on random weights: keep it small
    opt.step()


def _op_diff(got: dict[str, int], want: dict[str, int]) -> str:
    keys = sorted(set(got) | set(want))
    return ", ".join(f"{k} {got.get(k, 0):+d}" if k not in want else f"{k} {got.get(k, 0) - want[k]:+d}"
                     for k in keys if got.get(k, 0) != want.get(k, 0))


def fx_op_counts(model: torch.nn.Module) -> dict[str, int]:
    """The op multiset of a traced model's graph: module classes, functions and methods it calls."""
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    counts: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[type(gm.get_submodule(str(node.target))).__name__] += 1
        elif node.op in ("call_function", "call_method"):
            counts[getattr(node.target, "__name__", str(node.target))] += 1
    return dict(counts)


def sweep_model(name: str, batch: int = 1, workdir: str | None = None, onnx: bool = True) -> Row:
    """Run the whole pipeline on one model; never raises (the row's status says what failed).

    ``onnx=False`` (the quick check of the default tests) skips the ONNX export and onnxruntime, and
    compares the fused graph's op multiset with ``fuse(vanilla)``'s in torch.fx instead.
    """
    row = Row(name)
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vanilla = torchvision.models.get_model(name, weights=None, **MODEL_KWARGS.get(name, {})).eval()
        row.params_vanilla = asr_fx.count_parameters(vanilla)
        if row.params_vanilla * 4 >= ONNX_LIMIT_BYTES:
            row.status = (f"skipped: {row.params_vanilla / 1e6:.0f}M parameters exceed ONNX's 2 GiB single-file "
                          "limit (export_onnx writes no external data)")
            return row
        size = smallest_input(vanilla, name)
        row.input = f"{batch}x3x{size}x{size}"
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        x_train = torch.randn(max(2, batch), 3, size, size, generator=torch.Generator().manual_seed(2))
        model = asr_fx.instrument(vanilla, example_inputs=(x,))
        sites = asr_fx.get_config(model)["sites"]
        row.sites = len(sites)
        row.rules = ", ".join(f"{k} {v}" for k, v in collections.Counter(s["rule"] for s in sites).items())
        _train_step(model, x_train)
        model.eval()
        with torch.no_grad():
            ref = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = asr_fx.fuse(model, example_inputs=(x,))
        unfolded = [str(w.message) for w in caught if "fold" in str(w.message).lower()]
        row.notes += unfolded[:1]
        with torch.no_grad():
            row.fuse_err = _rel(ref, fused(x))
        row.params_fused = asr_fx.count_parameters(fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the user's own class back (module form): the vanilla model is the reference
            reference = vanilla if type(fused) is type(vanilla) else asr_fx.fuse(vanilla, example_inputs=(x,))
        row.params_reference = asr_fx.count_parameters(reference)
        if onnx:
            report = asr_fx.export_onnx(fused, Path(tmp.name) / "fused.onnx", x, reference=model)
            row.ort_err = max(o.max_rel for o in report.outputs)
            got = report.op_counts
            want = asr_fx.export_onnx(reference, Path(tmp.name) / "vanilla.onnx", x, verify=False).op_counts
        else:
            got, want = fx_op_counts(fused), fx_op_counts(reference)
        row.ops_equal = got == want
        row.op_diff = _op_diff(got, want)
        problems = []
        if not row.fuse_err <= 1e-5:  # NaN fails too
            problems.append(f"fuse error {row.fuse_err:.2g} > 1e-5")
        if row.params_fused != row.params_reference:
            problems.append(f"parameters {row.params_fused} != vanilla {row.params_reference}")
        if not row.ops_equal:
            problems.append(f"ONNX ops differ from vanilla: {row.op_diff}")
        if onnx and not row.ort_err <= 1e-4:
            problems.append(f"onnxruntime error {row.ort_err:.2g} > 1e-4")
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # noqa: BLE001 - one row per model, whatever happened
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.status = f"error: {type(exc).__name__}: {first[:300]}"
        row.notes.append(traceback.format_exc(limit=3)[-600:])
    finally:
        tmp.cleanup()
        row.seconds = time.perf_counter() - start
        gc.collect()
    return row


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.1e}"


def table(rows: list[Row], fmt: str = "github") -> str:
    body = [(r.model, r.input, r.sites, r.rules, f"{r.params_vanilla:,}",
             "" if not r.params_fused else ("yes" if r.params_fused == r.params_reference else "no"),
             _fmt(r.fuse_err), _fmt(r.ort_err), "" if not r.params_fused else ("yes" if r.ops_equal else "no"),
             r.status, f"{r.seconds:.0f}") for r in rows]
    headers = ["model", "input", "sites", "rule (auto)", "params (vanilla)", "fused params == vanilla",
               "max fuse err", "max ORT err", "ONNX ops == vanilla", "status", "s"]
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)


def write_markdown(rows: list[Row], path: Path, total: int, batch: int) -> None:
    ok = sum(r.ok for r in rows)
    lines = [
        "# asr-fx on the torchvision classification zoo",
        "",
        f"Written by `tools/zoo_sweep.py` (torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"batch {batch}, random weights, CPU).",
        "Per model: instrument (rule auto) -> one SGD step -> eval -> fuse -> ONNX -> onnxruntime verify; "
        "parameters and ONNX op multiset compared with `fuse(vanilla)`.",
        "",
        f"**{ok} of {len(rows)} models pass**" + (f" ({len(rows)} of {total} swept so far)" if len(rows) < total else ""),
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
    "`tools/_zoos.SHRINK_KWARGS` (depth=2; embed_dim=192, num_heads=3; intermediate_size=768; "
    "channel_multiplier=0.25; num_features=2016; num_blocks=2; mlp_ratio=0.25) are tried in that order and each one kept "
    "when the model builds with it and gets smaller, until it is under 60M (column `config`); a model whose "
    "constructor takes none of them runs as it is up to 100M parameters, larger ones are skipped.")


def _zoo_markdown(zoo: str, rows: list, total: int, onnx: bool, minutes: float | None = None) -> str:
    ok = sum(r.ok for r in rows)
    body = [(r.model, r.input, r.config, r.sites, r.parts or "", getattr(r, "form", ""), _fmt(r.fuse_err), _fmt(r.ort_err),
             "yes" if r.params_ok else "no", " / ".join(f"{r.seconds.get(s, 0):.0f}" for s in STAGES), r.status[:300])
            for r in rows]
    headers = ["model", "input", "config", "sites", "parts", "form", "max fuse err", "max ORT err", "params ok",
               "seconds: " + " / ".join(STAGES), "status"]
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
        "`graph`, a GraphModule (parameters == fuse(vanilla)'s); `parts`, the parts are one or the other." + took, "",
        _ZOO_INPUTS, "",
        f"**{ok} of {len(rows)} pass**" + (f" ({len(rows)} of {total} swept)" if len(rows) < total else ""), "",
        tabulate(body, headers=headers, tablefmt="github", disable_numparse=True), ""])


def zoo_main(zoo: str, names: list[str], onnx: bool, out: Path | None, update: bool = False) -> int:
    """Sweep one of the zoos of tools/_zoos.py; writes tools/results/zoo_<zoo>.md (and .json)."""
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
