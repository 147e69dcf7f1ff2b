"""Training cost of ASR on ResNet-50: step time and peak step memory, ratios to vanilla; eager and torch.compile.

Variants, all with the attention at the same sites (the last BN of every bottleneck):
- vanilla: torchvision ResNet-50;
- ASR(SE) via ``asr_fx.instrument``, the own-model form (the default: the user's ``ResNet`` itself, each
  site's BatchNorm swapped for its BN-affine subclass, which computes BN with affine ``gamma * v, beta * v``,
  the same function, so no ``x * v`` activation is kept for backward; every ``v`` computed by a pre-hook on
  the model before its first layer, so the attention backward runs last);
- ASR(SE) in the graph form (a GraphModule: the blocks in the traced graph, the BN-affine training form,
  and every ``v`` computed in the graph before the first layer; what ``instrument`` returned before the
  own-model form);
- ASR(SE) via ``asr_fx.instrument(..., bn_affine_form=False)`` (own model, every block a forward hook ``x * v``);
- ASR(SE) hand-written: the authors' style, each ``bn3`` replaced by an ``ASRBatchNorm2d`` module
  (BatchNorm2d then ``x * sigmoid(F(psi))`` inside the same module; written here, not shipped);
- SE: input-dependent Squeeze-and-Excitation after the same BNs (the paper's baseline).

A training step is forward + cross-entropy + backward + SGD(momentum) step on a fixed random batch.
Step times are interleaved (all variants once per round, shuffled); the ratio is the median of the
per-round ratios to vanilla [25th-75th percentile]. Peak memory is the highest total of the CPU
allocations live during one step, over what was allocated before it (activations, gradients,
temporaries; parameters and optimizer state excluded), from the torch profiler's memory events.

The main table is ResNet-50's own input size (224x224) at batch 8; the sweep repeats vanilla, the
default instrument, the graph form and the hand-written module at other sizes and batches, down to 64x64
at batch 8, where the gradients of the attention parameters (SE adds 10.8% parameters) weigh most.

torch.compile table (``--compile-size``/``--compile-batch``; ``--compile-size 0`` skips it): vanilla and
the default instrument, each compiled afresh (``torch.compiler.reset()``, inductor's FX graph cache off):
compile s is the wall time of the first compiled training step (Dynamo, AOTAutograd and the backend on
forward and backward, plus that one step), then the step time as above.

    OMP_NUM_THREADS=1 python tools/bench_train.py        # writes tools/results/bench_train.md (about 10 min)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
import torchvision
from _bench_common import (
    fmt_ms,
    fmt_ratio,
    machine,
    n_params,
    ratio_stats,
    report,
    set_threads,
    sites_of,
    spread_pct,
    table,
    time_interleaved,
    with_se,
)
from torch import nn
from torchvision.models.resnet import Bottleneck

import asr_fx
from asr_fx.passes import insert_asr, trace
from asr_fx.passes.forms.bn_affine_training_form import to_bn_affine_form
from asr_fx.passes.forms.hoist_attention_values import hoist_attention_values


class ASRBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d followed by ASR(SE) in one module, as the paper's authors write it."""

    def __init__(self, num_features: int, reduction: int = 16, min_hidden: int = 8, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        hidden = min(num_features, max(num_features // reduction, min_hidden))
        self.psi = nn.Parameter(torch.full((1, num_features, 1, 1), 0.1))
        self.fc1 = nn.Conv2d(num_features, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * torch.sigmoid(self.fc2(F.relu(self.fc1(self.psi))))


def hand_written(vanilla: nn.Module) -> nn.Module:
    model = copy.deepcopy(vanilla)
    for block in model.modules():
        if isinstance(block, Bottleneck):
            old = block.bn3
            new = ASRBatchNorm2d(old.num_features)
            new.load_state_dict(old.state_dict(), strict=False)
            block.bn3 = new
    return model


class TrainStep:
    """One training step of ``model`` on ``(x, y)``: zero the gradients (set to None), forward,
    cross-entropy, backward, SGD(momentum) step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.update()

    def update(self) -> None:
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()


def peak_step_bytes(step: TrainStep) -> int:
    """Peak of live CPU allocations during one step, over the level at its start (torch profiler).

    The old gradients are dropped before profiling starts: the profiler knows the sizes of blocks
    allocated under an earlier profile, so freeing them inside this one would lower the count.
    """
    from torch.profiler import ProfilerActivity, profile

    step.opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step.update()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def graph_form(vanilla: nn.Module, instrumented: nn.Module) -> nn.Module:
    """``instrumented``'s blocks (copies) in the graph form: a GraphModule of ``vanilla`` with each block after its
    site, the BN-affine training form and every ``v`` computed before the first layer (what ``instrument``
    returned before the own-model form; same state_dict)."""
    gm = trace(copy.deepcopy(vanilla))
    gm = insert_asr(gm, sites_of(instrumented), lambda site: copy.deepcopy(instrumented.asr[site.node]))
    to_bn_affine_form(gm)
    hoist_attention_values(gm)
    gm.load_state_dict(instrumented.state_dict())
    return gm


def measure(models: dict[str, nn.Module], batch: int, size: int, rounds: int) -> tuple[dict, dict]:
    """Step seconds (``rounds`` interleaved samples each) and peak step bytes (max of 2 steps) per variant."""
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    steps = {name: TrainStep(m, x, y) for name, m in models.items()}
    for step in steps.values():  # optimizer state exists before anything is measured
        step()
    peaks = {name: max(peak_step_bytes(step) for _ in range(2)) for name, step in steps.items()}
    times = time_interleaved(steps, rounds, warmup=1) if rounds else {}
    return times, peaks


def step_ratio(times: dict, name: str) -> str:
    return fmt_ratio(ratio_stats(times[name], times["vanilla"])) if name != "vanilla" else "1"


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """``"64x8,64x32"`` -> ``[(64, 8), (64, 32)]`` (input size x batch)."""
    try:
        return [(int(s), int(b)) for s, b in (item.split("x") for item in text.split(",") if item)]
    except ValueError:
        raise SystemExit(f"--sweep takes SIZExBATCH items separated by commas, e.g. 64x8,64x32; got {text!r}") from None


def compile_rows(vanilla: nn.Module, instrumented: nn.Module, batch: int, size: int, rounds: int,
                 backend: str) -> list[dict]:
    """torch.compile of vanilla and ``instrumented``: compile seconds (the first compiled step) and step time."""
    inductor_config.fx_graph_cache = False  # each compile does the whole work, as a first run does
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    steps, compile_s = {}, {}
    for name, model in (("vanilla", vanilla), ("ASR(SE) instrument (own model)", instrumented)):
        torch.compiler.reset()
        step = TrainStep(copy.deepcopy(model), x, y)
        step.model = torch.compile(step.model, backend=backend)
        start = time.perf_counter()
        step()
        compile_s[name] = time.perf_counter() - start
        steps[name] = step
    times = time_interleaved(steps, rounds, warmup=1)
    return [{
        "variant": name,
        "compile s": f"{compile_s[name]:.1f}",
        "compile / vanilla": f"{compile_s[name] / compile_s['vanilla']:.3f}",
        "step ms": f"{fmt_ms(statistics.median(times[name]))} {spread_pct(times[name])}",
        "step / vanilla": step_ratio(times, name),
    } for name in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--sweep", default="64x8,64x32,128x8", help="SIZExBATCH settings for the sweep table; '' "
                                                                    "skips it")
    parser.add_argument("--sweep-rounds", type=int, default=20)
    parser.add_argument("--compile-size", type=int, default=64,
                        help="input size of the torch.compile table; 0 skips it")
    parser.add_argument("--compile-batch", type=int, default=8)
    parser.add_argument("--compile-rounds", type=int, default=12)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sweep = parse_sweep(args.sweep)
    set_threads(args.threads)
    torch.manual_seed(0)
    vanilla = torchvision.models.resnet50(num_classes=10)
    start = time.perf_counter()
    instrumented = asr_fx.instrument(vanilla)
    instrument_s = time.perf_counter() - start
    if type(instrumented) is not type(vanilla):
        raise SystemExit(f"instrument returned a {type(instrumented).__name__}, not the model's own class")
    sites = sites_of(instrumented)
    ordinary = asr_fx.instrument(vanilla, bn_affine_form=False)
    ordinary.load_state_dict(instrumented.state_dict())
    default, graph = "ASR(SE) asr_fx.instrument: own model (default)", "ASR(SE) graph form (GraphModule, v first)"
    hand = "ASR(SE) hand-written ASRBatchNorm2d"
    models = {
        "vanilla": vanilla,
        default: instrumented,
        graph: graph_form(vanilla, instrumented),
        "ASR(SE) asr_fx.instrument(bn_affine_form=False): own model, hooks": ordinary,
        hand: hand_written(vanilla),
        "SE (input-dependent)": with_se(vanilla, sites),
    }
    times, peaks = measure(models, args.batch, args.size, args.rounds)
    rows = [{
        "variant": name,
        "params": f"{n_params(model):,}",
        "step ms": f"{fmt_ms(statistics.median(times[name]))} {spread_pct(times[name])}",
        "step / vanilla": step_ratio(times, name),
        "peak step MB": f"{peaks[name] / 2**20:.1f}",
        "peak / vanilla": f"{peaks[name] / peaks['vanilla']:.3f}",
    } for name, model in models.items()]
    extra_grad_bytes = 4 * (n_params(instrumented) - n_params(vanilla))
    sweep_rows = []
    for size, batch in sweep:
        few = {name: models[name] for name in ("vanilla", default, graph, hand)}
        s_times, s_peaks = measure(few, batch, size, args.sweep_rounds)
        row = {"input": f"{batch}x3x{size}x{size}", "vanilla step ms": fmt_ms(statistics.median(s_times["vanilla"])),
               "vanilla peak MB": f"{s_peaks['vanilla'] / 2**20:.1f}"}
        for label, name in (("own model", default), ("graph form", graph), ("hand-written", hand)):
            row[f"{label}: step / vanilla"] = step_ratio(s_times, name)
            row[f"{label}: peak / vanilla"] = f"{s_peaks[name] / s_peaks['vanilla']:.3f}"
        sweep_rows.append(row)
    compiled = compile_rows(vanilla, instrumented, args.compile_batch, args.compile_size, args.compile_rounds,
                            args.compile_backend) if args.compile_size else []
    settings = [
        f"machine: {machine()}",
        (f"torchvision ResNet-50 (10 classes, random init), batch {args.batch} of {args.size}x{args.size}, "
        f"SGD momentum 0.9, weight decay 1e-4; {len(sites)} sites (last BN of each bottleneck); "
        f"instrument took {instrument_s:.2f} s"),
        (f"{args.rounds} interleaved rounds of one step per variant (shuffled order; the sweep: {args.sweep_rounds}); "
        "step ms: median ± half the IQR over the median; ratio: median of per-round ratios [25th-75th percentile]"),
        ("peak step MB: the highest total of live CPU allocations during one step above the level at its start "
        "(torch profiler memory events; max of 2 steps); it includes the new parameters' gradients "
        f"({extra_grad_bytes / 2**20:.1f} MB for SE's {(n_params(instrumented) - n_params(vanilla)):,} parameters) "
        "and whatever x * v saves for backward"),
        ("own model: what asr_fx.instrument returns (the torchvision ResNet itself, BN-affine BatchNorm subclass at "
        "each site, every v computed by a pre-hook on the model before its first layer); graph form: the same blocks "
        "in a GraphModule with every v computed in the graph before the first layer "
        "(asr_fx.passes.forms.hoist_attention_values), instrument's earlier form"),
        *([(f"torch.compile (backend {args.compile_backend}): batch {args.compile_batch} of "
           f"{args.compile_size}x{args.compile_size}, {args.compile_rounds} interleaved rounds; compile s: the first "
           "compiled training step after torch.compiler.reset(), inductor FX graph cache off")] if compiled else []),
        (f"command: `OMP_NUM_THREADS=1 python tools/bench_train.py --threads {args.threads} --batch {args.batch} "
        f"--size {args.size} --rounds {args.rounds} --sweep '{args.sweep}' --sweep-rounds {args.sweep_rounds} "
        f"--compile-size {args.compile_size} --compile-batch {args.compile_batch} "
        f"--compile-rounds {args.compile_rounds} --compile-backend {args.compile_backend}`"),
    ]
    body = table(rows) + ("\n\nSweep:\n\n" + table(sweep_rows) if sweep_rows else "")
    body += "\n\ntorch.compile:\n\n" + table(compiled) if compiled else ""
    report("bench_train.md", "bench_train: ResNet-50 training step", settings, body, [], write=not args.no_write)


if __name__ == "__main__":
    main()
