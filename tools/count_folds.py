"""How many constant multiplies `asr_fx.fuse` removes from models that were never instrumented
(ConvNeXt's and Swin's layer scale, if any), and how long instrument + fuse take on ResNet-152.

Random weights, eval mode, CPU. Times are wall-clock and CPU seconds of this process (the CPU time
is what the machine's load does not inflate). Prints a Markdown table and writes it to
tools/results/fold_counts.md.

    OMP_NUM_THREADS=1 python tools/count_folds.py
"""

from __future__ import annotations

import operator
import time
import warnings
from pathlib import Path

import torch
import torchvision

import asr_fx
from asr_fx import count_parameters
from asr_fx.passes import fold_constants, trace

MUL_TARGETS = (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _muls(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(all multiplies, multiplies by a get_attr constant) in a graph."""
    muls = [n for n in gm.graph.nodes if n.target in MUL_TARGETS]
    constant = [n for n in muls if any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in n.args)]
    return len(muls), len(constant)


def _err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def measure_uninstrumented(name: str, shape: tuple[int, ...]) -> list[str]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    with torch.no_grad():  # layer scales start at 1e-6; make them matter so the error check means something
        for pname, p in model.named_parameters():
            if "layer_scale" in pname:
                p.uniform_(0.5, 1.5)
    before = fold_constants(trace(model))
    all_before, const_before = _muls(before)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = asr_fx.fuse(model)
    seconds = time.perf_counter() - start
    all_after, const_after = _muls(fused)
    report = asr_fx.fusion_report(fused)
    x = torch.randn(shape)
    with torch.no_grad():
        err = _err(model(x), fused(x))
    return [name, str(all_before), str(const_before), str(report.muls_removed), str(const_after), str(all_after),
            f"{count_parameters(model):,} -> {count_parameters(fused):,}", f"{seconds:.2f}", f"{err:.1e}"]


def measure_resnet152() -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet152().eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    asr = asr_fx.instrument(model)
    mid, cpu_mid = time.perf_counter(), time.process_time()
    fused = asr_fx.fuse(asr.eval(), strict=True)
    end, cpu_end = time.perf_counter(), time.process_time()
    report = asr_fx.fusion_report(fused)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        err = _err(asr(x), fused(x))
    return [f"{mid - start:.2f} ({cpu_mid - cpu_start:.2f})", f"{end - mid:.2f} ({cpu_end - cpu_mid:.2f})",
            f"{end - start:.2f} ({cpu_end - cpu_start:.2f})", str(report.muls_removed),
            f"{count_parameters(fused) == count_parameters(model)}", f"{err:.1e}"]


def main() -> None:
    lines = [
        "| model (random weights) | Mul nodes | constant Muls | removed by fuse | constant Muls left | Mul nodes left "
        "| parameters | fuse s | max rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape in (("convnext_tiny", (1, 3, 64, 64)), ("swin_t", (1, 3, 64, 64))):
        lines.append("| " + " | ".join(measure_uninstrumented(name, shape)) + " |")
    lines += [
        "",
        "| ResNet-152 | instrument s (CPU s) | fuse s (CPU s) | total s (CPU s) | sites folded | fused params == "
        "vanilla | max rel err |",
        "|---|---|---|---|---|---|---|",
        "| resnet152 | " + " | ".join(measure_resnet152()) + " |",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "fold_counts.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
