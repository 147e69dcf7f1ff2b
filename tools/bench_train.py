"""Training cost of ASR on ResNet-50: step time and peak step memory, ratios to vanilla.

Variants, all with the attention at the same sites (the last BN of every bottleneck):
- vanilla: torchvision ResNet-50;
- ASR(SE) via ``asr_fx.instrument`` (a traced GraphModule with ``asr.<site>`` blocks);
- ASR(SE) via ``asr_fx.instrument(..., norm_fused=True)``: each block computes its BN with affine
  ``gamma * v, beta * v`` (the same function, no ``x * v`` activation kept for backward);
- ASR(SE) hand-written: the authors' style, each ``bn3`` replaced by an ``ASRBatchNorm2d`` module
  (BatchNorm2d then ``x * sigmoid(F(psi))`` inside the same module; written here, not shipped);
- SE: input-dependent Squeeze-and-Excitation after the same BNs (the paper's baseline);
- what-if: the hand-written block computed as BN with affine ``gamma * v, beta * v`` (the same function;
  shows what a training-time fold into BN would save: the activation ``x * v`` keeps for backward).

A training step is forward + cross-entropy + backward + SGD(momentum) step on a fixed random batch.
Step times are interleaved (all variants once per round, shuffled); the ratio is the median of the
per-round ratios to vanilla [25th-75th percentile]. Peak memory is the highest total of the CPU
allocations live during one step, over what was allocated before it (activations, gradients,
temporaries; parameters and optimizer state excluded), from the torch profiler's memory events.

    OMP_NUM_THREADS=1 python tools/bench_train.py        # writes tools/results/bench_train.md
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from _bench_common import (
    fmt_ms,
    fmt_ratio,
    machine,
    n_params,
    ratio_stats,
    set_threads,
    sites_of,
    spread_pct,
    table,
    time_interleaved,
    with_se,
    write_results,
)
from torch import nn
from torchvision.models.resnet import Bottleneck

import asr_fx


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


class ASRBatchNorm2dAffine(ASRBatchNorm2d):
    """The same function, computed as BN with affine ``gamma * v, beta * v`` (Eq. 7 holds in training too):
    no ``x * v`` product, so no extra activation is kept for backward. A what-if, not what asr-fx does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.sigmoid(self.fc2(F.relu(self.fc1(self.psi)))).reshape(-1)
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight * v, self.bias * v,
                            self.training, self.momentum, self.eps)


def hand_written(vanilla: nn.Module, cls: type = ASRBatchNorm2d) -> nn.Module:
    import copy

    model = copy.deepcopy(vanilla)
    for block in model.modules():
        if isinstance(block, Bottleneck):
            old = block.bn3
            new = cls(old.num_features)
            new.load_state_dict(old.state_dict(), strict=False)
            block.bn3 = new
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def peak_step_bytes(step) -> int:
    """Peak of live CPU allocations during one ``step()``, relative to its start (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--memory-batch", type=int, default=32,
                        help="also measure peak step memory at this batch (activations weigh more); 0: skip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    vanilla = torchvision.models.resnet50(num_classes=10)
    start = time.perf_counter()
    instrumented = asr_fx.instrument(vanilla)
    instrument_s = time.perf_counter() - start
    sites = sites_of(instrumented)
    norm_fused = asr_fx.instrument(vanilla, norm_fused=True)
    norm_fused.load_state_dict(instrumented.state_dict())
    models = {
        "vanilla": vanilla,
        "ASR(SE) asr_fx.instrument": instrumented,
        "ASR(SE) asr_fx.instrument(norm_fused=True)": norm_fused,
        "ASR(SE) hand-written ASRBatchNorm2d": hand_written(vanilla),
        "SE (input-dependent)": with_se(vanilla, sites),
        "what-if: hand-written, v folded into BN affine": hand_written(vanilla, ASRBatchNorm2dAffine),
    }
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    steps = {name: make_step(m, x, y) for name, m in models.items()}
    for step in steps.values():  # optimizer state exists before anything is measured
        step()
    peaks = {name: [peak_step_bytes(step) for _ in range(2)] for name, step in steps.items()}
    times = time_interleaved(steps, args.rounds, warmup=1)
    rows = []
    for name in models:
        peak = max(peaks[name])
        rows.append({
            "variant": name,
            "params": f"{n_params(models[name]):,}",
            "step ms": f"{fmt_ms(sorted(times[name])[len(times[name]) // 2])} {spread_pct(times[name])}",
            "step / vanilla": fmt_ratio(ratio_stats(times[name], times["vanilla"])) if name != "vanilla" else "1",
            "peak step MB": f"{peak / 2**20:.1f}",
            "peak / vanilla": f"{peak / max(peaks['vanilla']):.3f}",
        })
    if args.memory_batch:
        xb = torch.randn(args.memory_batch, 3, args.size, args.size)
        yb = torch.randint(0, 10, (args.memory_batch,))
        big = {}
        for name, m in models.items():
            step = make_step(m, xb, yb)
            step()
            big[name] = max(peak_step_bytes(step) for _ in range(2))
        for row, name in zip(rows, models):
            row[f"peak MB, batch {args.memory_batch}"] = f"{big[name] / 2**20:.1f}"
            row[f"/ vanilla, batch {args.memory_batch}"] = f"{big[name] / big['vanilla']:.3f}"
    settings = [
        f"machine: {machine()}",
        f"torchvision ResNet-50 (10 classes, random init), batch {args.batch} of {args.size}x{args.size}, "
        f"SGD momentum 0.9, weight decay 1e-4; {len(sites)} sites (last BN of each bottleneck); "
        f"instrument took {instrument_s:.2f} s",
        f"{args.rounds} interleaved rounds of one step per variant (shuffled order); step ms: median ± half the "
        "IQR over the median; ratio: median of per-round ratios [25th-75th percentile]",
        "peak step MB: the highest total of live CPU allocations during one step above the level at its start "
        "(torch profiler memory events; max of 2 steps); it includes the new parameters' gradients "
        "and the tensors x * v saves for backward",
        "command: `OMP_NUM_THREADS=1 python tools/bench_train.py`",
    ]
    body = table(rows)
    print("\n".join(settings))
    print(body)
    if not args.no_write:
        print(f"wrote {write_results('bench_train.md', 'bench_train: ResNet-50 training step', settings, body)}")


if __name__ == "__main__":
    main()
