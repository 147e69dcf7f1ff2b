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

from _bench_common import machine, report
from tabulate import tabulate

from asr_fx import attention
from testkit.attention_costs import measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not write tools/results/attention_table.md")
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
