"""One model of any zoo through the asr-fx pipeline (used by tools/zoo_sweep.py ``--zoo`` and the zoo tests).

instrument -> one SGD step -> eval (batch independence) -> fuse(strict=True) -> parameters against
``fuse(vanilla)`` -> ONNX verified in onnxruntime. A detector (list of images in, boxes out) skips the
SGD step (it needs targets) and the ONNX export, and passes when the fused model's eval outputs match
the instrumented one's.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

import asr_fx
from asr_fx.config import ASRConfig
from asr_fx.equivalence import floating_tensors
from asr_fx.partial_capture import part_probe

from .model_kept import KeptModel
from .zoos import Entry

#: larger models are skipped: the sweep runs on a shared CPU machine (each stage holds several copies).
#: timm models over 60M parameters are first built from a reduced config (testkit.zoos.SHRINK_KWARGS);
#: one whose constructor takes none of those keywords runs as it is up to this limit (PNASNet, 82M)
MAX_PARAMS = 100_000_000
#: sizes tried for an entry without its own list, after its own size
FALLBACK_SIZES = (96, 128, 160, 224)
STAGES = ("build", "instrument", "train", "eval", "fuse", "onnx")


@dataclass
class ZooRow:
    model: str
    sites: int = 0
    parts: int = 0
    form: str = ""
    fuse_err: float = math.nan
    ort_err: float = math.nan
    params_ok: bool = False
    status: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    input: str = ""  # the input size the model ran at
    config: str = ""  # constructor keywords of a reduced config
    kept: str = ""  # "yes" where instrument and fuse left the user's model as it was, else what changed
    commit: str = ""  # the code the row was run at (set by tools/zoo_sweep.py)
    onnx_note: str = ""  # why no ONNX comparison was made, where the vanilla model does not export either

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _rel(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
        return math.inf
    worst = 0.0
    for a, b in zip(ref, out):
        if a.numel():
            worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item())
    return worst


def _reference_params(vanilla: torch.nn.Module, model: torch.nn.Module, x: tuple | None,
                      fused: torch.nn.Module | None = None) -> int:
    """The parameter count the fused model must have: the vanilla model's where ``fused`` is the user's own
    class (the module form, its layer scales kept as ones), else that of ``fuse(vanilla)`` (a GraphModule:
    the model's own constant scales folded too); for a partially captured ``model``, part by part."""
    config = asr_fx.get_config(model) or {}
    parts = config.get("parts")
    if not parts:
        if not isinstance(fused if fused is not None else model, torch.fx.GraphModule):
            return asr_fx.count_parameters(vanilla)
        return asr_fx.count_parameters(asr_fx.fuse(vanilla, example_inputs=x, check=False))
    total = asr_fx.count_parameters(vanilla)
    for path in parts:
        part = vanilla.get_submodule(path)
        probe = part_probe(ASRConfig.from_dict(config), path, None)
        fused_part = fused.get_submodule(path) if fused is not None else None
        total += _reference_params(part, model.get_submodule(path), probe, fused_part) - asr_fx.count_parameters(part)
    return total


def _runs(model: torch.nn.Module, entry) -> Exception | None:  # noqa: ANN001 - testkit.zoos.Entry
    try:
        with torch.no_grad():
            model(*entry.inputs(2, 1))
        return None
    except Exception as exc:  # noqa: BLE001 - does not take this size
        return exc


def _built(entry: Entry) -> tuple[torch.nn.Module, Entry]:
    """``(vanilla model in eval mode, entry at its input size)``: the smallest size the model runs a batch of 2
    at, from the entry's ``sizes`` (built for each size with ``entry.sized``), else its own size and then
    :data:`FALLBACK_SIZES`. Raises when none fits, naming the sizes tried and the last error."""
    sizes = entry.sizes or (entry.size, *(s for s in FALLBACK_SIZES if s > entry.size))
    last: Exception | None = None
    vanilla = None
    for size in sizes:
        candidate = dataclasses.replace(entry, size=size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if entry.sized is not None or vanilla is None:
                vanilla = (entry.sized(size) if entry.sized is not None else entry.build()).eval()
        if asr_fx.count_parameters(vanilla) > MAX_PARAMS:
            return vanilla, candidate  # skipped by the caller; no need to run it
        last = _runs(vanilla, candidate)
        if last is None:
            return vanilla, candidate
        gc.collect()
    raise RuntimeError(f"the model runs at none of the input sizes {list(sizes)} (batch 2): "
                       f"{type(last).__name__}: {str(last).strip().splitlines()[0] if str(last).strip() else ''}")


def _vanilla_export_failure(vanilla: torch.nn.Module, x: torch.Tensor, folder: Path) -> str:
    """Why the vanilla model itself does not export to ONNX (torch.onnx's error), or ``""`` when it does."""
    try:
        asr_fx.export_onnx(vanilla.eval(), folder / "vanilla.onnx", x, verify=False)
    except Exception as exc:  # noqa: BLE001 - the reason goes into the row
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the vanilla model does not export either: {type(exc).__name__}: {first[:120]}"
    return ""


def run_entry(name: str, entry: Entry, onnx: bool = True) -> ZooRow:
    """Run the pipeline on one zoo entry; never raises (the row's status says what failed).

    Around the whole run, also where a pass raised, the vanilla model must be left as it was
    (:mod:`testkit.model_kept`, and the same outputs): a change fails the row whatever else happened."""
    row = ZooRow(name)
    stage, start = "build", time.perf_counter()
    kept: KeptModel | None = None

    def lap(next_stage: str) -> None:
        nonlocal stage, start
        row.seconds[stage] = round(time.perf_counter() - start, 1)
        stage, start = next_stage, time.perf_counter()

    try:
        torch.manual_seed(0)
        vanilla, entry = _built(entry)
        row.input = "x".join(map(str, entry.signal)) if entry.signal else f"{entry.size}"
        row.config = ", ".join(f"{k}={v}" for k, v in entry.shrunk.items())
        size = asr_fx.count_parameters(vanilla)
        if size > MAX_PARAMS:
            row.status = f"skipped: {size / 1e6:.0f}M parameters, over this CPU sweep's {MAX_PARAMS // 10**6}M"
            return row
        x = entry.inputs(2, 1)
        kept = KeptModel.take(vanilla, x)
        lap("instrument")
        model = asr_fx.instrument(vanilla, example_inputs=x)
        config = asr_fx.get_config(model)
        assert config is not None  # instrument records its config on the model it returns
        row.sites, row.parts = len(config["sites"]), len(config.get("parts") or [])
        row.form = config.get("form") or "graph"
        lap("train")
        if not entry.detector:
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            outputs = floating_tensors(model(*entry.inputs(2, 2)))
            loss = cast(torch.Tensor, sum(t.float().pow(2).mean() for t in outputs))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        lap("eval")
        model.eval()
        with torch.no_grad():
            ref = floating_tensors(model(*x))
            if not entry.detector:
                one = floating_tensors(model(x[0][:1]))
                alone = _rel([t[:1] for t in ref], [t[:1] for t in one])
                if not alone <= 1e-4:
                    raise AssertionError(f"eval output depends on the rest of the batch (rel. {alone:.2g})")
        lap("fuse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = asr_fx.fuse(model, strict=True, example_inputs=x)
            want = _reference_params(vanilla, model, x, fused)
        with torch.no_grad():
            row.fuse_err = _rel(ref, floating_tensors(fused(*x)))
        row.params_ok = asr_fx.count_parameters(fused) == want
        lap("onnx")
        if onnx and not entry.detector:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    report = asr_fx.export_onnx(fused, Path(tmp) / "fused.onnx", x[0], reference=model)
                    row.ort_err = max(o.max_rel for o in report.outputs)
                except Exception:
                    row.onnx_note = _vanilla_export_failure(vanilla, x[0], Path(tmp))
                    if not row.onnx_note:
                        raise  # the vanilla model exports: the fused one must too
        lap("done")
        problems = []
        if not row.fuse_err <= 1e-5:
            problems.append(f"fuse error {row.fuse_err:.2g} > 1e-5")
        if not row.params_ok:
            problems.append(f"parameters {asr_fx.count_parameters(fused)} != fuse(vanilla) {want}")
        if onnx and not entry.detector and not row.onnx_note and not row.ort_err <= 1e-4:
            problems.append(f"onnxruntime error {row.ort_err:.2g} > 1e-4")
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # noqa: BLE001 - one row per model, whatever happened
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.status = f"error in {stage}: {type(exc).__name__}: {first[:400]}"
        row.seconds[stage] = round(time.perf_counter() - start, 1)
        if stage == "build":
            row.status = "skipped: " + row.status
    finally:
        if kept is not None:
            row.kept = kept.what_changed() or "yes"
            if row.kept != "yes":
                row.status = f"CHANGED the user's model: {row.kept}; " + row.status
        gc.collect()
    return row
