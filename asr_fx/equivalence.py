"""The numerical checks ``instrument`` and ``fuse`` run before they return (never a silently wrong model).

- :func:`check_instrumented`: the instrumented model with every ASR block at ``v = 1`` computes what
  the original model computes on a probe input, in eval mode and in train mode (same RNG seed for
  both, BatchNorm running statistics and the RNG state restored afterwards), and gives the original's
  parameters the gradients the original gives them (:mod:`asr_fx.gradient_check`).
- :func:`check_fused`: the fused model computes what the model it was given computes, in eval mode.

A mismatch raises :class:`asr_fx.errors.EquivalenceError` naming the first layer (in the checked
model's execution order) whose output differs. The probe is ``example_inputs``, or, for a model whose
first layer is a conv or linear, a random input derived from that layer (``instrument``), or the input
shape ``instrument`` recorded (``fuse``); with none of them the check is skipped. ``check=False`` on
``instrument``/``fuse`` turns it off (huge models).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from asr_fx.asr import ASR
from asr_fx.config import asr_config
from asr_fx.errors import EquivalenceError
from asr_fx.gradient_check import check_gradients
from asr_fx.passes.capture.concrete_values import state_kept

#: max |a - b| <= RTOL * max |reference| (+ ATOL): fp32 reassociation in folds and traced graphs
RTOL = 1e-4
ATOL = 1e-6
_SEED = 1234


def derive_probe(model: nn.Module, size: int = 64) -> tuple[torch.Tensor, ...] | None:
    """A random input for a model whose first layer is a 1d/2d/3d conv or a linear layer, else ``None``."""
    first = next((m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))), None)
    ref = next(iter(model.parameters()), None)
    if first is None or ref is None or not ref.is_floating_point():
        return None
    gen = torch.Generator().manual_seed(_SEED)
    if isinstance(first, nn.Linear):
        shape: tuple[int, ...] = (2, first.in_features)
    else:
        shape = (2, first.in_channels) + (size,) * len(first.kernel_size)
    return (torch.randn(shape, generator=gen).to(ref.device, ref.dtype),)


def floating_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output, in order: a tensor, nested tuples/lists/dicts, or a
    transformers ``ModelOutput`` (what the equivalence checks compare)."""
    if hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _error(ref: Any, got: Any) -> float | None:
    """The largest relative error over the outputs' float tensors, or ``None`` if they do not pair up."""
    a, b = floating_tensors(ref), floating_tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        rtol = RTOL if x.dtype in (torch.float32, torch.float64) else 100 * RTOL  # half precision
        x, y = x.detach().double(), y.detach().double()
        if not torch.isfinite(x).all():
            continue
        err = ((x - y).abs().max() / (x.abs().max() * rtol + ATOL)).item() if x.numel() else 0.0
        worst = max(worst, err)
    return worst


@contextlib.contextmanager
def saved_state(*models: nn.Module) -> Iterator[None]:
    """Restore buffers (BN running stats), modes and the RNG state after the block."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(state_kept(model))
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def run_on_copies(model: nn.Module, inputs: Sequence[Any], training: bool) -> Any:
    """``model(*inputs)`` on fresh copies of the inputs: a forward that writes into its input (an in-place
    op on it) neither changes the caller's tensors nor what the next model is given."""
    model.train(training)
    torch.manual_seed(_SEED)
    fresh = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tuple(inputs))
    with torch.no_grad():
        return model(*fresh)


