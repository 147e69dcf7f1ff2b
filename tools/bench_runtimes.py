"""The runtimes a user could pick instead of fusing: do they remove ASR's cost themselves?

For each model (ResNet-50, MobileNetV2, ViT-B/16, ConvNeXt-tiny; random weights, ASR's psi and attention
weights moved off their init as after training) three ONNX files are exported: the unfused
instrumented model as is, the fused one (``asr_fx.fuse``), and vanilla; a byte copy of the vanilla
file is the A/A control. Each file runs in three runtime configurations, on CPU:

- ``ort``: onnxruntime with graph optimizations on (``ORT_ENABLE_ALL``); ops counted in the optimized
  model it saves (``SessionOptions.optimized_model_filepath``);
- ``onnxslim+ort``: the file simplified by ``onnxslim.slim``, then onnxruntime as above (ops counted in
  onnxruntime's optimized model of the slimmed file);
- ``openvino``: OpenVINO's CPU plugin; ops counted in the compiled model's runtime model
  (``compiled.get_runtime_model().get_ordered_ops()`` by layer type: ``Convolution``, ``Subgraph``, ...).

Latency: per runtime configuration, its four files are timed in one loop, in a shuffled order each round
(``tools/_bench_common.time_interleaved``); a file's ratio to vanilla is the median over rounds of (its
time / vanilla's in the same round) with the 25th-75th percentiles. The fused file is also verified in
OpenVINO against the instrumented model in torch (``verify_onnx(..., runtime="openvino")``).

    OMP_NUM_THREADS=1 python tools/bench_runtimes.py                 # writes tools/results/bench_runtimes.md
    python tools/bench_runtimes.py --models resnet50 --rounds 5 --no-write
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import onnx
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
    table,
    time_interleaved,
)

import asr_fx
from asr_fx import openvino_runtime
from asr_fx.verify import onnx_op_counts, onnx_parameter_count

# name: (factory taking the image size, instrument kwargs)
MODELS = {
    "resnet50": (lambda size: torchvision.models.resnet50(), {}),
    "mobilenet_v2": (lambda size: torchvision.models.mobilenet_v2(), {"rule": "norm-act"}),
    "vit_b_16": (lambda size: random_vit_head(torchvision.models.vit_b_16(image_size=size)),
                 {"rule": "transformer", "preset": "transformer"}),
    "convnext_tiny": (lambda size: torchvision.models.convnext_tiny(), {}),
}
FILES = ("vanilla", "vanilla copy (A/A)", "unfused", "fused")
RUNTIMES = ("ort", "onnxslim+ort", "openvino")
#: op types that are data movement or bookkeeping in a runtime's view, not counted in "ops"
BOOKKEEPING = {"Constant", "Identity"}


def export_files(name: str, size: int, folder: Path, info: dict) -> dict[str, str]:
    """The four ONNX files of one model (each verified in onnxruntime on export)."""
    factory, kwargs = MODELS[name]
    torch.manual_seed(0)
    vanilla = factory(size).eval()
    x = torch.randn(1, 3, size, size)
    asr = asr_fx.instrument(copy.deepcopy(vanilla), example_inputs=[x], **kwargs).eval()
    randomise_asr(asr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(asr)
    info["sites"] = len(asr_fx.get_config(asr)["sites"])
    info["params"] = {"vanilla": n_params(vanilla), "vanilla copy (A/A)": n_params(vanilla),
                      "unfused": n_params(asr), "fused": n_params(fused)}
    paths = {f: str(folder / f"{name}_{f.split()[0]}.onnx") for f in ("vanilla", "unfused", "fused")}
    asr_fx.export_onnx(vanilla, paths["vanilla"], x)
    asr_fx.export_onnx(asr, paths["unfused"], x)
    asr_fx.export_onnx(fused, paths["fused"], x, reference=asr)
    ov = asr_fx.verify_onnx(paths["fused"], asr, x, runtime="openvino")
    info["openvino_rel_err"] = max(o.max_rel for o in ov.outputs)
    paths["vanilla copy (A/A)"] = str(folder / f"{name}_vanilla_copy.onnx")
    shutil.copyfile(paths["vanilla"], paths["vanilla copy (A/A)"])
    info["x"] = x.numpy()
    return {f: paths[f] for f in FILES}


def ort_session(path: str, threads: int, optimized_to: str | None = None):
    import onnxruntime as ort  # noqa: PLC0415 - the benchmark's own import, kept beside its use

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to is not None:
        options.optimized_model_filepath = optimized_to
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def slimmed(path: str) -> str:
    import onnxslim  # noqa: PLC0415 - benchmark-only dependency (the "bench" extra)

    out = path.replace(".onnx", "_slim.onnx")
    onnx.save(onnxslim.slim(path), out)
    return out


def runners(runtime: str, paths: dict[str, str], x, threads: int, folder: Path) -> tuple[dict, dict]:
    """Per file: a callable that runs it once, and the op counts the runtime executes."""
    fns, ops = {}, {}
    if runtime == "onnxslim+ort":  # every file slimmed before any session opens: one large model in memory at a time
        paths = {file: slimmed(path) for file, path in paths.items()}
    for file, path in paths.items():
        if runtime == "openvino":
            compiled = openvino_runtime.session(path, threads)
            request = compiled.create_infer_request()
            feed = openvino_runtime.feeds(compiled, [torch.from_numpy(x)])
            fns[file] = (lambda r=request, f=feed: r.infer(f))
            ops[file] = openvino_runtime.runtime_op_counts(compiled)
        else:
            optimized = str(folder / f"{Path(path).stem}_{runtime.replace('+', '_')}_opt.onnx")
            sess = ort_session(path, threads, optimized)
            feed = {sess.get_inputs()[0].name: x}
            fns[file] = (lambda s=sess, f=feed: s.run(None, f))
            ops[file] = onnx_op_counts(optimized)
    return fns, ops


def op_diff(ops: dict[str, int], base: dict[str, int]) -> str:
    """``+24 Mul, +12 Sigmoid``: the op types whose count differs from vanilla's, largest first."""
    diff = Counter(ops)
    diff.subtract(base)
    items = sorted(((k, v) for k, v in diff.items() if v and k not in BOOKKEEPING), key=lambda kv: (-abs(kv[1]), kv[0]))
    return ", ".join(f"{v:+d} {k}" for k, v in items[:4]) + (", ..." if len(items) > 4 else "") or "same as vanilla"


