"""Inference cost of ASR: vanilla vs vanilla+SE vs ASR(SE) unfused vs ASR(SE) fused.

For each model, in torch eager and in onnxruntime (graph optimizations off and on), at batch 1 and
batch 32: median latency of every variant and its ratio to vanilla (median of per-round ratios,
[25th-75th percentile]). All variants and backends of one (model, batch) are timed in one
interleaved loop. Also checks, per model, that the fused model's ONNX op multiset and parameter
count equal the vanilla ones, and that onnxruntime runs the fused model within 1e-4 of the
instrumented one in torch.

    OMP_NUM_THREADS=1 python tools/bench_inference.py            # all models, writes tools/results/bench_inference.md
    python tools/bench_inference.py --models resnet164 --rounds 5 --no-write
    # eager torch only: tools/results/bench_inference_eager.md
    OMP_NUM_THREADS=1 python tools/bench_inference.py --eager

``--eager``: torch eager only, for what a user runs in PyTorch: the vanilla model, its deep copy
(the A/A control), a plain ``torch.fx`` trace of vanilla (the cost of running as a GraphModule),
the fused GraphModule, and the user's own model filled by ``fuse(..., into=vanilla)``; on
ResNet-50 at 224x224, the CIFAR ResNet-164 and a small model written with ``out += r``
(:class:`InplaceAddNet`), at batch 1 and 32, all interleaved in one loop per (model, batch).

"vanilla copy (control)" is a deep copy of the vanilla model, exported and timed as one more variant:
an A/A control whose ratio to vanilla shows how far two identical models drift apart in one run.
"vanilla+SE" is the input-dependent SE of the paper's Table 1, after the same sites as ASR, with
the same attention network (``asr_fx.stripe.input_se``). ASR's psi and attention weights
are randomised (as after training) so that fusion folds non-trivial values.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from _bench_common import (
    fmt_ms,
    fmt_ratio,
    machine,
    n_params,
    random_vit_head,
    randomise_asr,
    ratio_stats,
    report,
    set_threads,
    sites_of,
    spread_pct,
    table,
    time_interleaved,
    with_se,
)

import asr_fx
import asr_fx.passes.placement.rules
from asr_fx.models import resnet164
from asr_fx.passes import trace

# name: (factory, input CHW, preferred placement rule, instrument kwargs)
MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), (3, 64, 64), "auto", {}),
    "resnet164": (resnet164, (3, 32, 32), "auto", {}),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (3, 64, 64), "norm-act", {}),
    "vit_b_16": (lambda: random_vit_head(torchvision.models.vit_b_16(image_size=32)), (3, 32, 32), "transformer",
                 {"preset": "transformer"}),
}
VARIANTS = ("vanilla", "vanilla copy (control)", "vanilla+SE", "ASR(SE) unfused", "ASR(SE) fused")
BACKENDS = ("torch", "ort-noopt", "ort-opt")


def build_variants(name: str, notes: list[str]) -> tuple[dict[str, torch.nn.Module], dict]:
    factory, chw, rule, kwargs = MODELS[name]
    torch.manual_seed(0)
    vanilla = factory().eval()
    x1 = torch.randn(1, *chw)
    if asr_fx.passes.placement.rules.placement_rule(rule) is None:
        notes.append(f"{name}: placement rule `{rule}` is not in asr_fx at run time; used rule `auto`")
        rule = "auto"
    try:
        asr = asr_fx.instrument(vanilla, rule=rule, example_inputs=[x1], **kwargs)
    except TypeError:  # an instrument without preset=
        asr = asr_fx.instrument(vanilla, rule=rule, example_inputs=[x1])
        notes.append(f"{name}: instrument() took no {sorted(kwargs)}; used defaults")
    randomise_asr(asr)
    asr.eval()
    sites = sites_of(asr)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(asr)
    fuse_s = time.perf_counter() - start
    report = asr_fx.fusion_report(fused)
    se = with_se(vanilla, sites).eval()
    info = {
        "sites": len(sites),
        "rules": ",".join(sorted({s.rule for s in sites})),
        "unfolded": len(report.unfolded) if report is not None else "?",
        "fuse_s": fuse_s,
        "chw": chw,
    }
    variants = {"vanilla": vanilla, "vanilla copy (control)": copy.deepcopy(vanilla), "vanilla+SE": se,
                "ASR(SE) unfused": asr, "ASR(SE) fused": fused}
    with torch.no_grad():
        ref = asr(x1)
        info["torch_fuse_rel_err"] = ((fused(x1) - ref).abs().max() / ref.abs().max()).item()
    return variants, info


def export_all(name: str, variants: dict, info: dict, folder: Path,
               batches: tuple[int, ...]) -> dict[tuple[str, int], str]:
    """ONNX files per (variant, batch): one dynamic-batch export per variant, per-batch exports if that fails."""
    chw = info["chw"]
    x2 = torch.randn(2, *chw)  # batch 2: an example of batch 1 would make torch.export specialise the batch dim
    paths: dict[tuple[str, int], str] = {}
    for variant, model in variants.items():
        ref = variants["ASR(SE) unfused"] if variant == "ASR(SE) fused" else model
        path = folder / f"{name}_{variant.replace(' ', '_').replace('+', '_').replace('(', '').replace(')', '')}.onnx"
        try:
            report = asr_fx.export_onnx(model, path, x2, reference=ref, dynamic_batch=True)
            paths.update({(variant, b): str(path) for b in batches})
        except Exception as exc:  # noqa: BLE001 - a dynamic-batch export or its check failed: export per batch
            info.setdefault("notes", []).append(f"{variant}: dynamic-batch export failed "
                                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                                                f"fixed-batch exports")
            for b in batches:
                p = path.with_name(f"{path.stem}_b{b}.onnx")
                report = asr_fx.export_onnx(model, p, torch.randn(b, *chw), reference=ref)
                paths[(variant, b)] = str(p)
        info[f"ops:{variant}"] = report.op_counts
        info[f"params:{variant}"] = n_params(model)
        if variant == "ASR(SE) fused":
            info["ort_rel_err"] = max(o.max_rel for o in report.outputs)
    return paths


def ort_session(path: str, optimize: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def bench_model(name: str, batches: tuple[int, ...], rounds: dict[int, int], notes: list[str]) -> tuple[list, dict]:
    variants, info = build_variants(name, notes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = export_all(name, variants, info, Path(tmp), batches)
        info["export_s"] = time.perf_counter() - start
        for batch in batches:
            x = torch.randn(batch, *info["chw"])
            feed = x.numpy()
            fns = {}
            for variant, model in variants.items():
                fns[(variant, "torch")] = (lambda m=model, x=x: m(x))
                for backend, optimize in (("ort-noopt", False), ("ort-opt", True)):
                    session = ort_session(paths[(variant, batch)], optimize)
                    input_name = session.get_inputs()[0].name
                    fns[(variant, backend)] = (lambda s=session, n=input_name, feed=feed: s.run(None, {n: feed}))
            with torch.inference_mode():
                samples = time_interleaved(fns, rounds[batch], warmup=2, min_seconds=0.1 if batch == 1 else 0.0)
            for variant in VARIANTS:
                row = {"model": name, "batch": batch, "variant": variant, "params": f"{n_params(variants[variant]):,}"}
                for backend in BACKENDS:
                    s, base = samples[(variant, backend)], samples[("vanilla", backend)]
                    row[f"{backend} ms"] = f"{fmt_ms(sorted(s)[len(s) // 2])} {spread_pct(s)}"
                    row[f"{backend} / vanilla"] = fmt_ratio(ratio_stats(s, base)) if variant != "vanilla" else "1"
                rows.append(row)
            print(table(rows[-len(VARIANTS):]), flush=True)
    return rows, info


class InplaceAddNet(torch.nn.Module):
    """Residual blocks written with ``out += r`` (the form torch.fx records as an out-of-place add)."""

    def __init__(self, width: int = 32, blocks: int = 8) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(2 * blocks))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(2 * blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for i in range(0, len(self.convs), 2):
            out = torch.relu(self.bns[i](self.convs[i](x)))
            out = self.bns[i + 1](self.convs[i + 1](out))
            out += x
            x = torch.relu(out)
        return self.head(x.mean((2, 3)))


# name: (factory, input CHW, rounds at batch 1, rounds at batch 32)
EAGER_MODELS = {
    "resnet50": (lambda: torchvision.models.resnet50(), (3, 224, 224), 11, 5),
    "resnet164": (resnet164, (3, 32, 32), 15, 7),
    "out += r (InplaceAddNet)": (InplaceAddNet, (3, 32, 32), 15, 9),
}
EAGER_VARIANTS = ("vanilla", "vanilla copy (control)", "fx trace of vanilla", "ASR fused GraphModule",
                  "ASR fused into= vanilla")


def eager_variants(name: str) -> tuple[dict[str, torch.nn.Module], float]:
    """The five eager variants of one model, and the into= model's max rel error against the fused one."""
    factory, chw, _, _ = EAGER_MODELS[name]
    torch.manual_seed(0)
    vanilla = factory().eval()
    x = torch.randn(1, *chw)
    asr = asr_fx.instrument(vanilla, example_inputs=(x,))
    randomise_asr(asr)
    asr.eval()
    fused = asr_fx.fuse(asr, strict=True, example_inputs=(x,))
    into = asr_fx.fuse(asr, strict=True, example_inputs=(x,), into=factory())
    with torch.no_grad():
        ref = fused(x)
        err = ((into(x) - ref).abs().max() / ref.abs().max()).item()
    variants = {"vanilla": vanilla, "vanilla copy (control)": copy.deepcopy(vanilla),
                "fx trace of vanilla": trace(copy.deepcopy(vanilla), bind_training=False).eval(),
                "ASR fused GraphModule": fused, "ASR fused into= vanilla": into}
    return variants, err


