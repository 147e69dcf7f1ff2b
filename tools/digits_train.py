"""A small real training run: vanilla, SE, ASR(SE) and ASR(SE)+SE on scikit-learn's digits.

scikit-learn ships the digits data (1,797 8x8 grey images, 10 classes; ``pip install -e ".[examples]"``).
The images are scaled to [0, 1], upsampled bilinearly to ``--size`` and split 80/20 (stratified, one
fixed split). The network is a CIFAR-style ResNet (``asr_fx.models.cifar_resnet``, basic blocks,
1 input channel via a 3x repeat), for each of ``--seeds`` seeds (initialisation and batch order).
Test accuracy: mean ± std over seeds.

Recipes (``--recipe``):
- ``authors`` (default): the ASR authors' CIFAR recipe (the paper's Table 10, ResNet-164): SGD
  momentum 0.9, lr 0.1, weight decay 1e-4 on every parameter, psi and the attention networks
  included, lr x0.1 at 81/164 and 122/164 of the epochs; the SE's width is the paper's ``round(C / 16)``.
- ``no-decay-asr``: this tool's earlier recipe: SGD nesterov momentum 0.9, one-cycle lr 0.1, weight
  decay 5e-4 on everything but ``asr_fx.asr_parameters`` (no decay there); the input-dependent SE
  with asr-fx's earlier floor of 8 hidden units.

Variants, all at the same sites (the last BN of every residual branch, the paper's ResNet placement):
- vanilla;
- SE: input-dependent Squeeze-and-Excitation after those BNs;
- ASR(SE): ``asr_fx.instrument(vanilla)``;
- ASR(SE)+SE: ``asr_fx.instrument`` of the SE model at the same BNs (ASR before the model's own SE).
After training, every ASR model is fused (``asr_fx.fuse(strict=True)``) and evaluated again: the fused
model must make the same predictions (same accuracy); the table shows both and the largest logit
difference.

    OMP_NUM_THREADS=1 python tools/digits_train.py          # writes tools/results/digits.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _bench_common import machine, n_params, report, set_threads, sites_of, table, with_se
from torch import nn

import asr_fx
from asr_fx.models import cifar_resnet

VARIANTS = ("vanilla", "SE", "ASR(SE)", "ASR(SE)+SE")


def load_digits(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("tools/digits_train.py needs scikit-learn: pip install -e '.[examples]'") from exc
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, random_state=0,
                                           stratify=y.numpy())
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


class GreyToRGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def build(variant: str, depth: int, seed: int, recipe: str = "authors") -> nn.Module:
    torch.manual_seed(seed)
    vanilla = nn.Sequential(GreyToRGB(), cifar_resnet(depth, num_classes=10, bottleneck=False))
    if variant == "vanilla":
        return vanilla
    floor = RECIPES[recipe]["se_min_hidden"]  # the SE width floor, the same for ASR's F and the input-dependent SE
    asr = asr_fx.instrument(vanilla, attention_kwargs={"min_hidden": floor})
    if variant == "ASR(SE)":
        return asr
    se = with_se(vanilla, sites_of(asr), min_hidden=floor)
    if variant == "SE":
        return se
    return asr_fx.instrument(se, sites=[s.module for s in sites_of(asr)], attention_kwargs={"min_hidden": floor})


#: the training recipes (see the module docstring); ``se_min_hidden``: the SE width floor (ASR's F and the SE's)
RECIPES = {
    "authors": {"weight_decay": 1e-4, "asr_weight_decay": 1e-4, "nesterov": False, "schedule": "step",
                "se_min_hidden": 1,
                "text": "SGD momentum 0.9, lr {lr}, weight decay 1e-4 on every parameter (psi and F included), "
                        "lr x0.1 at 81/164 and 122/164 of the epochs (the authors' CIFAR recipe); SE width "
                        "round(C/16)"},
    "no-decay-asr": {"weight_decay": 5e-4, "asr_weight_decay": 0.0, "nesterov": True, "schedule": "one-cycle",
                     "se_min_hidden": 8,
                     "text": "SGD nesterov momentum 0.9, one-cycle lr {lr}, weight decay 5e-4 (none on "
                             "asr_fx.asr_parameters); SE width max(round(C/16), 8)"},
}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float, seed: int,
          recipe: str = "authors") -> None:
    setting = RECIPES[recipe]
    asr = asr_fx.asr_parameters(model)
    ids = {id(p) for p in asr}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "weight_decay": setting["weight_decay"]}] + (
        [{"params": asr, "weight_decay": setting["asr_weight_decay"]}] if asr else [])
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=setting["nesterov"])
    steps = epochs * ((len(y) + batch - 1) // batch)
    if setting["schedule"] == "one-cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [round(steps * 81 / 164), round(steps * 122 / 164)], 0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=g)  # a one-pixel random translation
            xb = torch.roll(xb, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])


def run_regime(args: argparse.Namespace, train_limit: int) -> tuple[str, str]:
    """Train every variant on every seed; returns (a settings line, the markdown table and verdict)."""
    x_train, y_train, x_test, y_test = load_digits(args.size)
    if train_limit:  # a stratified subset of the training split: a harder, less saturated regime
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(torch.arange(len(y_train)).numpy(), train_size=train_limit, random_state=0,
                                   stratify=y_train.numpy())
        x_train, y_train = x_train[keep], y_train[keep]
    epochs = args.subset_epochs if train_limit else args.epochs
    acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    fused_acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    same_pred: dict[str, int] = {v: 0 for v in VARIANTS}
    max_logit_err: dict[str, float] = {v: 0.0 for v in VARIANTS}
    params: dict[str, tuple[int, int | None]] = {}
    seconds: dict[str, float] = {v: 0.0 for v in VARIANTS}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for variant in VARIANTS:  # interleaved: every variant trains under the same machine load per seed
            model = build(variant, args.depth, seed, args.recipe)
            t0 = time.perf_counter()
            train(model, x_train, y_train, epochs, args.batch, args.lr, seed, args.recipe)
            seconds[variant] += time.perf_counter() - t0
            out = logits(model, x_test)
            acc[variant].append((out.argmax(1) == y_test).float().mean().item())
            fused_params = None
            if variant.startswith("ASR"):
                fused = asr_fx.fuse(model, strict=True)
                fout = logits(fused, x_test)
                fused_acc[variant].append((fout.argmax(1) == y_test).float().mean().item())
                same_pred[variant] += int((fout.argmax(1) == out.argmax(1)).sum())
                err = ((fout - out).abs().max() / out.abs().max()).item()
                max_logit_err[variant] = max(max_logit_err[variant], err)
                fused_params = n_params(fused)
            params[variant] = (n_params(model), fused_params)
            print(f"[{len(y_train)} train] seed {seed} {variant:11s} test acc {acc[variant][-1]:.4f}"
                  + (f"  fused {fused_acc[variant][-1]:.4f}" if fused_acc[variant] else ""), flush=True)
    n_test = len(y_test)
    rows = []
    for v in VARIANTS:
        mean, std = statistics.fmean(acc[v]), statistics.stdev(acc[v]) if len(acc[v]) > 1 else 0.0
        fused = fused_acc[v]
        rows.append({
            "variant": v,
            "train params": f"{params[v][0]:,}",
            "deploy params": f"{params[v][1] if params[v][1] is not None else params[v][0]:,}",
            "test acc % (mean ± std)": f"{100 * mean:.2f} ± {100 * std:.2f}",
            "per seed %": " ".join(f"{100 * a:.2f}" for a in acc[v]),
            "fused acc % (mean)": f"{100 * statistics.fmean(fused):.2f}" if fused else "-",
            "fused == unfused predictions": f"{same_pred[v]}/{n_test * args.seeds}" if fused else "-",
            "max logit rel diff": f"{max_logit_err[v]:.1e}" if fused else "-",
            "train s / seed": f"{seconds[v] / args.seeds:.0f}",
        })
    def stderr_of_difference(a: list[float], b: list[float]) -> float:
        var = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) if len(a) > 1 else 0.0
        return var ** 0.5

    diffs = {v: (statistics.fmean(acc[v]) - statistics.fmean(acc["vanilla"]),
                 stderr_of_difference(acc[v], acc["vanilla"]))
             for v in VARIANTS[1:]}
    minutes = (time.perf_counter() - start) / 60
    setting = f"{len(y_train)} train / {n_test} test images, {epochs} epochs: {minutes:.1f} min"
    exact = all(same_pred[v] == n_test * args.seeds for v in VARIANTS if v.startswith("ASR"))
    fused_verdict = ("Every fused model made exactly the instrumented model's predictions." if exact else
                     "Some fused model's predictions DIFFER from the instrumented model's (see the table).")
    verdict = "; ".join(f"{v} {100 * d:+.2f} ± {100 * se:.2f} pts" for v, (d, se) in diffs.items())
    text = table(rows) + (
        f"\n\nMean accuracy minus vanilla's, ± the standard error of that difference over {args.seeds} seeds: "
        f"{verdict}. One test image is {100 / n_test:.2f} pts. A difference within about two standard errors is "
        "not evidence of an effect. " + fused_verdict + "\n")
    return setting, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--depth", type=int, default=14, help="CIFAR ResNet depth, 6n+2 (basic blocks)")
    parser.add_argument("--size", type=int, default=16, help="upsampled image size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-limits", nargs="+", type=int, default=[0, 300],
                        help="training images per regime; 0: the whole 80%% split")
    parser.add_argument("--subset-epochs", type=int, default=30, help="epochs of the subset regimes")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="authors",
                        help="authors: their CIFAR recipe, weight decay on psi too (default); no-decay-asr: the "
                             "earlier one")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    start_all = time.perf_counter()
    body, timings = "", []
    for limit in args.train_limits:
        setting, text = run_regime(args, limit)
        timings.append(setting)
        title = "whole training split" if not limit else f"{limit} training images (a stratified subset)"
        body += f"## {title}\n\n{text}\n"
    settings = [
        f"machine: {machine()}",
        "scikit-learn digits: 1,797 8x8 images, 80/20 stratified split (random_state=0), "
        f"upsampled to {args.size}x{args.size}; CIFAR ResNet-{args.depth} (basic blocks)",
        f"recipe {args.recipe}: " + RECIPES[args.recipe]["text"].format(lr=args.lr)
        + f", batch {args.batch}, one-pixel random shifts; seeds 0..{args.seeds - 1}",
        f"regimes: {'; '.join(timings)}; whole run {(time.perf_counter() - start_all) / 60:.1f} min",
        f"command: `OMP_NUM_THREADS=1 python tools/digits_train.py --recipe {args.recipe}`",
    ]
    report("digits.md", "digits_train: vanilla, SE, ASR(SE), ASR(SE)+SE on digits", settings, body, [],
           write=not args.no_write)


if __name__ == "__main__":
    main()
