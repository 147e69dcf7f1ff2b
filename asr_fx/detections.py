"""Detections compared as detections: the same set of boxes, scores and labels in any order.

A detector's top-k or sort puts two detections whose scores are 6e-8 apart in either order, by rounding
alone; a position-by-position comparison then sees two different boxes. :func:`align_detections` reorders
the checked model's detections to pair each with the reference detection it matches best (same label,
nearest box and score), so the comparison that follows compares each detection with its own match; any
real difference (another box, score or label, another count) still shows.

A detection output is a dict (or a list of dicts, one per image, as torchvision's detectors return) with
``boxes`` and ``scores`` tensors whose first dimension is the number of detections; every other tensor
with that first dimension (``labels``, ``masks``, ``keypoints``) is reordered with them.
"""

from __future__ import annotations

from typing import Any

import torch


def _is_detection(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("boxes"), torch.Tensor) and \
        isinstance(value.get("scores"), torch.Tensor) and value["boxes"].dim() == 2


def _match(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[int] | None:
    """For each reference detection, the index of its match in ``got`` (one-to-one), or ``None``."""
    n = ref["boxes"].shape[0]
    if got["boxes"].shape != ref["boxes"].shape or got["scores"].shape != ref["scores"].shape:
        return None
    if n == 0:
        return []  # no detections on either side: nothing to pair (a random-weight detector often finds none)
    rb, gb = ref["boxes"].detach().double(), got["boxes"].detach().double()
    rs, gs = ref["scores"].detach().double(), got["scores"].detach().double()
    cost = (rb[:, None, :] - gb[None, :, :]).abs().amax(-1) / (rb.abs().max() + 1e-300) + \
        (rs[:, None] - gs[None, :]).abs() / (rs.abs().max() + 1e-300)
    labels = ref.get("labels"), got.get("labels")
    if isinstance(labels[0], torch.Tensor) and isinstance(labels[1], torch.Tensor) and \
            labels[0].shape == labels[1].shape == (n,):
        cost = cost + (labels[0][:, None] != labels[1][None, :]).double() * 1e6
    order: list[int] = []
    taken: set[int] = set()
    for i in torch.argsort(rs, descending=True).tolist():
        candidates = [j for j in torch.argsort(cost[i]).tolist() if j not in taken]
        if not candidates:
            return None
        taken.add(candidates[0])
        order.append(candidates[0])
    result = [0] * n
    for i, j in zip(torch.argsort(rs, descending=True).tolist(), order):
        result[i] = j
    return result


def _aligned(ref: Any, got: Any) -> Any:
    if not (_is_detection(ref) and _is_detection(got)):
        return got
    perm = _match(ref, got)
    if perm is None:
        return got
    n = ref["boxes"].shape[0]
    index = torch.tensor(perm, dtype=torch.long)
    return {k: (v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
            for k, v in got.items()}


def align_detections(ref: Any, got: Any) -> Any:
    """``got`` with each detection output (:mod:`this module's <asr_fx.detections>` form) reordered to pair
    with ``ref``'s; anything else as it is."""
    if isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)) and len(ref) == len(got):
        return type(got)(align_detections(r, g) for r, g in zip(ref, got))
    return _aligned(ref, got)


__all__ = ["align_detections"]
