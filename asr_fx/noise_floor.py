"""How much a model's outputs move by rounding alone: the noise floor the self-checks compare against.

A fold rescales every weight of a layer, so each weight of the fused model may differ from the exact
product by half an ulp, and a traced graph may sum in another order. :func:`perturbed_outputs` measures
what that does to this model's outputs: the model runs with every floating parameter and buffer moved
by one ulp (a seeded random sign each), and the result's distance from the unperturbed output is the
noise floor. A difference between two models above a multiple of it is not rounding. There is no fixed
absolute floor: a model whose outputs are 1e-8 has a noise floor near 1e-15.

:func:`tensor_error` compares one output tensor with its reference: same dtype, non-finite values
(``inf``, ``-inf``, ``nan``) at the same positions, finite values within ``rtol`` of the reference's
largest finite value or within :data:`NOISE_FACTOR` times the measured noise, whichever is larger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

#: relative tolerance by dtype: fp32 reassociation in folds and traced graphs; fp64 is far tighter
RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
#: a difference up to this many times the one-ulp noise floor is rounding
NOISE_FACTOR = 16.0
_SEED = 4321


def rtol_of(dtype: torch.dtype) -> float:
    """The relative tolerance for a floating ``dtype`` (:data:`RTOL`; 1e-2 for other low-precision types)."""
    return RTOL.get(dtype, 1e-2)


def _one_ulp_moves(model: nn.Module, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Move every floating parameter and buffer of ``model`` by one ulp (in place); returns what to restore."""
    gen = torch.Generator().manual_seed(seed)
    saved = []
    seen: set[int] = set()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in seen or not t.is_floating_point() or t.is_meta or not t.numel():
                continue
            seen.add(id(t))
            saved.append((t, t.detach().clone()))
            sign = torch.randint(0, 2, t.shape, generator=gen).to(t.device) * 2 - 1
            eps = torch.finfo(t.dtype).eps
            t.mul_((1 + eps * sign).to(t.dtype))
    return saved


def perturbed_outputs(model: nn.Module, run: Callable[[nn.Module], Any], runs: int = 2) -> list[Any]:
    """``run(model)`` with every floating parameter and buffer of ``model`` moved by one ulp, ``runs``
    times with different random signs; the model's tensors are exactly as they were afterwards."""
    outputs = []
    for i in range(runs):
        saved = _one_ulp_moves(model, _SEED + i)
        try:
            outputs.append(run(model))
        finally:
            with torch.no_grad():
                for t, value in saved:
                    t.copy_(value)
    return outputs


def _finite_max(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def noise_of(reference: torch.Tensor, perturbed: Sequence[torch.Tensor]) -> float:
    """The largest finite move of ``reference`` over its ``perturbed`` runs (0 without any)."""
    ref = reference.detach().double()
    worst = 0.0
    for p in perturbed:
        if p.shape != reference.shape:
            continue
        p = p.detach().double()
        both = torch.isfinite(ref) & torch.isfinite(p)
        if both.any():
            worst = max(worst, float((ref[both] - p[both]).abs().max()))
    return worst


def tensor_error(reference: torch.Tensor, got: torch.Tensor, noise: float = 0.0) -> tuple[float, str]:
    """How far ``got`` is from ``reference`` in units of the tolerance (``<= 1`` passes), and what differs.

    Infinite error for a different dtype, shape, or non-finite values at other positions.
    """
    if got.dtype != reference.dtype:
        return float("inf"), f"dtype {got.dtype} where the model gives {reference.dtype}"
    if got.shape != reference.shape:
        return float("inf"), f"shape {tuple(got.shape)} where the model gives {tuple(reference.shape)}"
    if not reference.is_floating_point() or not reference.numel():
        return 0.0, ""
    ref, out = reference.detach().double(), got.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)) or \
            not torch.equal(ref[~finite].nan_to_num(0.0), out[~finite].nan_to_num(0.0)):
        return float("inf"), "inf/nan values at other positions than the model's"
    if not finite.any():
        return 0.0, ""
    diff = float((ref[finite] - out[finite]).abs().max())
    allowed = max(rtol_of(reference.dtype) * _finite_max(ref), NOISE_FACTOR * noise)
    if diff == 0.0:
        return 0.0, ""
    err = diff / allowed if allowed > 0 else float("inf")
    scale = _finite_max(ref)
    rel = f"{diff / scale:.2g} x max|reference|" if scale > 0 else f"{diff:.2g} where the reference is 0"
    floor = f", the model's own rounding noise {noise:.2g}" if noise > 0 else ""
    return err, f"max error {rel} (tolerance {rtol_of(reference.dtype):g} relative{floor})"


__all__ = ["NOISE_FACTOR", "RTOL", "noise_of", "perturbed_outputs", "rtol_of", "tensor_error"]
