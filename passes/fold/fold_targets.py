"""Fold targets: the layers a per-channel scale can go into, with the paper's formulas (Appendix A),
and the table of which tensors are used where (a fold may only replace an unshared tensor).

Output side, ``layer(x) * v == layer'(x)``: :func:`scale_outputs` (conv, conv-transpose, BN, GN,
IN, LN, linear, multi-head attention's output projection).
Input side, ``layer(x * s) == layer'(x)``: :func:`scale_inputs` (conv, conv-transpose, linear,
eval-mode BN), used when a scale is pushed forward into the next layer.

``v``/``s`` is 1-D, one entry per channel. Parameters are replaced by new ``nn.Parameter`` objects
(never written into in place, so a tensor that something else shares is never changed); callers
check beforehand that no other call or module uses them. Inside :func:`folding_in_place` (what
:func:`asr_fx.fuse` uses on its private copy, whose tensors nothing outside shares) the new values are
written into the existing tensors instead: no second copy of a folded layer is held while folding.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..graph.graph_queries import fetch_attr, is_plain_layer
from ..graph.op_tables import NORM_MODULES

_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("asr_fx_fold_in_place", default=False)


@contextlib.contextmanager
def folding_in_place() -> Iterator[None]:
    """Inside the block, :func:`replace_tensor` writes into the existing tensor when shape, dtype and device
    allow. Only for a model whose tensors no one else holds (a private copy, or ``inplace=True``): the
    folded tensors themselves are then changed, not replaced."""
    token = _IN_PLACE.set(True)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``owner.<name>`` to a fresh copy of ``value``, as a Parameter if it was one (inside
    :func:`folding_in_place`: ``value`` written into the tensor already there, when it fits)."""
    old = getattr(owner, name)
    if _IN_PLACE.get() and isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype \
            and old.device == value.device and not old._is_view() and old.data_ptr() != value.data_ptr():
        with torch.no_grad():
            old.copy_(value.detach())
        return
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(owner, name, value.detach().clone())