def bench_model(name: str, size: int, rounds: int, threads: int) -> tuple[list[dict], dict]:
    info: dict = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        start = time.perf_counter()
        paths = export_files(name, size, Path(tmp), info)
        info["export_s"] = time.perf_counter() - start
        gc.collect()
        file_params = {f: onnx_parameter_count(onnx.load(p, load_external_data=False)) for f, p in paths.items()}
        file_ops = {f: onnx_op_counts(p) for f, p in paths.items()}
        for runtime in RUNTIMES:
            fns, ops = runners(runtime, paths, info["x"], threads, Path(tmp))
            samples = time_interleaved(fns, rounds, warmup=2, min_seconds=0.05)
            for file in FILES:
                count = sum(v for k, v in ops[file].items() if k not in BOOKKEEPING)
                rows.append({
                    "model": name, "runtime": runtime, "file": file,
                    "ops in file": sum(v for k, v in file_ops[file].items() if k not in BOOKKEEPING),
                    "ops run": count,
                    "ops run vs vanilla": op_diff(ops[file], ops["vanilla"]) if file != "vanilla" else "",
                    "params (torch / file)": f"{info['params'][file]:,} / {file_params[file]:,}",
                    "ms": fmt_ms(sorted(samples[file])[len(samples[file]) // 2]),
                    "time / vanilla [p25-p75]": fmt_ratio(ratio_stats(samples[file], samples["vanilla"]))
                    if file != "vanilla" else "1",
                })
            del fns
            gc.collect()
            print(table(rows[-len(FILES):]), flush=True)
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch, onnxruntime and OpenVINO threads (default 1)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write tools/results/")
    args = parser.parse_args()
    set_threads(args.threads)
    import onnxruntime  # noqa: PLC0415
    import onnxslim  # noqa: PLC0415
    import openvino  # noqa: PLC0415

    start = time.perf_counter()
    rows, notes = [], []
    for name in args.models:
        model_rows, info = bench_model(name, args.size, args.rounds, args.threads)
        rows += model_rows
        notes.append(f"{name}: {info['sites']} ASR sites; fused file in OpenVINO vs the instrumented model in torch: "
                     f"max rel error {info['openvino_rel_err']:.1e} (verified, rtol 1e-4); export and checks "
                     f"{info['export_s']:.0f} s")
    settings = [
        f"machine: {machine()}",
        f"versions: onnxruntime {onnxruntime.__version__}, onnxslim {onnxslim.__version__}, "
        f"openvino {openvino.get_version()}, torchvision {torchvision.__version__}",
        f"threads: {args.threads} (OMP_NUM_THREADS, onnxruntime intra-op, OpenVINO INFERENCE_NUM_THREADS); "
        "the machine is shared with other jobs, so absolute ms are noisy: read the ratios and the A/A row",
        f"input: 1x3x{args.size}x{args.size} for every model (ViT-B/16 built with image_size={args.size}: "
        f"{(args.size // 16) ** 2 + 1} tokens, the same layers and ops as at 224)",
        f"rounds: {args.rounds} interleaved (shuffled order per round, 2 warm-up runs; a sample is the mean of as many "
        "runs as fill 50 ms, at least one), per runtime configuration",
        "ops in file: the exported ONNX file's nodes; ops run: onnxruntime's optimized model (ORT_ENABLE_ALL, "
        "saved via optimized_model_filepath), or OpenVINO's compiled runtime model, Constant/Identity/"
        "Parameter/Result not counted",
        f"total run time {time.perf_counter() - start:.0f} s",
    ]
    body = "## Runtimes side by side\n\n" + table(rows) + "\n"
    report("bench_runtimes.md", "asr-fx: the runtimes a user could pick instead of fusing", settings, body, notes,
           not args.no_write)


if __name__ == "__main__":
    main()
