"""The numerical checks ``instrument`` and ``fuse`` run before they return (never a silently wrong model).

- :func:`check_instrumented`: the instrumented model with every ASR block at ``v = 1`` computes what
  the original model computes on a probe input, in eval mode and in train mode (same RNG seed for
  both, BatchNorm running statistics and the RNG state restored afterwards), and gives the original's
  parameters the gradients the original gives them (:mod:`asr_fx.gradient_check`).
- :func:`check_fused`: the fused model computes what the model it was given computes, in eval mode.

A mismatch raises :class:`asr_fx.errors.EquivalenceError` naming the first layer (in the checked
model's execution order) whose output differs. The probe is ``example_inputs``, or, for a model whose
first layer is a conv or linear, a random input derived from that layer, or the input shape ``instrument``
recorded (``fuse``); ``fuse`` warns (:class:`UncheckedWarning`) when no probe input is known or the model does not
run on the derived one. ``check=False`` on ``instrument``/``fuse`` turns it off (huge models).

Outputs compare by :func:`asr_fx.noise_floor.tensor_error`: same dtypes, shapes and non-finite positions, finite
values relative to the reference, and where that fails, relative to the model's own rounding noise measured by
moving every weight one ulp (:func:`asr_fx.noise_floor.perturbed_outputs`); never against an absolute floor.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from asr_fx.asr import ASR
from asr_fx.config import asr_config
from asr_fx.detections import align_detections
from asr_fx.errors import EquivalenceError
from asr_fx.gradient_check import GradientRecord, check_gradients, check_recorded_gradients, gradient_record
from asr_fx.noise_floor import noise_of, perturbed_outputs, tensor_error
from asr_fx.passes.capture.concrete_values import state_kept

#: max |a - b| <= RTOL * max |reference| in fp32 (:data:`asr_fx.noise_floor.RTOL` by dtype), or within the
#: model's measured rounding noise; no absolute floor
RTOL = 1e-4
_SEED = 1234
_WHAT = "the instrumented model (every ASR block at v = 1)"


class UncheckedWarning(UserWarning):
    """``fuse`` returned a model it could not check numerically (no probe input it runs on)."""


def derive_probe(model: nn.Module, size: int = 64) -> tuple[torch.Tensor, ...] | None:
    """A random input for a model whose first layer is a 1d/2d/3d conv or a linear layer, else ``None``."""
    first = next((m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))), None)
    ref = input_like(model)
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


def _leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    elif isinstance(out, dict):
        out = list(out.values())
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _error(ref: Any, got: Any, noise: Sequence[Any] = ()) -> float | None:
    """The largest error over the outputs' tensors in units of the tolerance, or ``None`` if they do not pair up."""
    found = _error_detail(ref, got, noise)
    return None if found is None else found[0]


