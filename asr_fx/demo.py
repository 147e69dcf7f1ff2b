"""``asr-fx demo``: the whole ASR life cycle on the built-in CIFAR ResNet, on synthetic data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

import asr_fx
from asr_fx.cli import EXIT_OK, EXIT_VERIFY, _say
from asr_fx.cli_fuse import check_opset_option
from asr_fx.errors import ASRError


def _synthetic_batches(n: int, batch: int, seed: int):
    """Images whose class sets the mean of one colour channel: learnable, needs no download."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        x[:, 0] += (y.float() - 4.5).view(-1, 1, 1) * 0.3
        yield x, y


def _recalibrate_batchnorm(model: torch.nn.Module, batches) -> None:
    """Few-step training leaves BN running statistics near their initial values; re-estimate them
    (cumulative average over a few batches) so the eval-mode outputs are of a sane magnitude."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for m in norms:
        m.momentum = 0.1


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_out(out: Path) -> None:
    """``-o`` must be a folder (existing, or new in an existing parent): refused before any work."""
    if out.exists() and not out.is_dir():
        raise ASRError(f"demo -o {str(out)!r}: that is a file, not a folder; name a folder for the demo's files")
    if not out.parent.is_dir():
        raise ASRError(f"demo -o {str(out)!r}: its parent folder {str(out.parent)!r} does not exist; create it first")


def run_demo(args: argparse.Namespace) -> int:
    """``asr-fx demo``; the folder ``-o`` is removed again if the demo created it and fails before writing."""
    _check_out(args.out)
    check_opset_option(args)
    created = not args.out.exists()
    args.out.mkdir(exist_ok=True)
    try:
        return _demo(args)
    except BaseException:
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    factory, kwargs = "asr_fx.models:cifar_resnet", {"depth": args.depth, "num_classes": 10}
    vanilla = asr_fx.build(factory, **kwargs)
    model = asr_fx.instrument(vanilla, attention=args.attention, example_inputs=(torch.zeros(1, 3, 32, 32),))
    sites = asr_fx.get_config(model)["sites"]
    _say(args, f"instrumented ResNet-{args.depth} with ASR({args.attention}) at {len(sites)} sites "
               f"({sites[0]['module']}, {sites[1]['module']}, ...)")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(_synthetic_batches(args.steps, args.batch, args.seed)):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0 or step == args.steps - 1:
            _say(args, f"step {step + 1:3d}/{args.steps}  loss {loss.item():.3f}")
    train_s = time.perf_counter() - start
    _recalibrate_batchnorm(model, _synthetic_batches(8, args.batch, args.seed + 2))
    model.eval()

    ckpt = args.out / "asr_resnet.pt"
    asr_fx.save(model, ckpt)
    fused = asr_fx.fuse(model, strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        ref, out = model(x), fused(x)
    torch_err = ((ref - out).abs().max() / ref.abs().max()).item()

    vanilla_report = asr_fx.export_onnx(vanilla.eval(), args.out / "vanilla.onnx", x, opset=args.opset)
    # a VerificationError goes to main(), which reports it on stderr (and as JSON with --json), exit 1
    report = asr_fx.export_onnx(fused, args.out / "asr_fused.onnx", x, reference=model,
                                rtol=args.rtol, atol=args.atol, opset=args.opset)
    same_ops = report.op_counts == vanilla_report.op_counts
    rows = [
        ("sites (one per residual block)", len(sites)),
        ("training steps / seconds", f"{args.steps} / {train_s:.1f}"),
        ("parameters vanilla", f"{_params(vanilla):,}"),
        ("parameters instrumented (training)", f"{_params(model):,}"),
        ("parameters fused", f"{_params(fused):,}"),
        ("fused == vanilla parameter count", _params(fused) == _params(vanilla)),
        ("torch: max|fused - instrumented| / max|ref|", f"{torch_err:.2e}"),
        ("onnxruntime: max rel err vs instrumented", f"{report.outputs[0].max_rel:.2e}"),
        ("ONNX op multiset == vanilla's", same_ops),
        ("files", f"{ckpt}, {args.out / 'asr_fused.onnx'}"),
    ]
    ok = same_ops and _params(fused) == _params(vanilla) and torch_err <= 1e-5
    code = EXIT_OK if ok else EXIT_VERIFY
    if args.json:
        print(json.dumps({"ok": ok, "exit_code": code, "command": "demo", "depth": args.depth,
                          "attention": args.attention, "rtol": args.rtol, "atol": args.atol,
                          "report": {name: value for name, value in rows}, "export": report.to_dict()}, indent=2))
        return code
    _say(args, "\n" + tabulate(rows, tablefmt="simple"))
    _say(args, f"\nnext: asr-fx fuse {ckpt} -o {args.out / 'from_ckpt.onnx'}")
    if not ok:
        print("asr-fx: demo failed: the fused model differs from the vanilla one (parameters, ONNX ops) or from "
              "the instrumented one in torch beyond 1e-5; see the table above", file=sys.stderr)
    return code
