"""The attention networks table: every registered attention at one site of C channels.

For each attention network this builds a small model with one ASR site of ``C`` channels (a
conv -> BN -> ReLU -> pool -> linear net, the site after the BN), instruments it, moves psi and the
attention weights away from their start, fuses, and reports what it measured:

- psi shape: ``attention.psi_shape`` for ``C`` channels;
- added in training: parameters of the instrumented model minus the vanilla model's (psi + theta);
- added after fusion: parameters of the fused model minus the vanilla model's (should be 0);
- fuse error: max|fused - instrumented| / max|instrumented| on random inputs (DESIGN.md: <= 1e-5).

Usage: ``python tools/attention_table.py [--channels 256] [--no-write]``; writes tools/results/attention_table.md
(the docs site's results page comes from it: ``python tools/gen_docs.py``).
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch import nn

import asr_fx
from _bench_common import machine, report
from asr_fx import attention, count_parameters


def one_site_net(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    ).eval()


def measure(name: str, channels: int) -> dict[str, object]:
    torch.manual_seed(0)
    vanilla = one_site_net(channels)
    model = asr_fx.instrument(vanilla, attention=name, sites=["1"])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.startswith("asr."):
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    return {
        "attention": name,
        "network": type(attention.create(name, channels)).__name__,
        "psi shape": str(tuple(attention.create(name, channels).psi_shape)),
        "added in training": count_parameters(model) - count_parameters(vanilla),
        "added after fusion": count_parameters(fused) - count_parameters(vanilla),
        "fuse error": f"{((out - ref).abs().max() / ref.abs().max()).item():.1e}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write tools/results/attention_table.md")
    args = parser.parse_args(argv)
    papers_order = ["se", "eca", "srm", "ie", "spa", "cbam"]
    registered = attention.names()
    order = [n for n in papers_order if n in registered] + [n for n in registered if n not in papers_order]
    rows = [measure(name, args.channels) for name in order]
    settings = [f"machine: {machine()}",
                f"one ASR site of C = {args.channels} channels after a BatchNorm; psi and the attention weights moved "
                "off their start (+0.5 * N(0, 1)); fuse error = max|fused - instrumented| / max|instrumented|",
                "command: `python tools/attention_table.py`"]
    body = tabulate(rows, headers="keys", tablefmt="github", disable_numparse=[5])
    report("attention_table.md", "attention_table: what each attention network adds, in training and after fusion",
           settings, body, [], write=not args.no_write)


if __name__ == "__main__":
    main()
