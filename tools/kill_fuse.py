"""Kill ``asr-fx fuse`` at random moments and check that no stray file survives the next run.

What must hold (issue 14): after each kill and the next (unkilled) run, nothing ``.asr-fx-*`` is left
beside OUT and nothing ``asr-fx-*`` in the temporary folder; right after the kill OUT is absent, the
old file byte for byte, or complete and valid (``onnx.checker`` passes and onnxruntime loads and runs it).

The tool builds a small checkpoint (the built-in CIFAR ResNet, depth 11, instrumented), times one unkilled
``asr-fx fuse`` (full export and onnxruntime verification), then ``--kills`` times: puts an old valid OUT
in place (every other run), starts ``asr-fx fuse CKPT -o OUT``, sends SIGKILL or SIGTERM (alternately) at
a random moment between 0 and the measured duration (a run that ends first is not counted as a kill: it
draws again until ``--kills`` runs were killed), runs ``asr-fx fuse`` again to completion and checks.
The phase is the last stage line the killed run printed. Every run gets a private ``TMPDIR``.

    OMP_NUM_THREADS=1 python tools/kill_fuse.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import asr_fx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "tools" / "results" / "kill_fuse.md"
FACTORY = "asr_fx.models:cifar_resnet"
STAGE = re.compile(r"^\[\d+/\d+\] (\w+)")


def make_checkpoint(path: Path, seed: int, depth: int) -> None:
    """An instrumented CIFAR ResNet with random (seeded) weights, saved in asr-fx's format."""
    torch.manual_seed(seed)
    model = asr_fx.instrument(asr_fx.build(FACTORY, depth=depth, num_classes=10),
                              example_inputs=(torch.zeros(1, 3, 32, 32),))
    asr_fx.save(model.eval(), path)


def valid_onnx(path: Path) -> bool:
    """``onnx.checker`` passes and onnxruntime loads and runs the file."""
    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                for i in session.get_inputs()}
        session.run(None, feed)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not valid"
        return False


def out_state(out: Path, old: bytes | None) -> str:
    """absent / old (byte-identical) / new-valid / INVALID."""
    if not out.exists():
        return "absent"
    if old is not None and out.read_bytes() == old:
        return "old"
    return "new-valid" if valid_onnx(out) else "INVALID"


def leftovers(out_dir: Path, tmp_dir: Path) -> tuple[list[str], list[str]]:
    """(asr-fx temporary folders/files beside OUT or in TMPDIR, anything else in TMPDIR)."""
    ours = [p.name for p in out_dir.iterdir() if p.name.startswith(".asr-fx-") or ".tmp" in p.name]
    ours += [f"TMPDIR/{p.name}" for p in tmp_dir.iterdir() if p.name.startswith("asr-fx-")]
    other = [f"TMPDIR/{p.name}" for p in tmp_dir.iterdir() if not p.name.startswith("asr-fx-")]
    return sorted(ours), sorted(other)


def fuse_command(asr_fx_bin: str, ckpt: Path, out: Path) -> list[str]:
    return [asr_fx_bin, "fuse", str(ckpt), "-o", str(out)]


def run_to_end(cmd: list[str], env: dict) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, time.perf_counter() - start, proc.stderr.strip()