def bench_eager(args: argparse.Namespace) -> None:
    rows, notes = [], []
    start = time.perf_counter()
    for name in args.eager_models:
        _, chw, rounds1, rounds32 = EAGER_MODELS[name]
        print(f"== {name}", flush=True)
        variants, err = eager_variants(name)
        adds = [str(getattr(n.target, "__name__", n.target)) for n in variants["ASR fused GraphModule"].graph.nodes
                if n.op in ("call_function", "call_method") and "add" in str(getattr(n.target, "__name__", n.target))]
        in_place = sum(a in ("iadd", "__iadd__", "add_") for a in adds)
        notes.append(f"{name}: into= model vs fused GraphModule max rel error {err:.1e}; the fused graph holds "
                     f"{len(adds)} add node(s), {in_place} of them in place")
        for batch in args.batches:
            x = torch.randn(batch, *chw)
            rounds = max(3, (rounds1 if batch == 1 else rounds32) * args.rounds // 15)
            fns = {v: (lambda m=m, x=x: m(x)) for v, m in variants.items()}
            with torch.inference_mode():
                samples = time_interleaved(fns, rounds, warmup=2, min_seconds=0.2 if batch == 1 else 0.0)
            for variant in EAGER_VARIANTS:
                s = samples[variant]
                rows.append({"model": name, "input": "x".join(map(str, (batch, *chw))), "variant": variant,
                             "rounds": rounds, "ms": f"{fmt_ms(sorted(s)[len(s) // 2])} {spread_pct(s)}",
                             "/ vanilla": "1" if variant == "vanilla" else
                             fmt_ratio(ratio_stats(s, samples["vanilla"]))})
            print(table(rows[-len(EAGER_VARIANTS):]), flush=True)
    settings = [
        f"machine: {machine()}",
        "torch eager under inference_mode, one process; the machine is shared with six other engineers' jobs, so "
        "absolute times are noisy: read the ratios, which are interleaved per round",
        f"batches {list(args.batches)}; rounds per (model, batch) as listed (ResNet-50 at batch 32 fewer: seconds per "
        "call); variants interleaved in shuffled order each round; a batch-1 sample is the mean of the calls that "
        "fit in 0.2 s",
        "ms: median latency ± half the interquartile range over the median; ratio: median of per-round ratios to "
        "vanilla [25th-75th percentile]",
        "variants: the vanilla model; its deep copy (A/A control: the band two identical models drift apart in one "
        "run); a plain torch.fx trace of vanilla; ASR(SE) fused by asr_fx.fuse (a GraphModule); the same weights "
        "written into a freshly built vanilla model by fuse(..., into=)",
        f"random weights (no download); ASR psi/attention randomised; whole run "
        f"{(time.perf_counter() - start) / 60:.1f} min",
        "command: `OMP_NUM_THREADS=1 python tools/bench_inference.py --eager`",
    ]
    report("bench_inference_eager.md", "bench_inference --eager: eager PyTorch cost of the fused GraphModule and "
           "of the into= model", settings, "## Eager torch latency\n\n" + table(rows) + "\n", notes,
           write=not args.no_write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds at batch 1 (batch 32: half)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write tools/results/")
    parser.add_argument("--eager", action="store_true", help="eager torch only: vanilla, A/A control, fx trace, "
                        "fused GraphModule and into= model (writes bench_inference_eager.md)")
    parser.add_argument("--eager-models", nargs="+", default=list(EAGER_MODELS), choices=list(EAGER_MODELS))
    args = parser.parse_args()
    set_threads(args.threads)
    if args.eager:
        bench_eager(args)
        return
    rounds = {b: args.rounds if b == 1 else max(3, args.rounds // 2) for b in args.batches}
    batches = tuple(args.batches)
    notes: list[str] = []
    all_rows, checks = [], []
    start = time.perf_counter()
    for name in args.models:
        print(f"== {name}", flush=True)
        rows, info = bench_model(name, batches, rounds, notes)
        all_rows += rows
        ops_equal = info["ops:vanilla"] == info["ops:ASR(SE) fused"]
        checks.append({
            "model": name,
            "input": "x".join(map(str, info["chw"])),
            "sites (rule)": f"{info['sites']} ({info['rules']})",
            "unfolded": info["unfolded"],
            "fused params == vanilla": info["params:ASR(SE) fused"] == info["params:vanilla"],
            "ONNX ops fused == vanilla": ops_equal,
            "ONNX ops SE != vanilla": info["ops:vanilla+SE"] != info["ops:vanilla"],
            "fuse rel err (torch)": f"{info['torch_fuse_rel_err']:.1e}",
            "ORT rel err (fused vs ASR)": f"{info['ort_rel_err']:.1e}",
            "fuse s": f"{info['fuse_s']:.2f}",
            f"{len(VARIANTS)} exports+verify s": f"{info['export_s']:.1f}",
        })
        if not ops_equal:
            va, fu = info["ops:vanilla"], info["ops:ASR(SE) fused"]
            diff = {k: (va.get(k, 0), fu.get(k, 0)) for k in sorted(set(va) | set(fu)) if va.get(k, 0) != fu.get(k, 0)}
            notes.append(f"{name}: ONNX op counts differ (vanilla, fused): {diff}")
        notes += [f"{name}: {n}" for n in info.get("notes", [])]
    elapsed = time.perf_counter() - start
    settings = [
        f"machine: {machine()}",
        f"torch eager under inference_mode; onnxruntime CPUExecutionProvider, graph optimizations off "
        f"(ORT_DISABLE_ALL) and on (ORT_ENABLE_ALL), intra-op threads = {args.threads}",
        f"batches {list(batches)}; rounds per batch {rounds}; variants and backends interleaved in shuffled order "
        "each round; a batch-1 sample is the mean of the calls that fit in 0.1 s",
        "ms: median latency ± half the interquartile range over the median; ratio: median of per-round ratios to "
        "vanilla on the same backend [25th-75th percentile]",
        f"random weights (no download); whole run {elapsed / 60:.1f} min",
        "command: `OMP_NUM_THREADS=1 python tools/bench_inference.py`",
    ]
    body = "## Latency\n\n" + table(all_rows) + "\n\n## Structure checks\n\n" + table(checks) + "\n"
    report("bench_inference.md", "bench_inference: latency of vanilla, SE, ASR(SE) unfused and fused", settings, body,
           notes, write=not args.no_write)


if __name__ == "__main__":
    main()
