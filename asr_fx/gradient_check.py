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

Memory: the check never holds a model's worth of gradients. The two backward passes run one after the
other, and a hook on each parameter reduces its gradient the moment it is accumulated and drops it
(:func:`_stream_gradients`): the original's pass keeps a :class:`_Summary` per parameter (its largest
magnitude, whether it is nonzero and finite, and its values: as they are for a parameter of at most
:data:`EXACT_MAX` elements, else one number per :data:`BLOCK` elements, their sum weighted by seeded random
signs); the checked model's pass reduces its gradient the same way and compares at once. An error in one
element shows in its block's sum in full; errors in one block could only hide by cancelling under random
signs. A block's sum is held to the tolerance of one element, so rounding noise adds up against it (about
``sqrt(BLOCK)`` times one element's, far below :data:`GRAD_RTOL`). The summaries are ``1 / BLOCK`` of the
model's bytes, and what the forward saves for the backward waits in a temporary file
(:func:`_activations_on_disk`). The check can so also be recorded before a model changes in place
(:func:`gradient_record`) and compared after (:func:`record_mismatch`). Every ``.grad`` and ``requires_grad``
is as it was afterwards; buffers, modes and the RNG state are restored by the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from asr_fx.errors import EquivalenceError

#: relative tolerance of a gradient: fp32 reassociation in traced graphs, amplified by the backward
GRAD_RTOL = 1e-3
#: a gradient of at most this many elements is kept and compared element by element
EXACT_MAX = 4096
#: a larger gradient is compared in blocks of this many elements, each through its signed sum
BLOCK = 32
#: the random signs repeat after this many elements (a multiple of BLOCK)
_PERIOD = 65536
#: a tensor the forward saves for the backward of at least this many bytes waits in a temporary file
OFFLOAD_BYTES = 1 << 16
_SEED = 1234


def _outputs(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _loss(model: nn.Module, inputs: Sequence[Any]) -> torch.Tensor | None:
    """A seeded random projection of ``model``'s outputs (train mode), or ``None`` when no output has a gradient."""
    model.train(True)
    torch.manual_seed(_SEED)
    fresh = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tuple(inputs))
    outs = [t for t in _outputs(model(*fresh)) if t.requires_grad]
    if not outs:
        return None
    gen = torch.Generator().manual_seed(_SEED)
    loss = sum((t.double() * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)).sum()
               for t in outs if torch.isfinite(t).all())
    return loss if isinstance(loss, torch.Tensor) and loss.requires_grad else None


@dataclass
class _Summary:
    """What the check compares of one parameter's gradient (see the module docstring)."""

    amax: float  #: its largest magnitude
    numel: int
    due: bool  #: nonzero somewhere and finite everywhere: the checked model owes a nonzero gradient
    values: torch.Tensor  #: the gradient (at most EXACT_MAX elements) or its signed block sums