def conv_weight_out_scaled(w: torch.Tensor, v: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """Eq. 6 on a raw weight: output channel ``o`` scaled by ``v[o]``.

    Conv weights are ``(out, in/groups, *k)``; transposed conv weights are ``(in, out/groups, *k)``
    with output channel ``o = g * (out/groups) + j``.
    """
    k = (1,) * (w.dim() - 2)
    if not transposed:
        return w * v.reshape(-1, 1, *k)
    in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
    grouped = w.reshape(groups, in_per_group, out_per_group, *w.shape[2:])
    return (grouped * v.reshape(groups, 1, out_per_group, *k)).reshape(w.shape)


def conv_weight_in_scaled(w: torch.Tensor, s: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """Input channel ``i`` of a conv scaled by ``s[i]``: ``conv(x * s) == conv'(x)``.

    Conv input channel ``i = g * (in/groups) + j`` is column ``j`` of group ``g``'s rows;
    a transposed conv's input channel is its weight's first dimension.
    """
    k = (1,) * (w.dim() - 2)
    if transposed:
        return w * s.reshape(-1, 1, *k)
    out_per_group, in_per_group = w.shape[0] // groups, w.shape[1]
    grouped = w.reshape(groups, out_per_group, in_per_group, *w.shape[2:])
    return (grouped * s.reshape(groups, 1, in_per_group, *k)).reshape(w.shape)


def _scale_conv_out(conv: _ConvNd, v: torch.Tensor) -> None:
    transposed = isinstance(conv, _ConvTransposeNd)
    replace_tensor(conv, "weight", conv_weight_out_scaled(conv.weight, v, conv.groups, transposed))
    if conv.bias is not None:
        replace_tensor(conv, "bias", conv.bias * v)


def _scale_linear_out(linear: nn.Linear, v: torch.Tensor) -> None:
    """Eq. 12: rows of ``W`` and entries of ``b`` scaled."""
    replace_tensor(linear, "weight", linear.weight * v.reshape(-1, 1))
    if linear.bias is not None:
        replace_tensor(linear, "bias", linear.bias * v)


def _scale_norm_out(norm: nn.Module, v: torch.Tensor) -> None:
    """Eq. 7/11: ``gamma' = gamma * v``, ``beta' = beta * v`` (train mode too).

    A norm without an affine gets ``gamma = v`` as a buffer (and ``beta = 0`` for BN), so the
    parameter count does not change; the exported ONNX op is the same either way
    (BatchNormalization, InstanceNormalization and LayerNormalization always carry a scale; the
    GroupNorm decomposition already has its Mul/Add), which ``tests/test_fold_targets.py`` checks.
    """
    if isinstance(norm, nn.LayerNorm):
        v = v.reshape((1,) * (len(norm.normalized_shape) - 1) + (-1,))
    weight = getattr(norm, "weight", None)
    if weight is None:
        if "weight" in norm._parameters:
            del norm._parameters["weight"]
        norm.register_buffer("weight", v.expand(norm.normalized_shape).clone() if isinstance(norm, nn.LayerNorm)
                             else v.detach().clone())
        if isinstance(norm, _BatchNorm):
            if "bias" in norm._parameters:
                del norm._parameters["bias"]
            norm.register_buffer("bias", torch.zeros_like(v))
        if hasattr(norm, "affine"):
            norm.affine = True
        if hasattr(norm, "elementwise_affine"):
            norm.elementwise_affine = True
        return
    replace_tensor(norm, "weight", weight * v)
    if getattr(norm, "bias", None) is not None:
        replace_tensor(norm, "bias", norm.bias * v)


def scale_outputs(module: nn.Module) -> tuple[str, Callable[[torch.Tensor], None], list[torch.Tensor]] | None:
    """``(kind, apply, tensors)`` for a module whose output channels can take a scale, else ``None``.

    ``kind`` is what the fusion report says (``conv``, ``linear``, ``bn``, ``norm``); ``apply(v)``
    folds ``v``; ``tensors`` are the parameters and buffers ``apply`` replaces.
    """
    if not is_plain_layer(module):
        return None  # a composite layer (norm + activation, ...): a scale after it does not commute into it
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        return "conv", lambda v: _scale_conv_out(module, v), own
    if isinstance(module, nn.Linear):
        return "linear", lambda v: _scale_linear_out(module, v), own
    if isinstance(module, NORM_MODULES):
        return ("bn" if isinstance(module, _BatchNorm) else "norm"), lambda v: _scale_norm_out(module, v), own
    if isinstance(module, nn.MultiheadAttention):
        proj = module.out_proj
        tensors = list(proj.parameters(recurse=False))
        return "linear", lambda v: _scale_linear_out(proj, v), tensors
    return None


def _bn_statistics_for_input_scale(bn: _BatchNorm, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean / s, (var + eps) / s^2 - eps)`` computed in float64, cast to the buffers' dtype."""
    s64, eps = s.detach().double(), bn.eps
    mean = bn.running_mean.double() / s64
    var = (bn.running_var.double() + eps) / (s64 * s64) - eps
    return mean.to(bn.running_mean.dtype), var.to(bn.running_var.dtype)


def _bn_input_scale_error(bn: _BatchNorm, s: torch.Tensor) -> str | None:
    """Why the cast statistics of :func:`_bn_statistics_for_input_scale` would not give the exact BN of
    ``x * s`` (overflow, or ``var + eps`` lost to rounding), checked per channel, or ``None``."""
    mean, var = _bn_statistics_for_input_scale(bn, s)
    s64, eps = s.detach().double(), bn.eps
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
        bad = int((~torch.isfinite(var) | ~torch.isfinite(mean)).nonzero()[0, 0])
        return f"scale entry s[{bad}] = {float(s64[bad]):.3g} overflows `BatchNorm`'s running statistics"
    # the affine the folded BN computes on x, against the exact one (|s| / std, mean / std)
    got_a = 1 / torch.sqrt(var.double() + eps)
    want_a = s64.abs() / torch.sqrt(bn.running_var.double() + eps)
    got_b = got_a * mean.double()
    want_b = torch.sign(s64) * bn.running_mean.double() / torch.sqrt(bn.running_var.double() + eps)
    tol = 64 * torch.finfo(bn.running_var.dtype).eps
    err = torch.maximum((got_a - want_a).abs() / want_a.abs().clamp_min(1e-300),
                        (got_b - want_b).abs() / want_b.abs().clamp_min(1e-300))
    if bool((err > tol).any()) or not bool(torch.isfinite(err).all()):
        bad = int(torch.nan_to_num(err, nan=float("inf")).argmax())
        return (f"scale entry s[{bad}] = {float(s64[bad]):.3g} cannot be folded into `BatchNorm`'s running "
                f"statistics in {bn.running_var.dtype} (var/s^2 loses precision); the mul stays")
    return None


def _scale_bn_in(bn: _BatchNorm, s: torch.Tensor) -> None:
    """Eval BN of ``x * s``: ``mean' = mean / s``, ``var' + eps = (var + eps) / s^2``, ``gamma' = gamma * sign(s)``
    (computed in float64; :func:`input_refusal` checked the cast values are exact)."""
    mean, var = _bn_statistics_for_input_scale(bn, s)
    replace_tensor(bn, "running_mean", mean)
    replace_tensor(bn, "running_var", var)
    sign = torch.sign(s)
    if bool((sign > 0).all()):
        return
    if bn.weight is None:
        _scale_norm_out(bn, sign)
    else:
        replace_tensor(bn, "weight", bn.weight * sign)


def scale_inputs(module: nn.Module) -> tuple[str, Callable[[torch.Tensor], None], list[torch.Tensor]] | None:
    """``(kind, apply, tensors)`` for a module whose input channels can take a scale, else ``None``
    (see :func:`input_refusal` for the scales it cannot take)."""
    if not is_plain_layer(module):
        return None  # a composite layer (weight-standardized conv, ...): its input scale does not commute in
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        transposed = isinstance(module, _ConvTransposeNd)

        def conv_in(s: torch.Tensor) -> None:
            replace_tensor(module, "weight", conv_weight_in_scaled(module.weight, s, module.groups, transposed))

        return "next-conv", conv_in, own
    if isinstance(module, nn.Linear):
        return "next-linear", lambda s: replace_tensor(module, "weight", module.weight * s.reshape(1, -1)), own
    if isinstance(module, _BatchNorm):
        return "next-bn", lambda s: _scale_bn_in(module, s), own
    return None


def input_refusal(module: nn.Module, s: torch.Tensor) -> str | None:
    """Why ``module``'s input channels cannot take ``s`` (asked before anything changes), or ``None``."""
    if isinstance(module, _BatchNorm):
        if module.training or module.running_var is None:
            return f"`{type(module).__name__}` uses batch statistics; only an eval BN with running stats takes it"
        if bool((s == 0).any()):
            return "the scale has zero entries, which a following BatchNorm cannot undo"
        return _bn_input_scale_error(module, s)
    return None


def in_channels(module: nn.Module) -> int | None:
    """How many input channels a module that :func:`scale_inputs` accepts takes."""
    if isinstance(module, (_ConvNd, _ConvTransposeNd)):
        return module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, _BatchNorm):
        return module.num_features
    return None


class Target:
    """One layer that can take a per-channel scale, on its output or its input side.

    ``label``: what the report names (a module path or node name); ``kind``: where the scale went
    (``conv``, ``bn``, ``next-conv``, ...); ``channels`` and ``position`` (the channel dimension
    counted from the right, ``None`` where unknown) on the scaled side; ``tensors``: the parameters
    and buffers ``apply`` replaces (checked to be used nowhere else); ``module``: the module called,
    if any (checked to be called once); ``refuse(v)``: why a 1-D ``v`` cannot fold (or ``None``),
    asked before anything changes; ``apply(v)`` folds it. ``dtype``: the dtype the layer computes
    in (its first floating parameter/buffer's, else the recorded dtype of its output, else ``None``:
    unknown, and a fold is refused); every scale is cast to it before it folds.
    """

    __slots__ = ("label", "kind", "channels", "position", "tensors", "apply", "module", "refuse", "dtype")

    def __init__(self, label: str, kind: str, channels: int, position: int | None, tensors: list[torch.Tensor],
                 apply: Callable[[torch.Tensor], None], module: nn.Module | None = None,
                 refuse: Callable[[torch.Tensor], str | None] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.label, self.kind, self.channels, self.position = label, kind, channels, position
        self.tensors, self.apply, self.module = tensors, apply, module
        self.refuse = refuse or (lambda v: None)
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        self.dtype = floating[0] if floating else dtype


class TensorUsage:
    """How many places use each parameter/buffer, counted once over the graph (linear in its size).

    A call of a module uses every tensor in its subtree; a ``get_attr`` uses its tensor once per
    user. A fold may replace a tensor only where its count is 1: no other call of the same module,
    no tied weight in another module, no functional use of it. Tensors created by folds are not in
    the table and are unshared by construction; the table keeps the counted tensors alive, so their
    ids are not reused.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.count: Counter[int] = Counter()
        self.calls: Counter[int] = Counter()
        self._alive: list[object] = []
        subtree: dict[int, list[torch.Tensor]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(str(node.target))
                self.calls[id(module)] += 1
                if id(module) not in subtree:
                    subtree[id(module)] = list({id(t): t for t in (*module.parameters(), *module.buffers())}.values())
                    self._alive.append(module)
                for t in subtree[id(module)]:
                    self.count[id(t)] += 1
                    self._alive.append(t)
            elif node.op == "get_attr":
                value = fetch_attr(gm, str(node.target))
                if isinstance(value, torch.Tensor):
                    self.count[id(value)] += max(1, len(node.users))
                    self._alive.append(value)

    def refusal(self, target: Target) -> str | None:
        """Why folding into ``target`` would change another call or user, or ``None``."""
        if target.module is not None and self.calls[id(target.module)] > 1:
            return (f"module `{target.label}` is called at {self.calls[id(target.module)]} places; folding would "
                    "change the other calls")
        if any(self.count[id(t)] > 1 for t in target.tensors):
            return f"`{target.label}` shares a parameter with another call or module (tied weights)"
        return None
