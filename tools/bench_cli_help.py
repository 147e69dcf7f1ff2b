"""CPU time of ``asr-fx --help``, ``asr-fx --version`` and every ``asr-fx CMD --help`` (a benchmark, not a test).

Each command line runs ``--runs`` times as a fresh subprocess (the installed ``asr-fx`` console script,
or ``python -m asr_fx.cli`` with ``--module``); its CPU time (user + system, from the kernel's
accounting of the finished child) and its wall time are recorded; the table gives min and median.
The target is well under 1 s of CPU: help must not import torch.

    python tools/bench_cli_help.py                 # writes tools/results/bench_cli_help.md
    python tools/bench_cli_help.py --runs 3 --no-write
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

from _bench_common import machine, report
from tabulate import tabulate

COMMANDS = ("demo", "fuse", "verify", "inspect", "stripe")
TARGET_CPU_S = 1.0


def timed_run(argv: list[str]) -> tuple[float, float]:
    """``(cpu seconds, wall seconds)`` of one run of ``argv`` (which must exit 0)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command line (default 5)")
    parser.add_argument("--module", action="store_true", help="run `python -m asr_fx.cli` instead of `asr-fx`")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write tools/results/")
    args = parser.parse_args()
    script = shutil.which("asr-fx", path=os.path.dirname(sys.executable)) or shutil.which("asr-fx")
    base = [sys.executable, "-m", "asr_fx.cli"] if args.module or not script else [script]
    lines = [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS)]
    rows, worst = [], 0.0
    for extra in lines:
        cpu, wall = zip(*(timed_run([*base, *extra]) for _ in range(args.runs)))
        worst = max(worst, statistics.median(cpu))
        rows.append((f"asr-fx {' '.join(extra)}", f"{min(cpu):.3f}", f"{statistics.median(cpu):.3f}",
                     f"{min(wall):.3f}", f"{statistics.median(wall):.3f}"))
    settings = [f"machine: {machine()}",
                f"command: {' '.join(base)}; {args.runs} runs each, every run a fresh process; "
                "CPU = user + system time of the finished child"]
    body = tabulate(rows, headers=["command line", "CPU s (min)", "CPU s (median)", "wall s (min)", "wall s (median)"],
                    disable_numparse=True) + "\n"
    verdict = "under" if worst < TARGET_CPU_S else "OVER"
    notes = [f"slowest median CPU time {worst:.3f} s: {verdict} the {TARGET_CPU_S:g} s target",
             "help and --version build the parser only; torch loads when a command runs",
             "wall time includes waiting for a CPU on a busy machine (see the load average above)"]
    report("bench_cli_help.md", "bench_cli_help: CPU time of asr-fx --help", settings, body, notes,
           write=not args.no_write)


if __name__ == "__main__":
    main()