def _error_detail(ref: Any, got: Any, noise: Sequence[Any] = ()) -> tuple[float, str] | None:
    """:func:`_error` and what differs in the worst output tensor (dtype, inf positions, values); detections
    compare as sets (:func:`asr_fx.detections.align_detections`)."""
    got = align_detections(ref, got)
    noise = [align_detections(ref, n) for n in noise]
    a, b = _leaves(ref), _leaves(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    runs = [_leaves(n) for n in noise]
    worst, detail = 0.0, ""
    for i, (x, y) in enumerate(zip(a, b)):
        floor = noise_of(x, [r[i] for r in runs if len(r) == len(a)]) if runs else 0.0
        err, what = tensor_error(x, y, floor)
        if err > worst:
            worst, detail = err, (f"output tensor {i}: {what}" if len(a) > 1 else what)
    return worst, detail


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


def _compare(reference: nn.Module, checked: nn.Module, inputs: Sequence[Any], training: bool, what: str,
             noise_from: nn.Module | None = None) -> bool:
    """Raise :class:`EquivalenceError` unless ``checked`` computes what ``reference`` computes on ``inputs``;
    ``False`` when nothing could be compared (the reference does not run on ``inputs``, or has no values).
    The rounding noise is measured on ``noise_from`` (default ``reference``)."""
    if _on_meta(reference, inputs):
        return False  # nothing to compute with: a model on the meta device has no values yet
    with saved_state(reference, checked):
        try:
            expected = run_on_copies(reference, inputs, training)
        except Exception:  # noqa: BLE001 - the probe does not suit the reference in this mode: nothing to check
            return False
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints a failing graph's code to stderr
                got = run_on_copies(checked, inputs, training)
        except Exception as exc:  # noqa: BLE001 - re-raised as the check's error
            raise EquivalenceError(f"{what} fails on a probe input the model runs on ({'train' if training else 'eval'}"
                                   f" mode): {type(exc).__name__}: {exc}") from exc
        found = _error_detail(expected, got)
        if found is not None and not any(t.numel() for t in _leaves(expected)):
            return False  # both empty (a detector that found nothing): the same structure, but nothing compared
        if found is not None and found[0] > 1:
            # not within RTOL of the reference: is it within the model's own rounding noise?
            noise = perturbed_outputs(noise_from or reference, lambda m: run_on_copies(m, inputs, training))
            found = _error_detail(expected, got, noise)
    if found is not None and found[0] <= 1:
        return True
    mode = "train" if training else "eval"
    where = _first_divergence(reference, checked, inputs, training)
    detail = "its outputs do not have the same structure" if found is None else found[1]
    at = f"; the first layer whose output differs is `{where}`" if where else ""
    sensitive = found is not None and "rounding noise" in found[1] and found[0] < 100
    cause = ("This model's outputs move with rounding alone (see the noise above), and the difference is within "
             "100 times that: it may be rounding amplified by the model (a sort, a top-k, a norm over very few "
             "values) rather than a wrong capture; check on example_inputs where the outputs are stable" if sensitive
             else "This is a bug in asr-fx's capture of this model: please report it")
    raise EquivalenceError(
        f"{what} does not compute what the model computes in {mode} mode on the probe input: {detail}{at}; "
        f"more than the model's own rounding noise (every weight moved by one ulp) explains. {cause}. "
        "Way out: keep the layer as one call with leaf_modules=[...] (or exclude= its site); check=False skips "
        "this check."
    )


def check_instrumented(original: nn.Module, instrumented: nn.Module, inputs: Sequence[Any] | None) -> None:
    """Raise :class:`EquivalenceError` unless ``instrumented`` with every ``v = 1`` computes what
    ``original`` computes on ``inputs`` (or a derived probe), in eval and in train mode.

    Runs on ``instrumented`` itself, not on a copy (a copy would double the memory of a big model): each
    block's ``v`` is 1 for the check only, and buffers, modes and the RNG state are restored after it.
    ``original`` may be :func:`expected_outputs`' record of the model before it changed in place
    (``instrument(..., inplace=True)``): its outputs and gradient summaries are compared."""
    if isinstance(original, _Recorded):
        inputs = original.inputs
    inputs = inputs if inputs is not None else derive_probe(original)
    if inputs is None:
        return
    with _unit_attention(instrumented):
        for training in (False, True):
            _compare(original, instrumented, inputs, training, _WHAT)
        if not isinstance(original, _Recorded):
            _compare_gradients(original, instrumented, inputs)
        elif original.gradients is not None:
            with saved_state(instrumented):
                check_recorded_gradients(original.gradients, instrumented, inputs, _WHAT)


def _compare_gradients(original: nn.Module, work: nn.Module, inputs: Sequence[Any]) -> None:
    """The original's parameters get the same gradients in ``work`` (:mod:`asr_fx.gradient_check`)."""
    with saved_state(original, work):
        check_gradients(original, work, inputs, _WHAT)


class _Recorded(nn.Module):
    """A reference that returns the outputs a model computed before it changed (``inputs``: the probe), with
    the summaries of its gradients (:func:`asr_fx.gradient_check.gradient_record`)."""

    def __init__(self, outputs: dict[bool, Any], inputs: tuple[Any, ...], gradients: GradientRecord | None) -> None:
        super().__init__()
        self.outputs, self.inputs, self.gradients = outputs, inputs, gradients

    def forward(self, *args: Any) -> Any:
        out = self.outputs[self.training]
        if isinstance(out, BaseException):
            raise out
        return out


def expected_outputs(model: nn.Module, inputs: Sequence[Any] | None, modes: Sequence[bool] = (False, True),
                     gradients: bool = True) -> _Recorded | None:
    """``model``'s outputs on ``inputs`` (or a derived probe) in eval and train mode, as a module that returns
    them, and the summaries of its gradients: the reference of :func:`check_instrumented` for a model changed
    in place (``modes``: the training flags to record; ``gradients=False``: outputs only)."""
    inputs = tuple(inputs) if inputs is not None else derive_probe(model)
    if inputs is None or _on_meta(model, inputs):
        return None
    outputs: dict[bool, Any] = {}
    with saved_state(model):
        for training in modes:
            try:
                outputs[training] = run_on_copies(model, inputs, training)
            except Exception as exc:  # noqa: BLE001 - the probe does not suit this mode: nothing to check there
                outputs[training] = exc
        record = gradient_record(model, inputs) if gradients else None
    return _Recorded(outputs, inputs, record)


def probe_inputs(model: nn.Module, example_inputs: Sequence[Any] | None) -> tuple[Any, ...] | None:
    """``example_inputs``, else a random input of the shape ``instrument`` recorded on ``model``, else ``None``."""
    if example_inputs is not None:
        return tuple(example_inputs)
    config = asr_config(model)
    shape = config.input_shape if config is not None else None
    ref = input_like(model)
    if shape and ref is not None and ref.is_floating_point():
        return (random_probe(shape, ref),)
    return None  # no derived probe: fuse specializes to the shapes it was given, a guessed rank could differ


def input_like(model: nn.Module) -> torch.Tensor | None:
    """The tensor whose device and dtype a probe input takes: the weight of the model's first conv/linear
    layer (the layer an input most likely meets), else its first parameter. Not simply the first parameter:
    a float64 scalar gain registered first must not make a float32 model's probe float64."""
    first = next((m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))), None)
    if first is not None and parametrize.is_parametrized(first, "weight"):
        # never `.weight`: that runs the parametrization, which may update state (spectral_norm's power
        # iteration writes its `_u` in train mode); the original tensor has the dtype and device
        originals = cast(Any, first.parametrizations)["weight"]  # `original`, or `original0`... (weight_norm)
        weight = originals.original if hasattr(originals, "original") else originals.original0
    else:
        weight = getattr(first, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    return next(iter(model.parameters()), None)


def random_probe(shape: Sequence[int], like: torch.Tensor | None = None) -> torch.Tensor:
    """A seeded standard-normal input of ``shape`` (on ``like``'s device and dtype when given). Never
    zeros: a forward may check its input's values (an all-zero image refused, a mask from ``x != 0``)."""
    x = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_SEED))
    return x.to(like.device, like.dtype) if like is not None else x


