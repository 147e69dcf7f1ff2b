"""The torchvision classification zoo through the whole pipeline, one model at a time (:func:`sweep_model`):
instrument (rule auto) -> one SGD step -> eval -> fuse -> ONNX export -> onnxruntime verify -> op multiset and
parameters against ``fuse(vanilla)``. Used by tools/zoo_sweep.py and the zoo tests."""

from __future__ import annotations

import collections
import gc
import math
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

import asr_fx

from .model_kept import KeptModel

SIZES = (32, 64, 96, 128, 160, 224)
#: ONNX's single-file limit: export_onnx writes no external data
ONNX_LIMIT_BYTES = 2**31

#: constructor arguments: the ViTs take a small image size; the aux heads only exist in train mode
#: and change the output type, so they are off
MODEL_KWARGS: dict[str, dict] = {
    "vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 32}, "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32}, "vit_h_14": {"image_size": 28},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@dataclass
class Row:
    model: str
    input: str = ""
    sites: int = 0
    rules: str = ""
    params_vanilla: int = 0
    params_fused: int = 0
    params_reference: int = 0
    fuse_err: float = math.nan
    ort_err: float = math.nan
    ops_equal: bool = False
    op_diff: str = ""
    status: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    kept: str = ""  # "yes" where instrument and fuse left the user's model as it was, else what changed
    commit: str = ""  # the code the row was run at (set by tools/zoo_sweep.py)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def smallest_input(model: torch.nn.Module, name: str) -> int:
    """The smallest size in ``SIZES`` (or the model's fixed one) a batch of 2 goes through in eval mode."""
    fixed = MODEL_KWARGS.get(name, {}).get("image_size")
    if fixed:
        return fixed
    with torch.no_grad():
        for size in SIZES:
            try:
                model(torch.zeros(2, 3, size, size))
                return size
            except Exception:  # noqa: BLE001 - too small: try the next size
                continue
    raise RuntimeError(f"{name} accepts none of the input sizes {SIZES}")


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    loss = (out - torch.linspace(-1, 1, out.numel()).reshape(out.shape)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # one step on random weights: keep it small
    opt.step()


def _op_diff(got: dict[str, int], want: dict[str, int]) -> str:
    keys = sorted(set(got) | set(want))
    return ", ".join(f"{k} {got.get(k, 0):+d}" if k not in want else f"{k} {got.get(k, 0) - want[k]:+d}"
                     for k in keys if got.get(k, 0) != want.get(k, 0))


def fx_op_counts(model: torch.nn.Module) -> dict[str, int]:
    """The op multiset of a traced model's graph: module classes, functions and methods it calls."""
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    counts: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[type(gm.get_submodule(str(node.target))).__name__] += 1
        elif node.op in ("call_function", "call_method"):
            counts[getattr(node.target, "__name__", str(node.target))] += 1
    return dict(counts)


def sweep_model(name: str, batch: int = 1, workdir: str | None = None, onnx: bool = True) -> Row:
    """Run the whole pipeline on one model; never raises (the row's status says what failed).

    ``onnx=False`` (the quick check of the default tests) skips the ONNX export and onnxruntime, and
    compares the fused graph's op multiset with ``fuse(vanilla)``'s in torch.fx instead.
    """
    row = Row(name)
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    kept: KeptModel | None = None
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vanilla = torchvision.models.get_model(name, weights=None, **MODEL_KWARGS.get(name, {})).eval()
        row.params_vanilla = asr_fx.count_parameters(vanilla)
        if row.params_vanilla * 4 >= ONNX_LIMIT_BYTES:
            row.status = (f"skipped: {row.params_vanilla / 1e6:.0f}M parameters exceed ONNX's 2 GiB single-file "
                          "limit (export_onnx writes no external data)")
            return row
        size = smallest_input(vanilla, name)
        row.input = f"{batch}x3x{size}x{size}"
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        x_train = torch.randn(max(2, batch), 3, size, size, generator=torch.Generator().manual_seed(2))
        kept = KeptModel.take(vanilla, (x,))
        model = asr_fx.instrument(vanilla, example_inputs=(x,))
        config = asr_fx.get_config(model)
        assert config is not None  # instrument records its config on the model it returns
        sites = config["sites"]
        row.sites = len(sites)
        row.rules = ", ".join(f"{k} {v}" for k, v in collections.Counter(s["rule"] for s in sites).items())
        _train_step(model, x_train)
        model.eval()
        with torch.no_grad():
            ref = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = asr_fx.fuse(model, example_inputs=(x,))
        unfolded = [str(w.message) for w in caught if "fold" in str(w.message).lower()]
        row.notes += unfolded[:1]
        with torch.no_grad():
            row.fuse_err = _rel(ref, fused(x))
        row.params_fused = asr_fx.count_parameters(fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the user's own class back (module form): the vanilla model itself is the reference
            reference = vanilla if type(fused) is type(vanilla) else asr_fx.fuse(vanilla, example_inputs=(x,))
        row.params_reference = asr_fx.count_parameters(reference)
        if onnx:
            report = asr_fx.export_onnx(fused, Path(tmp.name) / "fused.onnx", x, reference=model)
            row.ort_err = max(o.max_rel for o in report.outputs)
            got = report.op_counts
            want = asr_fx.export_onnx(reference, Path(tmp.name) / "vanilla.onnx", x, verify=False).op_counts
        else:
            got, want = fx_op_counts(fused), fx_op_counts(reference)
        row.ops_equal = got == want
        row.op_diff = _op_diff(got, want)
        problems = []
        if not row.fuse_err <= 1e-5:  # NaN fails too
            problems.append(f"fuse error {row.fuse_err:.2g} > 1e-5")
        if row.params_fused != row.params_reference:
            problems.append(f"parameters {row.params_fused} != vanilla {row.params_reference}")
        if not row.ops_equal:
            problems.append(f"ONNX ops differ from vanilla: {row.op_diff}")
        if onnx and not row.ort_err <= 1e-4:
            problems.append(f"onnxruntime error {row.ort_err:.2g} > 1e-4")
        row.status = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except Exception as exc:  # noqa: BLE001 - one row per model, whatever happened
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.status = f"error: {type(exc).__name__}: {first[:300]}"
        row.notes.append(traceback.format_exc(limit=3)[-600:])
    finally:
        if kept is not None:
            row.kept = kept.what_changed() or "yes"
            if row.kept != "yes":
                row.status = f"CHANGED the user's model: {row.kept}; " + row.status
        tmp.cleanup()
        row.seconds = time.perf_counter() - start
        gc.collect()
    return row
