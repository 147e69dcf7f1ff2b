"""The gradient half of ``instrument``'s self-check: the instrumented model trains like the original.

Comparing forward outputs cannot see a lost backward: a custom ``autograd.Function`` (a
straight-through estimator, a gradient reversal) traced into its forward body computes the same
outputs and other gradients. :func:`check_gradients` differentiates a fixed random projection of
the outputs of both models (train mode, same RNG seed, every ASR block at ``v = 1``) with respect to
the original's parameters and compares, parameter by parameter (matched by name):

- a parameter with a nonzero gradient in the original has a nonzero gradient in the checked model;
- the gradients agree within :data:`GRAD_RTOL` of that parameter's largest gradient (parameters whose
  gradient is below ``GRAD_RTOL`` of the largest gradient in the model are compared against that
  level: their values are rounding noise of the others).

Nothing is written into the models' ``.grad`` (``torch.autograd.grad``); buffers, modes and the RNG
state are restored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from asr_fx.errors import EquivalenceError

#: relative tolerance of a gradient: fp32 reassociation in traced graphs, amplified by the backward
GRAD_RTOL = 1e-3
_SEED = 1234


def _outputs(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _gradients(model: nn.Module, inputs: Sequence[Any], names: Sequence[str]) -> list[torch.Tensor | None] | None:
    """Gradients of a seeded random projection of ``model``'s outputs w.r.t. its parameters ``names``;
    ``None`` when its outputs do not depend on any of them."""
    model.train(True)
    torch.manual_seed(_SEED)
    fresh = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tuple(inputs))
    with torch.enable_grad():
        outs = [t for t in _outputs(model(*fresh)) if t.requires_grad]
        if not outs:
            return None
        gen = torch.Generator().manual_seed(_SEED)
        loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
                   for t in outs if torch.isfinite(t).all())
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        params = dict(model.named_parameters())
        wanted = [params[n] for n in names]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    return list(grads)


def gradient_mismatch(original: nn.Module, checked: nn.Module, inputs: Sequence[Any]) -> str:
    """What differs between the two models' parameter gradients on ``inputs`` (empty when they agree or
    there is nothing to compare). The caller restores buffers, modes and the RNG state."""
    theirs = dict(checked.named_parameters())
    names = [n for n, p in original.named_parameters() if p.requires_grad and n in theirs
             and theirs[n].requires_grad and theirs[n].shape == p.shape]
    if not names:
        return ""
    try:
        expected = _gradients(original, inputs, names)
    except Exception:  # noqa: BLE001 - the original does not differentiate on this probe: nothing to compare
        return ""
    if expected is None:
        return ""
    try:
        got = _gradients(checked, inputs, names)
    except Exception as exc:  # noqa: BLE001 - reported as the mismatch
        return f"its backward fails where the model's runs: {type(exc).__name__}: {exc}"
    got = got if got is not None else [None] * len(names)
    scale = max((g.abs().max().item() for g in expected if g is not None and g.numel()), default=0.0)
    if scale == 0.0 or not torch.isfinite(torch.tensor(scale)):
        return ""
    lost, off = [], []
    for name, a, b in zip(names, expected, got):
        if a is None or not a.numel() or not bool(a.ne(0).any()) or not torch.isfinite(a).all():
            continue
        if b is None or not bool(b.ne(0).any()):
            lost.append(name)
            continue
        ref = max(a.abs().max().item(), GRAD_RTOL * scale)
        err = (a.double() - b.double()).abs().max().item() / ref
        if not err <= GRAD_RTOL:
            off.append((err, name))
    if lost:
        more = f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
        return (f"parameters {lost[:5]}{more} get a gradient in the model but none in the instrumented model (a "
                "backward lost in capture, e.g. a custom autograd.Function traced into its forward)")
    if off:
        err, name = max(off)
        return f"the gradient of `{name}` differs by {err:.2g} x its largest value (tolerance {GRAD_RTOL:g})"
    return ""


def check_gradients(original: nn.Module, checked: nn.Module, inputs: Sequence[Any], what: str) -> None:
    """Raise :class:`EquivalenceError` if ``checked`` (every ASR block at ``v = 1``) does not give the
    original's parameters the gradients the original gives them (see the module docstring)."""
    if any(t.is_meta for t in [*original.parameters(), *original.buffers()]):
        return
    problem = gradient_mismatch(original, checked, inputs)
    if problem:
        raise EquivalenceError(
            f"{what} does not train like the model: {problem}. This is a bug in asr-fx's capture of this model: "
            "please report it. Way out: keep the layer that computes it as one call with leaf_modules=[...]; "
            "check=False skips this check.")