def fused_probe(given: nn.Module, inputs: Sequence[Any] | None) -> tuple[tuple[Any, ...] | None, bool]:
    """The probe :func:`check_fused` uses and whether it was derived from the first layer (its rank a guess)."""
    probe = probe_inputs(given, inputs)
    return (probe, False) if probe is not None else (derive_probe(given), True)


def check_fused(given: nn.Module, fused: nn.Module, inputs: Sequence[Any] | None,
                before: _Recorded | None = None, warn: bool = True) -> bool:
    """Raise :class:`EquivalenceError` unless ``fused`` computes what ``given`` computes in eval mode, on
    ``inputs``, else the recorded input shape, else a probe derived from the first conv/linear layer; warn
    (:class:`UncheckedWarning`) when there is none the model runs on.

    A derived probe guesses the input's rank: a fused model that returns other shapes on it, or fails on it
    (a ``(1, 1, C)`` scale folded for batched token inputs ``(B, L, C)``), is reported with a warning naming
    the assumption, not refused; any difference in values is refused.

    ``before``: ``given``'s eval outputs on :func:`fused_probe`, recorded before ``fuse(..., inplace=True)``
    folded into its tensors; the rounding noise is then measured on ``fused``, the same function.

    Returns whether anything was compared; ``warn=False``: no warning when nothing was (the caller checks
    otherwise)."""
    probe, derived = fused_probe(given, inputs)
    try:
        checked = probe is not None and _compare(given if before is None else before, fused, probe, False,
                                                 "the fused model", noise_from=None if before is None else fused)
    except EquivalenceError as exc:
        if not (derived and ("same structure" in str(exc) or "fails on a probe" in str(exc))):
            raise
        warnings.warn(f"fuse checked the fused model on a probe input derived from the model's first layer, whose "
                      f"rank is a guess, and the result differs in its shapes there ({str(exc)[:200]}): folds "
                      "without example_inputs assume batched inputs of the rank the model's scales have. Pass "
                      "example_inputs=(an input the model takes,) to fuse so the folds and the check use its shapes.",
                      UncheckedWarning, stacklevel=3)
        return False
    if not checked and warn:
        why = ("no probe input is known (no example_inputs, no input shape recorded by instrument, and the first "
               "layer is no conv or linear)" if probe is None else
               f"the model does not run on the {'derived ' if derived else ''}probe input, or its outputs there are "
               "empty (a detector that finds nothing)")
        warnings.warn(f"fuse could not check the fused model against the model it was given: {why}. Pass "
                      "example_inputs=(an input the model takes,) to fuse so the check runs (check=False "
                      "silences this).", UncheckedWarning, stacklevel=3)
    return checked
