"""Helpers shared by the benchmark tools (not shipped): interleaved timing, medians, tables, SE.

Timing discipline: every variant is timed in the same loop, in a shuffled order each round, so a
noisy neighbour slows all variants alike; a variant's ratio to vanilla is the median over rounds of
(its time / vanilla's time in the same round), with the 25th-75th percentile range as the spread.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

import asr_fx
from asr_fx.passes import insert_asr, trace
from asr_fx.stripe import input_se

RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(n: int) -> None:
    """Pin torch to ``n`` intra-op threads (the machine is shared; 1 keeps timings comparable)."""
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def commit() -> str:
    """The checked-out commit the numbers come from (short hash; ``+uncommitted`` when the tree differs)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)tools/results"],  # a sweep writes its own results as it goes
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown (not a git checkout)"
    return f"commit {sha}" + ("+uncommitted" if dirty else "")


def machine() -> str:
    """One line: CPU model, cores, torch/onnxruntime versions, threads, load average, UTC time."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import onnxruntime  # optional dependency: only to name its version

        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        ort = "-"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{cpu}, {os.cpu_count()} cores, no GPU; torch {torch.__version__}, onnxruntime {ort}; "
            f"{torch.get_num_threads()} torch thread(s); load average {load} (shared machine); {now}")


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    min_seconds: float = 0.0,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per call of every function, ``rounds`` samples each, variants shuffled within a round.

    One sample is the mean over as many back-to-back calls as fit in ``min_seconds`` (at least one).
    """
    rng = random.Random(seed)
    repeat = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        repeat[name] = max(1, int(min_seconds / max(once, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, n = fns[name], repeat[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ratio_stats(samples: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """Median and 25th/75th percentiles of the per-round ratios ``samples[i] / baseline[i]``."""
    ratios = [s / b for s, b in zip(samples, baseline)]
    return statistics.median(ratios), quantile(ratios, 0.25), quantile(ratios, 0.75)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.3f} [{lo:.3f}-{hi:.3f}]"


def spread_pct(samples: Sequence[float]) -> str:
    """Half the interquartile range over the median, in percent: the run-to-run noise of one variant."""
    med = statistics.median(samples)
    return f"±{50 * (quantile(samples, 0.75) - quantile(samples, 0.25)) / med:.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


def write_results(name: str, title: str, settings: Sequence[str], body: str) -> Path:
    """Write ``tools/results/<name>`` (markdown): title, settings as a list (and the code's commit), then the
    tables."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    lines = [f"# {title}", "", *(f"- {s}" for s in settings), f"- code: {commit()}", "", body.rstrip(), ""]
    path.write_text("\n".join(lines))
    return path


def report(name: str, title: str, settings: Sequence[str], body: str, notes: Sequence[str], write: bool) -> None:
    """Print the settings and tables (with a Notes list) and, when ``write``, save them with :func:`write_results`."""
    if notes:
        body += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print("\n".join(settings))
    print(body)
    if write:
        print(f"wrote {write_results(name, title, settings, body)}")


def with_se(model: nn.Module, sites: Sequence[Any], min_hidden: int = 8) -> fx.GraphModule:
    """``model`` traced, with input-dependent SE (:func:`asr_fx.stripe.input_se`: ``x * sigmoid(F(GAP(x)))``
    with the ``SqueezeExcite`` network ASR feeds with psi) after each of the ASR sites (as ``se.<key>``).

    ``min_hidden`` defaults to 8, the floor the benchmark tables were measured with (asr-fx's SE default
    before it took the paper's width ``round(C / 16)``); ``min_hidden=1`` gives the paper's width."""
    gm = trace(copy.deepcopy(model))
    return insert_asr(gm, sites, lambda site: input_se(site.channels, site.channel_pos, min_hidden=min_hidden),
                      container="se")


def sites_of(instrumented: nn.Module) -> list[Any]:
    """The :class:`asr_fx.Site` list ``instrument`` recorded on a model."""
    return [asr_fx.Site(**s) for s in asr_fx.get_config(instrumented)["sites"]]


def random_vit_head(vit: torch.nn.Module) -> torch.nn.Module:
    """torchvision zero-initialises ViT's classifier; random weights make the outputs worth comparing."""
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    torch.nn.init.normal_(vit.heads.head.bias, std=0.02)
    return vit


def randomise_asr(model: torch.nn.Module, seed: int = 0) -> None:
    """Move psi and the attention weights off their init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("asr."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
