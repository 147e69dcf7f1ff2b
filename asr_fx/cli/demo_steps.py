"""The work of ``asr-fx demo`` (imports torch): instrument, train, fuse, export, verify, report.

Progress goes to stderr as tqdm bars on a terminal (one over the training steps, one over the stages);
elsewhere (a log, a pipe) each stage is one line on stdout instead. Nothing with ``-q`` or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from tqdm import tqdm

import asr_fx
from asr_fx.atomic import check_writable
from asr_fx.cli import source
from asr_fx.cli.options import EXIT_OK, EXIT_VERIFY, say

FACTORY = "asr_fx.models:cifar_resnet"
STAGES = ("save checkpoint", "fuse", "export vanilla.onnx", "export and verify asr_fused.onnx")


def synthetic_batches(n: int, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images whose class sets the mean of one colour channel: learnable, needs no download."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        y = torch.randint(0, 10, (batch,), generator=g)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        x[:, 0] += (y.float() - 4.5).view(-1, 1, 1) * 0.3
        yield x, y


def recalibrate_batchnorm(model: torch.nn.Module, batches) -> None:
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


class StageProgress:
    """One tqdm bar over the demo's stages on a terminal; a ``[k/N] stage`` line each elsewhere."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quiet = args.quiet or args.json
        self.bar = tqdm(total=len(STAGES), unit="stage", leave=False,
                        disable=True if self.quiet or not sys.stderr.isatty() else None)
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self.current, self.started = name, time.perf_counter()
        if self.bar.disable:
            say(self.args, f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}")
        else:
            self.bar.set_description(name)

    def stop(self) -> None:
        if self.current is not None:
            self.seconds[self.current] = time.perf_counter() - self.started
            self.bar.update(1)
        self.current = None

    def close(self) -> None:
        self.stop()
        self.bar.close()


def train(args: argparse.Namespace, model: torch.nn.Module) -> float:
    """A few SGD steps on synthetic data, with a tqdm bar; returns the seconds taken."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    quiet = args.quiet or args.json
    start = time.perf_counter()
    model.train()
    steps = tqdm(synthetic_batches(args.steps, args.batch, args.seed), total=args.steps, desc="train", unit="step",
                 leave=False, disable=True if quiet else None)
    for step, (x, y) in enumerate(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.set_postfix(loss=f"{loss.item():.3f}")
        if (step == 0 or step == args.steps - 1) and not quiet:
            steps.write(f"step {step + 1:3d}/{args.steps}  loss {loss.item():.3f}", file=sys.stdout)
    return time.perf_counter() - start


def demo(args: argparse.Namespace) -> int:
    """Run the demo into ``args.out``; the folder is removed again if the demo created it and fails before writing."""
    source.check_opset_option(args.opset)
    check_writable(args.out / "asr_resnet.pt" if args.out.is_dir() else args.out)  # the folder the files go to
    created = not args.out.exists()
    args.out.mkdir(exist_ok=True)
    try:
        return run_demo(args)
    except BaseException:
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise


def run_demo(args: argparse.Namespace) -> int:
    """Instrument, train, fuse, export and verify; print the table (or JSON); exit 1 if a check fails."""
    torch.manual_seed(args.seed)
    vanilla = asr_fx.build(FACTORY, depth=args.depth, num_classes=10)
    model = asr_fx.instrument(vanilla, attention=args.attention, attention_kwargs=args.attention_args,
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    sites = asr_fx.asr_config(model).sites or []  # type: ignore[union-attr]  # instrument records one
    say(args, f"instrumented ResNet-{args.depth} with ASR({args.attention}) at {len(sites)} sites "
              f"({sites[0]['module']}, {sites[1]['module']}, ...)")
    train_s = train(args, model)
    recalibrate_batchnorm(model, synthetic_batches(8, args.batch, args.seed + 2))
    model.eval()

    out: Path = args.out
    files = {"checkpoint": out / "asr_resnet.pt", "vanilla": out / "vanilla.onnx", "fused": out / "asr_fused.onnx"}
    stages = StageProgress(args)
    try:
        stages.start("save checkpoint")
        asr_fx.save(model, files["checkpoint"])
        stages.start("fuse")
        fused = asr_fx.fuse(model, strict=True)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
        with torch.no_grad():
            ref, fused_out = model(x), fused(x)
        torch_err = ((ref - fused_out).abs().max() / ref.abs().max()).item()
        stages.start("export vanilla.onnx")
        vanilla_report = asr_fx.export_onnx(vanilla.eval(), files["vanilla"], x, opset=args.opset, verify=False)
        stages.start("export and verify asr_fused.onnx")
        # a VerificationError goes to main(), which reports it on stderr (and as JSON with --json), exit 1
        report = asr_fx.export_onnx(fused, files["fused"], x, reference=model, rtol=args.rtol, atol=args.atol,
                                    opset=args.opset)
    finally:
        stages.close()
    same_ops = report.op_counts == vanilla_report.op_counts
    same_params = asr_fx.count_parameters(fused) == asr_fx.count_parameters(vanilla)
    rows = [
        ("sites (one per residual block)", len(sites)),
        ("training steps", args.steps),
        ("parameters vanilla", f"{asr_fx.count_parameters(vanilla):,}"),
        ("parameters instrumented (training)", f"{asr_fx.count_parameters(model):,}"),
        ("parameters fused", f"{asr_fx.count_parameters(fused):,}"),
        ("fused == vanilla parameter count", same_params),
        ("torch: max|fused - instrumented| / max|ref|", f"{torch_err:.2e}"),
        ("onnxruntime: max rel err vs instrumented", f"{report.outputs[0].max_rel:.2e}"),
        ("ONNX op multiset == vanilla's", same_ops),
        ("seconds: train, fuse, export (vanilla, fused + verify)",
         f"{train_s:.1f}, {stages.seconds['fuse']:.1f}, ({stages.seconds['export vanilla.onnx']:.1f}, "
         f"{stages.seconds['export and verify asr_fused.onnx']:.1f})"),
        ("files", ", ".join(str(p) for p in files.values())),
    ]
    ok = same_ops and same_params and torch_err <= 1e-5
    code = EXIT_OK if ok else EXIT_VERIFY
    if args.json:
        print(json.dumps({"ok": ok, "exit_code": code, "command": "demo", "depth": args.depth,
                          "attention": args.attention, "rtol": args.rtol, "atol": args.atol,
                          "report": {name: value for name, value in rows}, "export": report.to_dict()}, indent=2))
        return code
    say(args, "\n" + tabulate(rows, headers=["check", "result"], tablefmt="simple", disable_numparse=True))
    say(args, f"\nnext: asr-fx fuse {files['checkpoint']} -o {out / 'from_ckpt.onnx'}")
    if not ok:
        print("asr-fx: demo failed: the fused model differs from the vanilla one (parameters, ONNX ops) or from "
              "the instrumented one in torch beyond 1e-5; see the table above", file=sys.stderr)
    return code