def _signs(index: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:data:`_PERIOD` random signs (+-1) seeded by a parameter's ``index``, repeated over its gradient."""
    gen = torch.Generator().manual_seed(_SEED + index)
    return (torch.randint(0, 2, (_PERIOD,), generator=gen, dtype=torch.float32) * 2 - 1).to(device, dtype)


def _values(grad: torch.Tensor, index: int) -> torch.Tensor:
    """``grad`` flattened (float64), or for more than :data:`EXACT_MAX` elements one number per :data:`BLOCK`
    elements: their sum with random signs (seeded by the parameter's ``index``: the same for both models),
    computed :data:`_PERIOD` elements at a time (no temporary of the gradient's size)."""
    flat = grad.detach().reshape(-1)
    n = flat.numel()
    if n <= EXACT_MAX:
        return flat.double().clone()
    signs = _signs(index, flat.device, flat.dtype)
    sums = torch.empty(-(-n // BLOCK), dtype=torch.float64, device=flat.device)
    for start in range(0, n, _PERIOD):
        part = flat[start:start + _PERIOD] * signs[:min(_PERIOD, n - start)]
        whole = part.numel() // BLOCK
        first = start // BLOCK
        sums[first:first + whole] = part[:whole * BLOCK].view(whole, BLOCK).sum(1, dtype=torch.float64)
        if whole * BLOCK < part.numel():  # the last, shorter block
            sums[-1] = part[whole * BLOCK:].sum(dtype=torch.float64)
    return sums.float()


def _summary(grad: torch.Tensor, index: int) -> _Summary:
    amax = grad.abs().max().item() if grad.numel() else 0.0
    due = 0.0 < amax < math.inf  # nonzero somewhere and finite everywhere (max propagates NaN)
    return _Summary(amax, grad.numel(), due, _values(grad, index))


def _libc_trim() -> Callable[[], Any]:
    """glibc's ``malloc_trim(0)`` (hands freed heap pages back to the OS), or a no-op elsewhere."""
    try:
        return functools.partial(ctypes.CDLL("libc.so.6").malloc_trim, 0)
    except (OSError, AttributeError):
        return lambda: None


#: called after each gradient of at least ``_TRIM_BYTES`` is dropped: glibc otherwise keeps the freed gradients
#: and activations of the check resident in its heap (its mmap threshold grows with the sizes freed)
_release_freed_memory = _libc_trim()
_TRIM_BYTES = 1 << 20


@contextlib.contextmanager
def _activations_on_disk(model: nn.Module) -> Iterator[None]:
    """Inside the block, what the forward saves for the backward (CPU tensors of at least
    :data:`OFFLOAD_BYTES`, not the model's own parameters and buffers) is written to a temporary file and
    read back when the backward needs it: the same values, without holding a whole backward's activations.
    A tensor that cannot be written stays in memory."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with tempfile.TemporaryDirectory(prefix="asr-fx-check-") as folder:
        count = itertools.count()

        def pack(t: torch.Tensor) -> Any:
            try:
                if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or \
                        t.layout != torch.strided or t.numel() * t.element_size() < OFFLOAD_BYTES or \
                        t.untyped_storage().data_ptr() in own:
                    return t  # (a tensor subclass, another device, a small or the model's own tensor)
                path = os.path.join(folder, f"{next(count)}.pt")
                value = t.detach()
                if value.untyped_storage().nbytes() != value.nbytes or not value.is_contiguous():
                    value = value.contiguous().clone()  # a view: its own values, not the whole storage
                torch.save(value, path)
            except Exception:  # noqa: BLE001 - not written (a full disk, ...): it stays in memory
                return t
            return path

        def unpack(packed: Any) -> torch.Tensor:
            return torch.load(packed, weights_only=True) if isinstance(packed, str) else packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


def _stream_gradients(model: nn.Module, inputs: Sequence[Any], names: Sequence[str],
                      consume: Callable[[str, torch.Tensor], None]) -> bool:
    """``consume(name, gradient)`` for each parameter ``names`` as the backward reaches it, each gradient freed
    right after: only one parameter's gradient is held at a time, not a whole copy of the model's size.
    Parameters the outputs do not depend on are never consumed. ``False`` when no output depends on the
    parameters (nothing was differentiated). The parameters' ``.grad``, ``requires_grad`` and hooks are restored."""
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    saved = [(p.grad, p.requires_grad, p._post_accumulate_grad_hooks) for p in wanted]
    handles = []
    for name, p in zip(names, wanted):
        p.grad = None

        def hook(param: torch.Tensor, name: str = name) -> None:
            if param.grad is not None:
                consume(name, param.grad)
            param.grad = None
            if param.device.type == "cpu" and param.numel() * param.element_size() >= _TRIM_BYTES:
                _release_freed_memory()

        handles.append(p.register_post_accumulate_grad_hook(hook))
    try:
        with torch.enable_grad(), _activations_on_disk(model):
            loss = _loss(model, inputs)
            if loss is None:
                return False
            torch.autograd.backward(loss, inputs=wanted)
            return True
    finally:
        for handle in handles:
            handle.remove()
        for p, (grad, requires_grad, hooks) in zip(wanted, saved):
            p.grad = grad
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if hooks is None:  # as it was: no hook dict (removing the hooks leaves an empty one)
                p._post_accumulate_grad_hooks = None


@dataclass
class GradientRecord:
    """The original's gradients as the check compares them (:func:`gradient_record`)."""

    names: list[str]  #: the parameters compared, in the original's order
    shapes: dict[str, torch.Size]
    summaries: dict[str, _Summary]


def _names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def gradient_record(original: nn.Module, inputs: Sequence[Any], names: Sequence[str] | None = None
                    ) -> GradientRecord | None:
    """The summaries of ``original``'s gradients on ``inputs`` (of its parameters ``names``, default every
    parameter that requires a gradient); ``None`` when its outputs depend on none of them or its backward
    fails on this probe (nothing to compare). The caller restores buffers, modes and the RNG state."""
    names = list(_names(original) if names is None else names)
    shapes = dict((n, p.shape) for n, p in original.named_parameters())
    index = {n: i for i, n in enumerate(names)}
    summaries: dict[str, _Summary] = {}

    def keep(name: str, grad: torch.Tensor) -> None:
        summaries[name] = _summary(grad, index[name])

    try:
        if not names or not _stream_gradients(original, inputs, names, keep):
            return None
    except Exception:  # noqa: BLE001 - the original does not differentiate on this probe: nothing to compare
        return None
    return GradientRecord(names, {n: shapes[n] for n in names}, summaries)


def record_mismatch(record: GradientRecord, checked: nn.Module, inputs: Sequence[Any]) -> str:
    """What differs between the gradients in ``record`` and ``checked``'s on ``inputs`` (empty when they agree or
    there is nothing to compare); each summary is dropped once compared. The caller restores buffers, modes and
    the RNG state."""
    theirs = dict(checked.named_parameters())
    names = [n for n in record.names if n in theirs and theirs[n].requires_grad and theirs[n].shape == record.shapes[n]]
    found = record.summaries
    scale = max((found[n].amax for n in names if n in found and found[n].numel), default=0.0)
    if scale == 0.0 or not torch.isfinite(torch.tensor(scale)):
        return ""
    index = {n: i for i, n in enumerate(record.names)}
    must = {n for n in names if n in found and found[n].due}  # a gradient in the original: one is due here
    got_some: set[str] = set()
    off: list[tuple[float, str]] = []

    def compare(name: str, b: torch.Tensor) -> None:
        a = found.pop(name, None)
        if name not in must or a is None or b.numel() == 0 or b.abs().max().item() == 0:  # (NaN counts as nonzero)
            return
        got_some.add(name)
        ref = max(a.amax, GRAD_RTOL * scale)
        err = (a.values.double() - _values(b, index[name]).double()).abs().max().item() / ref
        if not err <= GRAD_RTOL:
            off.append((err, name))

    try:
        _stream_gradients(checked, inputs, [n for n in names if n in must], compare)
    except Exception as exc:  # noqa: BLE001 - reported as the mismatch
        return f"its backward fails where the model's runs: {type(exc).__name__}: {exc}"
    finally:
        found.clear()
    lost = [n for n in names if n in must and n not in got_some]
    if lost:
        more = f" (and {len(lost) - 5} more)" if len(lost) > 5 else ""
        return (f"parameters {lost[:5]}{more} get a gradient in the model but none in the instrumented model (a "
                "backward lost in capture, e.g. a custom autograd.Function traced into its forward)")
    if off:
        err, name = max(off)
        return f"the gradient of `{name}` differs by {err:.2g} x its largest value (tolerance {GRAD_RTOL:g})"
    return ""


def gradient_mismatch(original: nn.Module, checked: nn.Module, inputs: Sequence[Any]) -> str:
    """What differs between the two models' parameter gradients on ``inputs`` (empty when they agree or
    there is nothing to compare): :func:`gradient_record` of ``original``, then :func:`record_mismatch` of
    ``checked``, one backward after the other. The caller restores buffers, modes and the RNG state."""
    theirs = dict(checked.named_parameters())
    names = [n for n, p in original.named_parameters() if p.requires_grad and n in theirs
             and theirs[n].requires_grad and theirs[n].shape == p.shape]
    record = gradient_record(original, inputs, names) if names else None
    return "" if record is None else record_mismatch(record, checked, inputs)


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _raise(problem: str, what: str) -> None:
    if problem:
        raise EquivalenceError(
            f"{what} does not train like the model: {problem}. This is a bug in asr-fx's capture of this model: "
            "please report it. Way out: keep the layer that computes it as one call with leaf_modules=[...]; "
            "check=False skips this check.")


def check_gradients(original: nn.Module, checked: nn.Module, inputs: Sequence[Any], what: str) -> None:
    """Raise :class:`EquivalenceError` if ``checked`` (every ASR block at ``v = 1``) does not give the
    original's parameters the gradients the original gives them (see the module docstring)."""
    if not _on_meta(original):
        _raise(gradient_mismatch(original, checked, inputs), what)


def check_recorded_gradients(record: GradientRecord, checked: nn.Module, inputs: Sequence[Any], what: str) -> None:
    """:func:`check_gradients` against a :func:`gradient_record` taken before the model changed in place."""
    _raise(record_mismatch(record, checked, inputs), what)
