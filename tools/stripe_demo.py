"""The Stripe Observation on a small SE-ResNet trained on scikit-learn's digits, on CPU in a few minutes.

    python tools/stripe_demo.py            # writes docs/stripe_*.png and tools/results/stripe.md

1. Train an SE-ResNet (SE after the last BN of every residual branch, as in SE-ResNet) on the
   8x8 digits upsampled to 16x16; after every epoch, record the attention values of a fixed set
   of held-out images (for Fig. 1c).
2. On the held-out images: the attention values and pooled features per site (Fig. 1a, 1b) and
   the std ratio (attention std over pooled-feature std) per site.
3. Freeze the trained attention into constants (``asr_fx.freeze_attention``), fuse, and measure
   accuracy: the attention's inference cost removed with no retraining.
4. Train ASR(SE) from scratch on the vanilla ResNet with the same recipe, fuse, measure accuracy.
5. Train the vanilla ResNet (no attention) with the same recipe, as the baseline.

Everything is printed and written to ``tools/results/stripe.md``; the figures go to ``docs/``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

import asr_fx
from asr_fx import count_parameters, plot, stripe
from asr_fx import freeze as freezing

ROOT = Path(__file__).resolve().parent.parent


class SqueezeExcitation(nn.Module):
    """SE (Hu et al.): ``x * sigmoid(fc2(relu(fc1(GAP(x)))))``, input-dependent."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, se: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcitation(cout) if se else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for 1x16x16 inputs: stages of ``widths``, ``blocks`` basic blocks each."""

    def __init__(self, se: bool = True, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, se))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits(size: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], upsampled to ``size``, normalised; a fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def batches(x: torch.Tensor, y: torch.Tensor, size: int, shuffle: torch.Generator | None = None):
    order = torch.randperm(len(y), generator=shuffle) if shuffle is not None else torch.arange(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (the digits are small; this keeps the nets from memorising)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(model: nn.Module, args: argparse.Namespace, data, label: str, on_epoch=None) -> float:
    """SGD with momentum and a step schedule (x0.1 at 50% and 75% of the epochs); returns seconds."""
    x_train, y_train = data[0], data[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    milestones = [args.epochs // 2, (3 * args.epochs) // 4]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in tqdm(range(1, args.epochs + 1), desc=label, leave=False):
        model.train()
        for xb, yb in batches(x_train, y_train, args.batch, shuffle=g):
            loss = F.cross_entropy(model(augment(xb, g)), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--size", type=int, default=16, help="image side after upsampling (default 16)")
    parser.add_argument("--n-test", type=int, default=500, help="held-out images (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=Path, default=ROOT / "docs")
    parser.add_argument("--results", type=Path, default=ROOT / "tools" / "results" / "stripe.md")
    parser.add_argument("--site", type=int, default=2, help="attention site drawn in Fig. 1a/1c (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads run slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    data = digits(args.size, args.n_test, args.seed)
    x_train, y_train, x_test, y_test = data
    held_out = batches(x_test, y_test, 250)
    tracked = x_test[:64]  # the inputs whose attention values are followed over epochs (Fig. 1c)

    # 1. SE-ResNet, with the attention values of `tracked` after every epoch
    se_model = SmallResNet(se=True)
    over_epochs = [stripe.collect(se_model, [tracked])[args.site].values]
    record = lambda epoch, model: over_epochs.append(stripe.collect(model, [tracked])[args.site].values)  # noqa: E731
    se_seconds = train(se_model, args, data, "SE-ResNet", on_epoch=record)
    se_acc = accuracy(se_model, x_test, y_test)

    # 2. the observation on held-out images
    stats = stripe.collect(se_model, held_out)
    site = stats[args.site]
    figures = [
        plot.plot_stripes(site, args.figures / "stripe_heatmap.png", max_inputs=48, max_channels=32,
                          title=f"SE-ResNet on digits, {site.site}: before / after the attention"),
        plot.plot_std_histogram(stats, args.figures / "stripe_std_histogram.png",
                                title=f"per-channel std over {site.n_inputs} held-out images, "
                                      f"all {len(stats)} SE sites"),
        plot.plot_epoch_difference(torch.stack(over_epochs), args.figures / "stripe_epoch_difference.png",
                                   inputs=(0, 1, 2), channels=20,
                                   title=f"{site.site}: |v(t+1) - v(t)| over epochs (lr x0.1 at epochs "
                                         f"{args.epochs // 2} and {(3 * args.epochs) // 4})"),
    ]

    # 3. freeze the trained attention (calibrated on training images), fuse, measure
    calibration = batches(x_train[:1000], y_train[:1000], 250)
    frozen = freezing.freeze_attention(se_model, calibration, held_out=held_out, per_site=True)
    fused_frozen = asr_fx.fuse(frozen, strict=True)
    frozen_acc = accuracy(fused_frozen, x_test, y_test)
    fusion = asr_fx.fusion_report(fused_frozen)
    freeze = freezing.freeze_report(frozen)

    # 4. ASR(SE) from scratch on the vanilla ResNet, same recipe
    torch.manual_seed(args.seed)
    vanilla = SmallResNet(se=False)
    asr_model = asr_fx.instrument(vanilla, attention="se", attention_kwargs={"reduction": 4, "min_hidden": 4})
    asr_seconds = train(asr_model, args, data, "ASR(SE)")
    asr_acc = accuracy(asr_model, x_test, y_test)
    fused_asr = asr_fx.fuse(asr_model, strict=True)
    fused_asr_acc = accuracy(fused_asr, x_test, y_test)

    # 5. the vanilla ResNet (no attention), same recipe: the baseline both are measured against
    torch.manual_seed(args.seed)
    vanilla_trained = SmallResNet(se=False)
    vanilla_seconds = train(vanilla_trained, args, data, "vanilla")
    vanilla_acc = accuracy(vanilla_trained, x_test, y_test)
    total = time.perf_counter() - start

    sites_table = stats.table()
    models_table = tabulate([
        ("SE-ResNet (input-dependent SE)", count_parameters(se_model), f"{100 * se_acc:.2f}"),
        ("SE frozen to mean v, fused", count_parameters(fused_frozen), f"{100 * frozen_acc:.2f}"),
        ("ASR(SE) from scratch, before fusion", count_parameters(asr_model), f"{100 * asr_acc:.2f}"),
        ("ASR(SE) from scratch, fused", count_parameters(fused_asr), f"{100 * fused_asr_acc:.2f}"),
        ("vanilla ResNet (no attention)", count_parameters(vanilla_trained), f"{100 * vanilla_acc:.2f}"),
    ], headers=["model", "parameters", f"held-out top-1 % ({len(y_test)} images)"], tablefmt="github")
    change = freeze.output_change
    settings = (f"SmallResNet widths (16, 32, 64), 2 basic blocks per stage, SE (reduction 4) after bn2 of every "
                f"block; digits {args.size}x{args.size}, {len(y_train)} train / {len(y_test)} held-out images; "
                f"{args.epochs} epochs, batch {args.batch}, SGD lr {args.lr} momentum 0.9 weight decay "
                f"{args.weight_decay}, lr x0.1 at epochs {args.epochs // 2} and {(3 * args.epochs) // 4}, "
                f"random shifts of up to 2 px; seed {args.seed}; torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s), {platform.machine()}")
    text = "\n".join([
        "# The Stripe Observation on a small SE-ResNet (digits)",
        "",
        f"Written by `{' '.join(['python tools/stripe_demo.py', *(argv if argv is not None else sys.argv[1:])])}`; "
        f"total {total:.0f} s (training: SE-ResNet {se_seconds:.0f} s, ASR {asr_seconds:.0f} s, "
        f"vanilla {vanilla_seconds:.0f} s).",
        "",
        f"Settings: {settings}.",
        "",
        f"Per attention site, on the {site.n_inputs} held-out images (std ratio = mean per-channel std of the "
        "attention values / mean per-channel std of the pooled features the attention reads):",
        "",
        sites_table,
        "",
        "Accuracy:",
        "",
        models_table,
        "",
        f"Freezing each SE to its mean value on {sum(len(b[1]) for b in calibration)} training images changes "
        f"the logits on the held-out images by at most {change['max_abs']:.4g} ({100 * change['rel']:.2f}% of "
        f"max|logit|); top-1 agreement with the SE-ResNet {100 * change['argmax_agreement']:.2f}%. "
        f"Fusion folded {len(fusion.folded)} of {len(fusion.records)} frozen sites "
        f"({', '.join(f'{k}: {v}' for k, v in fusion.summary().items())}). Per site (std measured on the "
        "training images; output change on the held-out images, relative to max|logit|, with that site frozen "
        "alone):",
        "",
        freeze.table().split("\n\noutput change")[0],
        "",
        "Figures: " + ", ".join(f"`{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}`" for p in figures),
        "",
    ])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