def kill_at(cmd: list[str], env: dict, moment: float, signum: int, log: Path) -> tuple[str, int]:
    """Start ``cmd``, send ``signum`` after ``moment`` seconds; return (phase, exit code)."""
    with open(log, "w") as stdout:
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=moment)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
            proc.send_signal(signum)
        code = proc.wait(timeout=600)
    stages = [m.group(1) for line in log.read_text().splitlines() if (m := STAGE.match(line))]
    phase = "finished" if finished else (stages[-1] if stages else "start")
    return phase, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=11, help="CIFAR ResNet depth (default 11)")
    parser.add_argument("--asr-fx", default=str(Path(sys.executable).parent / "asr-fx"), help="the asr-fx executable")
    parser.add_argument("--write", type=Path, default=RESULTS, help=f"markdown results (default {RESULTS})")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-fuse-"))
    try:
        return run_kills(args, rng, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_kills(args: argparse.Namespace, rng: random.Random, work: Path) -> int:
    ckpt, other_ckpt = work / "model.pt", work / "other.pt"
    make_checkpoint(ckpt, args.seed, args.depth)
    make_checkpoint(other_ckpt, args.seed + 1, args.depth)
    tmp_dir, out_dir = work / "tmp", work / "out"
    tmp_dir.mkdir()
    out_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_dir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}  # the stage lines reach the log before the kill: they give the phase
    out = out_dir / "model.onnx"
    old_file = work / "old.onnx"  # a valid ONNX file of a different model: the "old OUT"
    code, _, err = run_to_end(fuse_command(args.asr_fx, other_ckpt, old_file), env)
    assert code == 0, err
    old_bytes = old_file.read_bytes()
    code, duration, err = run_to_end(fuse_command(args.asr_fx, ckpt, out), env)
    assert code == 0, err
    out.unlink()
    settings = (f"kills {args.kills}, seed {args.seed}, model {FACTORY} depth {args.depth} (instrumented, asr-fx "
                f"checkpoint), unkilled `asr-fx fuse` (export + onnxruntime verify) {duration:.1f} s, "
                f"signals alternate SIGKILL/SIGTERM, old OUT in place every other run, private TMPDIR")
    print(settings, flush=True)
    header = ("| run | signal | moment s | phase | exit | OUT after kill | leftovers after kill | after next run "
              "| OUT after next run |")
    rows = [header, "|" + "---|" * 9]
    print(header, flush=True)
    failures = kills = i = 0
    while kills < args.kills and i < 3 * args.kills:  # a run that ends before its moment is no kill: draw again
        signum = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
        has_old = (i // 2) % 2 == 0  # both signals with and without an old file
        if out.exists():
            out.unlink()
        if has_old:
            shutil.copyfile(old_file, out)
        moment = rng.uniform(0, duration)
        phase, code = kill_at(fuse_command(args.asr_fx, ckpt, out), env, moment, signum, work / "run.log")
        kills += phase != "finished"
        i += 1
        state = out_state(out, old_bytes if has_old else None)
        after_kill, _ = leftovers(out_dir, tmp_dir)
        next_code, _, err = run_to_end(fuse_command(args.asr_fx, ckpt, out), env)
        after_next, other = leftovers(out_dir, tmp_dir)
        next_state = out_state(out, None) if next_code == 0 else f"exit {next_code}: {err[:80]}"
        ok = (state in ("absent", "old", "new-valid") and not (has_old and state == "absent")  # never lose the old file
              and not after_next and next_state == "new-valid")
        failures += not ok
        row = (f"| {i} | {signal.Signals(signum).name} | {moment:.2f} | {phase} | {code} | "
               f"{state}{' (old in place)' if has_old else ''} | {', '.join(after_kill) or '-'} | "
               f"{', '.join(after_next) or '-'}{' (other: ' + ', '.join(other) + ')' if other else ''} | "
               f"{next_state}{'' if ok else ' **FAIL**'} |")
        rows.append(row)
        print(row, flush=True)
    summary = (f"{kills} kills in {i} runs ({i - kills} ended before their moment), {i - failures}/{i} passed: OUT "
               f"absent, old or complete and valid after every "
               f"kill; nothing asr-fx left beside OUT or in TMPDIR after the next run" if not failures
               else f"{failures}/{i} runs FAILED (see rows marked FAIL)")
    print(summary, flush=True)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.write_text(f"# Kills of `asr-fx fuse`\n\n`{' '.join(['tools/kill_fuse.py', *sys.argv[1:]])}`\n\n"
                          f"Settings: {settings}.\n\n" + "\n".join(rows) + f"\n\n{summary}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