def _first_divergence(reference: nn.Module, checked: nn.Module, inputs: Sequence[Any], training: bool) -> str:
    """The first module (in ``checked``'s execution order) whose output differs from ``reference``'s
    module at the same path; empty when none is found."""
    outputs: dict[str, Any] = {}
    order: list[str] = []

    def record(store: dict[str, Any], name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:
            store.setdefault(name, out)
            if store is not outputs:
                order.append(name)
        return hook

    theirs: dict[str, Any] = {}
    handles = [m.register_forward_hook(record(outputs, n)) for n, m in reference.named_modules() if n]
    names = set(dict(reference.named_modules()))
    handles += [m.register_forward_hook(record(theirs, n)) for n, m in checked.named_modules()
                if n in names and not isinstance(m, ASR)]
    try:
        with saved_state(reference, checked):
            run_on_copies(reference, inputs, training)
            run_on_copies(checked, inputs, training)
    except Exception:  # noqa: BLE001 - localisation is best effort; the mismatch itself is already known
        return ""
    finally:
        for h in handles:
            h.remove()
    for name in order:
        err = _error(outputs.get(name), theirs[name]) if name in outputs else None
        if err is not None and err > 1:
            return name
    return ""


@contextlib.contextmanager
def _unit_attention(model: nn.Module) -> Iterator[None]:
    """Every ASR block's ``v`` is 1 inside the block."""
    blocks = [m for m in model.modules() if isinstance(m, ASR)]
    for block in blocks:
        block.attention_value = (lambda b=block: torch.ones(b.broadcast_shape, dtype=b.psi.dtype,
                                                            device=b.psi.device))
    try:
        yield
    finally:
        for block in blocks:
            del block.attention_value


def _on_meta(model: nn.Module, inputs: Sequence[Any]) -> bool:
    tensors = [*model.parameters(), *model.buffers(), *(t for t in inputs if isinstance(t, torch.Tensor))]
    return any(t.is_meta for t in tensors)


def _compare(reference: nn.Module, checked: nn.Module, inputs: Sequence[Any], training: bool, what: str) -> None:
    if _on_meta(reference, inputs):
        return  # nothing to compute with: a model on the meta device has no values yet
    with saved_state(reference, checked):
        try:
            expected = run_on_copies(reference, inputs, training)
        except Exception:  # noqa: BLE001 - the probe does not suit the reference in this mode: nothing to check
            return
        try:
            got = run_on_copies(checked, inputs, training)
        except Exception as exc:  # noqa: BLE001 - re-raised as the check's error
            raise EquivalenceError(f"{what} fails on a probe input the model runs on ({'train' if training else 'eval'}"
                                   f" mode): {type(exc).__name__}: {exc}") from exc
    err = _error(expected, got)
    if err is not None and err <= 1:
        return
    mode = "train" if training else "eval"
    where = _first_divergence(reference, checked, inputs, training)
    detail = "its outputs do not have the same structure" if err is None else \
        f"max error {err * RTOL:.2g} x max|reference| (tolerance {RTOL:g})"
    at = f"; the first layer whose output differs is `{where}`" if where else ""
    raise EquivalenceError(
        f"{what} does not compute what the model computes in {mode} mode on the probe input: {detail}{at}. "
        "This is a bug in asr-fx's capture of this model: please report it. Way out: keep the layer as one call "
        "with leaf_modules=[...] (or exclude= its site); check=False skips this check."
    )


def check_instrumented(original: nn.Module, instrumented: nn.Module, inputs: Sequence[Any] | None) -> None:
    """Raise :class:`EquivalenceError` unless ``instrumented`` with every ``v = 1`` computes what
    ``original`` computes on ``inputs`` (or a derived probe), in eval and in train mode.

    Runs on ``instrumented`` itself, not on a copy (a copy would double the memory of a big model): each
    block's ``v`` is 1 for the check only, and buffers, modes and the RNG state are restored after it.
    ``original`` may be :func:`expected_outputs`' record of the model before it changed in place
    (``instrument(..., inplace=True)``): then the outputs are compared, not the gradients."""
    if isinstance(original, _Recorded):
        inputs = original.inputs
    inputs = inputs if inputs is not None else derive_probe(original)
    if inputs is None:
        return
    with _unit_attention(instrumented):
        for training in (False, True):
            _compare(original, instrumented, inputs, training, "the instrumented model (every ASR block at v = 1)")
        if not isinstance(original, _Recorded):
            _compare_gradients(original, instrumented, inputs)


def _compare_gradients(original: nn.Module, work: nn.Module, inputs: Sequence[Any]) -> None:
    """The original's parameters get the same gradients in ``work`` (:mod:`asr_fx.gradient_check`)."""
    with saved_state(original, work):
        check_gradients(original, work, inputs, "the instrumented model (every ASR block at v = 1)")


class _Recorded(nn.Module):
    """A reference that returns the outputs a model computed before it changed (``inputs``: the probe)."""

    def __init__(self, outputs: dict[bool, Any], inputs: tuple[Any, ...]) -> None:
        super().__init__()
        self.outputs, self.inputs = outputs, inputs

    def forward(self, *args: Any) -> Any:
        out = self.outputs[self.training]
        if isinstance(out, BaseException):
            raise out
        return out


def expected_outputs(model: nn.Module, inputs: Sequence[Any] | None) -> _Recorded | None:
    """``model``'s outputs on ``inputs`` (or a derived probe) in eval and train mode, as a module that
    returns them: the reference of :func:`check_instrumented` for a model changed in place."""
    inputs = tuple(inputs) if inputs is not None else derive_probe(model)
    if inputs is None or _on_meta(model, inputs):
        return None
    outputs: dict[bool, Any] = {}
    with saved_state(model):
        for training in (False, True):
            try:
                outputs[training] = run_on_copies(model, inputs, training)
            except Exception as exc:  # noqa: BLE001 - the probe does not suit this mode: nothing to check there
                outputs[training] = exc
    return _Recorded(outputs, inputs)


def probe_inputs(model: nn.Module, example_inputs: Sequence[Any] | None) -> tuple[Any, ...] | None:
    """``example_inputs``, else a random input of the shape ``instrument`` recorded on ``model``, else ``None``."""
    if example_inputs is not None:
        return tuple(example_inputs)
    config = asr_config(model)
    shape = config.input_shape if config is not None else None
    ref = next(iter(model.parameters()), None)
    if shape and ref is not None and ref.is_floating_point():
        return (random_probe(shape, ref),)
    return None  # no derived probe: fuse specializes to the shapes it was given, a guessed rank could differ


def random_probe(shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded standard-normal input of ``shape`` (on ``like``'s device and dtype when given). Never
    zeros: a forward may check its input's values (an all-zero image refused, a mask from ``x != 0``)."""
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_SEED))
    return x.to(like.device, like.dtype) if like is not None else x


def check_fused(given: nn.Module, fused: nn.Module, inputs: Sequence[Any] | None) -> None:
    """Raise :class:`EquivalenceError` unless ``fused`` computes what ``given`` computes in eval mode."""
    inputs = probe_inputs(given, inputs)
    if inputs is None:
        return
    _compare(given, fused, inputs, False, "the fused model")
