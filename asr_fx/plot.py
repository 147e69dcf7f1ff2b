"""Figures of the Stripe Observation, after the paper's Fig. 1 (matplotlib: ``pip install asr-fx[plot]``).

- :func:`plot_stripes` (Fig. 1a): inputs x channels, the attention's pooled input (before) and
  its output ``v`` (after); trained attention shows vertical stripes: one value per channel.
- :func:`plot_std_histogram` (Fig. 1b): the per-channel std across inputs, before and after the
  attention; after, it piles up near 0.
- :func:`plot_epoch_difference` (Fig. 1c): ``|v(t+1) - v(t)|`` over checkpoints of one training,
  channels x epochs for a few inputs; black (0) once the values have settled.

Each function writes one PNG (no pyplot state, safe without a display) and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asr_fx.errors import InvalidOptionError, MissingDependencyError, NoSitesError
from asr_fx.stripe import SiteStats, StripeStats


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure  # optional dependency (the plot extra): imported when drawing
    except ImportError:
        raise MissingDependencyError("the figures need matplotlib: pip install 'asr-fx[plot]' (or pip install "
                                     "matplotlib)",
                                     package="matplotlib") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _pick(n: int, k: int | None, seed: int) -> torch.Tensor:
    """``k`` of ``range(n)`` in increasing order, chosen at random with ``seed`` (all if ``k >= n``)."""
    if k is None or k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def plot_stripes(site: SiteStats, path: str | os.PathLike, *, max_inputs: int = 48, max_channels: int = 64,
                 seed: int = 0, title: str | None = None, dpi: int = 100) -> Path:
    """Fig. 1a: two heatmaps, inputs (rows) x channels (columns), before and after the attention.

    Left: the attention network's pooled input per channel; right: the attention value ``v``. At
    most ``max_inputs`` inputs and ``max_channels`` channels, drawn at random with ``seed``.
    """
    rows = _pick(site.n_inputs, max_inputs, seed)
    cols = _pick(site.channels, max_channels, seed + 1)
    before = site.pooled[rows][:, cols].numpy()
    after = site.values[rows][:, cols].numpy()
    fig = _figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    for ax, data, label in ((axes[0], before, "before: pooled features"), (axes[1], after, "after: attention value v")):
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("channel")
        ax.set_ylabel("input")
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(title or f"{site.site}: {len(rows)} inputs x {len(cols)} channels", fontsize=11)
    return _save(fig, path, dpi)


def plot_std_histogram(stats: StripeStats | SiteStats, path: str | os.PathLike, *, bins: int = 40,
                       title: str | None = None, dpi: int = 100) -> Path:
    """Fig. 1b: histograms of the per-channel std across inputs, of the pooled features (before)
    and of the attention values (after), over every site of ``stats`` (or one site)."""
    sites = [stats] if isinstance(stats, SiteStats) else list(stats)
    if not sites:
        raise NoSitesError("no attention sites to draw")
    before = torch.cat([s.feature_std for s in sites]).numpy()
    after = torch.cat([s.std for s in sites]).numpy()
    top = float(max(before.max(), after.max(), 1e-12))
    edges = torch.linspace(0.0, top * 1.0001, bins + 1).numpy()
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    ax.hist(before, bins=edges, alpha=0.6, color="tab:blue", label="before attention (pooled features)")
    ax.hist(after, bins=edges, alpha=0.8, color="tab:orange", label="after attention (v)")
    ax.set_xlabel("per-channel std across inputs")
    ax.set_ylabel("channels")
    ax.legend(fontsize=8)
    where = sites[0].site if len(sites) == 1 else f"{len(sites)} attention sites"
    ax.set_title(title or f"{where}, {sum(s.channels for s in sites)} channels", fontsize=10)
    return _save(fig, path, dpi)


def plot_epoch_difference(values: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike, *,
                          inputs: Sequence[int] = (0, 1, 2), channels: int = 20, epochs: Sequence[Any] | None = None,
                          seed: int = 0, title: str | None = None, dpi: int = 100) -> Path:
    """Fig. 1c: ``|v(t+1) - v(t)|`` for one site over checkpoints, one panel per input in ``inputs``:
    ``channels`` channels drawn at random (rows) x checkpoint steps (columns), black where 0.

    ``values``: ``E x N x C`` (:func:`asr_fx.stripe.values_over_checkpoints`) or a list of ``N x C``.
    ``epochs``: the label of each checkpoint (default 0..E-1); column ``t`` shows epochs[t] -> epochs[t+1].
    """
    v = torch.stack(list(values)) if not isinstance(values, torch.Tensor) else values
    if v.dim() != 3 or v.shape[0] < 2:
        raise InvalidOptionError("values must be checkpoints x inputs x channels with at least two checkpoints, "
                       f"got {tuple(v.shape)}")
    labels = list(epochs) if epochs is not None else list(range(v.shape[0]))
    if len(labels) != v.shape[0]:
        raise InvalidOptionError(f"{len(labels)} epoch labels for {v.shape[0]} checkpoints")
    chosen = [i for i in inputs if i < v.shape[1]]
    if not chosen:
        raise InvalidOptionError(f"inputs {list(inputs)} are out of range: the checkpoints saw {v.shape[1]} inputs")
    cols = _pick(v.shape[2], channels, seed)
    diff = (v[1:] - v[:-1]).abs()[:, :, cols]  # (E-1) x N x K
    vmax = float(diff[:, chosen].max().clamp_min(1e-12))
    fig = _figure(3.0 * len(chosen) + 1.0, 3.4)
    from matplotlib.ticker import MaxNLocator  # optional dependency, present once _figure succeeded

    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    extent = (float(labels[1]) - 0.5, float(labels[-1]) + 0.5, len(cols) - 0.5, -0.5) if _numeric(labels) else None
    image = None
    for ax, i in zip(axes, chosen):
        image = ax.imshow(diff[:, i].T.numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                          vmin=0.0, vmax=vmax, extent=extent)
        ax.set_title(f"input {i}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"channel ({len(cols)} at random)")
    fig.colorbar(image, ax=list(axes), fraction=0.04, label="|v(t+1) - v(t)|")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)


def _numeric(labels: Sequence[Any]) -> bool:
    return all(isinstance(x, (int, float)) for x in labels)


def plot_all(stats: StripeStats, out_dir: str | os.PathLike, *, site: int | str = 0,
             over_epochs: torch.Tensor | None = None, epochs: Sequence[Any] | None = None,
             prefix: str = "") -> list[Path]:
    """The Fig. 1 panels for ``stats`` in ``out_dir``: ``stripes.png`` (for ``site``),
    ``std_histogram.png`` (every site) and, given ``over_epochs``, ``epoch_difference.png``."""
    out = Path(out_dir)
    paths = [plot_stripes(stats[site], out / f"{prefix}stripes.png"),
             plot_std_histogram(stats, out / f"{prefix}std_histogram.png")]
    if over_epochs is not None:
        paths.append(plot_epoch_difference(over_epochs, out / f"{prefix}epoch_difference.png", epochs=epochs,
                                           title=f"{stats[site].site}: first-order difference over epochs"))
    return paths


__all__ = ["plot_all", "plot_epoch_difference", "plot_std_histogram", "plot_stripes"]
