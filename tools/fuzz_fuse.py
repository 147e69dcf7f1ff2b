"""Fuzz ``asr_fx.fuse`` with random programs and print what failed, by category, with every failing seed.

    OMP_NUM_THREADS=1 python tools/fuzz_fuse.py --programs 10000 --seed 0
    OMP_NUM_THREADS=1 python tools/fuzz_fuse.py --programs 1000 --seed 0 --include-known-bugs
    OMP_NUM_THREADS=1 python tools/fuzz_fuse.py --only 1234          # rerun one seed, print its spec

Program ``i`` is ``random_spec(seed + i)`` from ``tools/testkit/fuzz_programs.py``. By default the generator
leaves out the features of ``KNOWN_BUGS`` (open bugs of issue 14); ``--include-known-bugs`` puts them
back (``--include KEY`` for one). ``--markdown FILE`` also writes the table as markdown.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time

import torch

from testkit.fuzz_programs import CATEGORIES, KNOWN_BUGS, check_program, random_spec, reproducer


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=1000, help="how many programs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--max-ops", type=int, default=8, help="ops per program at most (default 8)")
    parser.add_argument("--include-known-bugs", action="store_true", help="generate the KNOWN_BUGS features too")
    parser.add_argument("--include", action="append", default=[], choices=sorted(KNOWN_BUGS),
                        help="generate this KNOWN_BUGS feature too (repeatable)")
    parser.add_argument("--only", type=int, help="run this one seed and print its spec and failures")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    parser.add_argument("--show", type=int, default=50, help="failing seeds listed per category (default 50)")
    return parser.parse_args()


def main() -> int:
    args = _parse()
    torch.set_num_threads(1)
    exclude = set() if args.include_known_bugs else set(KNOWN_BUGS) - set(args.include)
    if args.only is not None:
        spec = random_spec(args.only, exclude, args.max_ops)
        failures, outcome = check_program(spec)
        print(reproducer(spec))
        print(f"outcome: {outcome}")
        for f in failures:
            print(f"  {f.category}: {f.message}")
        return 1 if failures else 0
    start = time.perf_counter()
    outcomes: collections.Counter[str] = collections.Counter()
    failing: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    failed_programs = 0
    refused: list[tuple[int, str]] = []
    for seed in range(args.seed, args.seed + args.programs):
        spec = random_spec(seed, exclude, args.max_ops)
        failures, outcome = check_program(spec)
        outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith("refused"):
            refused.append((seed, outcome))
        failed_programs += bool(failures)
        for category in dict.fromkeys(f.category for f in failures):
            failing[category].append((seed, next(f.message for f in failures if f.category == category)))
    elapsed = time.perf_counter() - start
    lines = _table(args, exclude, outcomes, failing, failed_programs, elapsed)
    if refused:
        lines[-1:-1] = [f"## refused by fuse with an ASRError (not failures): {len(refused)} program(s)", ""] + \
            [f"- seed {seed}: {why}" for seed, why in refused[:args.show]] + [""]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 1 if failed_programs else 0


def _table(args, exclude, outcomes, failing, failed_programs, elapsed) -> list[str]:
    left_out = ", ".join(sorted(exclude)) or "nothing (all known-bug features generated)"
    lines = [
        f"# fuzz_fuse: {args.programs} programs from seed {args.seed}",
        "",
        f"Command: `OMP_NUM_THREADS=1 python tools/fuzz_fuse.py --programs {args.programs} --seed {args.seed}"
        + (" --include-known-bugs" if args.include_known_bugs else "")
        + "".join(f" --include {k}" for k in args.include) + f"` (max {args.max_ops} ops per program)",
        f"Left out (KNOWN_BUGS): {left_out}",
        f"Machine: {platform.machine()}, torch {torch.__version__}, 1 thread; {elapsed:.0f} s "
        f"({1000 * elapsed / max(1, args.programs):.0f} ms per program)",
        "",
        "| programs | fused | refused (ASRError) | failing programs | equivalence | unreported leftover | crash "
        "| input mutated | dtype |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.programs} | {outcomes['fused']} | {outcomes['refused']} | {failed_programs} | "
        + " | ".join(str(len(failing.get(c, []))) for c in CATEGORIES) + " |",
        "",
    ]
    for category in CATEGORIES:
        seeds = failing.get(category, [])
        if not seeds:
            continue
        lines.append(f"## {category}: {len(seeds)} program(s)")
        lines.append("")
        for seed, message in seeds[:args.show]:
            lines.append(f"- seed {seed}: {message}")
        if len(seeds) > args.show:
            lines.append(f"- ... and {len(seeds) - args.show} more: "
                         + " ".join(str(s) for s, _ in seeds[args.show:]))
        lines.append("")
    lines.append("Rerun one: `python tools/fuzz_fuse.py --only SEED" +
                 (" --include-known-bugs" if args.include_known_bugs else "") + "`")
    return lines


if __name__ == "__main__":
    sys.exit(main())
