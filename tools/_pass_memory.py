"""Peak memory and time of ``instrument`` and ``fuse`` on big models, one model per subprocess.

Each step's peak is the resident set (RSS, sampled every 2 ms by a thread) above what was resident when
the step started (after ``gc.collect`` and glibc's ``malloc_trim``, so freed memory is not counted as
resident), as a multiple of the model's bytes (parameters and buffers). One whole copy of the model
is 1.0x. Run a row alone: ``python tools/_pass_memory.py vit_large_patch16_224`` prints one JSON line.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import asr_fx

#: row name -> (builder, input shape); timm models from configs, random weights, no download
MODELS: dict[str, tuple[str, tuple[int, ...]]] = {
    "vit_small_patch16_224": ("timm", (1, 3, 224, 224)),
    "vit_base_patch16_224": ("timm", (1, 3, 224, 224)),
    "vit_large_patch16_224": ("timm", (1, 3, 224, 224)),
    "vit_huge_patch14_224": ("timm", (1, 3, 224, 224)),
    "convnext_large": ("timm", (1, 3, 224, 224)),
    "cifar_resnet164": ("asr_fx", (1, 3, 32, 32)),
}
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident set in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def settle() -> None:
    """Free what can be freed and hand it back to the OS, so RSS is what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then include freed memory
        pass


def peak_of(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``(result, seconds, peak RSS above the start in bytes)`` of ``fn()``."""
    settle()
    start = rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss())
    return out, seconds, peak[0] - start


def build(name: str) -> nn.Module:
    kind, _ = MODELS[name]
    torch.manual_seed(0)
    if kind == "timm":
        import timm  # optional dependency of the tools

        return timm.create_model(name, pretrained=False).eval()
    from asr_fx.models import resnet164

    return resnet164().eval()


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def available() -> int:
    """Bytes the kernel says a new allocation can get (``MemAvailable``)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def planned_bytes(name: str) -> int:
    """The model's bytes, from a build on the meta device (no memory)."""
    with torch.device("meta"):
        return model_bytes(build(name))


#: free memory needed, in model sizes: the model and instrument's copy (the check holds no gradient set and
#: keeps the activations it saves for the backward in a temporary file), with some room
NEED_CHECKED, NEED_UNCHECKED = 3.0, 3.0


def _has_inplace(fn: Callable[..., Any]) -> bool:
    return "inplace" in inspect.signature(fn).parameters


def measure_row(name: str, inplace: bool) -> dict[str, Any]:
    """One model: build, then instrument and fuse, each step's time and peak above its start."""
    if inplace and not (_has_inplace(asr_fx.instrument) and _has_inplace(asr_fx.fuse)):
        return {"model": name, "inplace": True, "note": "this asr-fx has no inplace= on instrument and fuse"}
    planned, free = planned_bytes(name), available()
    if free < NEED_UNCHECKED * planned:
        return {"model": name, "inplace": inplace, "note": f"skipped: {free / 2**30:.1f} GiB free on the shared "
                f"machine, {NEED_UNCHECKED * planned / 2**30:.1f} GiB needed"}
    checks = free >= NEED_CHECKED * planned
    model = build(name)
    x = torch.randn(MODELS[name][1])
    size = model_bytes(model)
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()), "bytes": size,
                           "inplace": inplace, "rss_built": rss()}
    extra = {"inplace": True} if inplace else {}
    if not checks:
        row["note"] = (f"checks off: {free / 2**30:.1f} GiB free on the shared machine, "
                       f"{NEED_CHECKED * planned / 2**30:.1f} GiB needed with them")
    # the passes alone (check=False), then as called by default (the numerical self-check: forward and gradients);
    # inplace=True changes the model, so each inplace step starts from a model built (and instrumented) again
    asr, row["instrument_nocheck_s"], up = peak_of(
        lambda m=model: asr_fx.instrument(m, example_inputs=(x,), check=False, **extra))
    row["instrument_nocheck_x"] = up / size
    if checks:
        del asr
        if inplace:
            model = build(name)
        asr, row["instrument_s"], up = peak_of(lambda m=model: asr_fx.instrument(m, example_inputs=(x,), **extra))
        row["instrument_x"] = up / size
    del model

    def instrumented() -> nn.Module:
        made = asr if not inplace else asr_fx.instrument(build(name), example_inputs=(x,), check=False, inplace=True)
        with torch.no_grad():  # psi off its init, so the folds are not trivial
            for key, p in made.named_parameters():
                if key.startswith("asr."):
                    p.add_(0.1)
        return made.eval()

    asr = instrumented()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, row["fuse_nocheck_s"], up = peak_of(lambda: asr_fx.fuse(asr, example_inputs=(x,), check=False, **extra))
        row["fuse_nocheck_x"] = up / size
        if checks:
            del fused
            if inplace:
                del asr
                settle()
                asr = instrumented()
            fused, row["fuse_s"], up = peak_of(lambda: asr_fx.fuse(asr, example_inputs=(x,), **extra))
            row["fuse_x"] = up / size
    row["rss_end"] = rss()
    return row


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(measure_row(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "inplace")), flush=True)
