"""The module form of ASR: blocks attached to the user's own modules, not a replaced forward.

An instrumented model in this form is the user's object (its class, attributes, methods and
``forward``) with

- the blocks in an ``nn.ModuleDict`` at the root, ``asr.<site node>`` (state_dict keys: the vanilla
  keys plus ``asr.*``);
- at a site that is the output of a module called once: the module's class swapped for its *output form*
  (:mod:`.output_form`), a subclass whose forward is the class's own, then ``output -> block(output)``
  (``index``: the element of a tuple output, ``nn.MultiheadAttention``); torch.fx tracers then record the
  block too (a forward hook on a ``torch.nn`` leaf is invisible to them). Models pickled by earlier
  versions carry an :class:`ASRHook` forward hook instead, which keeps working;
- at an affine plain ``nn.BatchNorm1d/2d/3d`` site (the BN-affine training form, ``bn_affine_form``): the
  norm's class swapped for :class:`ASRBatchNorm1d`/``2d``/``3d``, a subclass (``isinstance`` holds,
  the same parameters and buffers) that computes BN with affine ``weight * v, bias * v``: the same
  function as ``BN(x) * v`` in train and eval, without keeping ``BN(x)`` for the backward.

Hooks and norms hold their block as a plain attribute, not a submodule, so the block is in the
state_dict once (under ``asr.``); ``copy.deepcopy`` (one memo) and pickling keep them pointing at the
copied block. :func:`strip_module_form` undoes all of it (the vanilla model, blocks returned).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from asr_fx.errors import DetachedBlockError

from .asr_blocks import ASR, batch_norm_forward
from .output_form import (  # noqa: F401 - ASRHook: its old home
    _VALUE,
    APPLY,
    BN_BLOCK,
    ASRHook,
    ASROutput,
    FastPathGuard,
    _Held,
    _scaled,
    _stamp,
    _value,
    bypassed,
    swap_in,
    swap_out,
)

CONTAINER = "asr"
_BLOCK = BN_BLOCK


class HoistValues:
    """Root forward pre-hook: every block's ``v`` is computed before the model's first layer, as the graph
    form's hoisting pass does (:mod:`asr_fx.passes.hoist_attention_values`): autograd then runs the
    attention networks' backward last, after the activations are freed, so their gradients do not add
    to the peak memory. The value is kept (not its use: :class:`EndOfForward`) so that gradient
    checkpointing recomputes a site with the same ``v``; a call outside the root's forward
    (``model.forward_features(x)``), or after ``block`` changed, computes ``v`` at the site.

    First it checks that every block is still in place (:class:`_Watch`: its module still at its path,
    still carrying its hook or BN form; a few identity checks per block) and raises
    :class:`~asr_fx.errors.DetachedBlockError` otherwise: a library's own ``fuse()`` that folds a BatchNorm
    into its conv and deletes it (ultralytics) would leave a model that silently computes without ASR."""

    def __init__(self, blocks: nn.ModuleDict) -> None:
        self.blocks = blocks
        self.watched: list[_Watch] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        moved = [w for w in getattr(self, "watched", ()) if not w.in_place()]
        lost = _relocate(module, moved) if moved else []
        if lost:
            raise DetachedBlockError(
                f"the ASR blocks at {lost[:5]}{f' and {len(lost) - 5} more' if len(lost) > 5 else ''} of "
                f"{type(module).__name__} are no longer attached: their modules were "
                "removed or replaced, or their forward replaced, after asr_fx.instrument (a library's own fuse() "
                "folding each BatchNorm into its conv, e.g. ultralytics' model.fuse() in predict/val, or a swapped "
                "layer), so the model would "
                "compute without ASR. Way out: asr_fx.fuse(model) first (ASR folded into the weights, your class "
                "back), then the library's fuse(); or replace modules before instrument", sites=lost)
        for block in self.blocks.values():
            if isinstance(block, ASR):
                stamp = () if torch.compiler.is_compiling() else _stamp(block)
                block.__dict__[_VALUE] = _Held(block.attention_value(), stamp, True)


@dataclass(eq=False)
class _Watch:
    """Where one block is attached: each ``(parent, name, child)`` step of its module path from the root,
    and the hook (``hooks[hook_id] is hook``) or BN form (``hook is None``) on the module at its end."""

    path: str
    steps: tuple[tuple[nn.Module, str, nn.Module], ...]
    module: nn.Module
    hooks: str
    hook_id: int
    hook: object

    def in_place(self) -> bool:
        for parent, name, child in self.steps:
            if parent._modules.get(name) is not child:
                return False
        return self.carries()

    def carries(self) -> bool:
        if self.hook is None:
            return isinstance(self.module, _ASRBatchNorm)
        if isinstance(self.hook, FastPathGuard) and not (isinstance(self.module, ASROutput)
                                                         and APPLY in self.module.__dict__
                                                         and not bypassed(self.module)):
            return False
        return getattr(self.module, self.hooks).get(self.hook_id) is self.hook


def _relocate(root: nn.Module, moved: list[_Watch]) -> list[str]:
    """The paths of the ``moved`` blocks whose module left ``root``'s tree or lost its hook; the others (a
    module wrapped since, e.g. for gradient checkpointing: still in the tree) are watched at their new path."""
    paths: dict[int, str] = {}
    for path, m in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)
    lost = []
    for w in moved:
        path = paths.get(id(w.module))
        if path is None or not w.carries():
            lost.append(w.path)
        else:
            w.path, w.steps = path, _watch(root, path, w.module).steps
    return lost


def _watch(root: nn.Module, path: str, module: nn.Module, hooks: str = "", handle: object = None) -> _Watch:
    """:class:`_Watch` of the module at ``path`` (``handle``: its hook's removable handle, None: BN form)."""
    steps, parent = [], root
    for name in path.split(".") if path else ():
        child = parent._modules[name]
        assert child is not None
        steps.append((parent, name, child))
        parent = child
    hook_id = getattr(handle, "id", -1)
    hook = getattr(module, hooks).get(hook_id) if handle is not None else None
    return _Watch(path, tuple(steps), module, hooks, hook_id, hook)


class EndOfForward:
    """Root forward hook (always called): the values :class:`HoistValues` computed are for recomputation only."""

    def __init__(self, blocks: nn.ModuleDict) -> None:
        self.blocks = blocks

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        for block in self.blocks.values():
            held = block.__dict__.get(_VALUE)
            if held is not None:
                held.live = False


class ASRAffine:
    """Forward pre-hook of a composite layer whose site is its own norm or linear output before the rest of
    its forward (timm's ``BatchNormAct2d``: BN, then drop and act): for the call, ``self.weight`` and
    ``self.bias`` read ``weight * v`` and ``bias * v`` (set in the module's ``__dict__``, which attribute
    lookup reads before the parameters; the parameters themselves and the state_dict are not touched),
    so the layer computes its norm/linear output times ``v``, then the rest of its forward:
    ``x * v`` at the site. :class:`ASRAffineEnd` removes them after the call, also when it raises."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple) -> None:
        v = _value(self.block)
        v = (self.block.attention_value() if v is None else v).reshape(-1)  # type: ignore[operator]
        for name in ("weight", "bias"):
            p = module._parameters[name]
            assert p is not None  # affine_form_fits: the layer has both
            module.__dict__[name] = p * v.reshape((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)


class ASRAffineEnd:
    """Forward hook (always called) that ends :class:`ASRAffine`'s scaled ``weight``/``bias``."""

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        module.__dict__.pop("weight", None)
        module.__dict__.pop("bias", None)


def affine_form_fits(module: nn.Module, traced: nn.Module) -> bool:
    """``module`` (a composite layer) computes the norm/linear layer ``traced`` (the plain layer the trace
    made of it) with its own ``weight`` and ``bias``: :class:`ASRAffine` scales that output."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Linear)
    if not isinstance(traced, norms) or getattr(traced, "weight", None) is None or \
            getattr(traced, "bias", None) is None:
        return False
    own = [module._parameters.get(n) for n in ("weight", "bias")]
    return all(isinstance(o, torch.Tensor) and o.shape == t.shape and torch.equal(o.detach(), t.detach())
               for o, t in zip(own, (traced.weight, traced.bias)))


class _ASRBatchNorm:
    """BatchNorm with affine ``weight * v, bias * v`` (``v`` from the block in ``self._asr_block``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.__dict__[_BLOCK]
        if isinstance(x, torch.fx.Proxy):  # traced by torch.fx: the ordinary form, BN then x * v
            return _scaled(block, F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                               self.training or self.running_mean is None, self.momentum or 0.0,
                                               self.eps))
        v = _value(block)
        v = (block.attention_value() if v is None else v).reshape(-1)
        return batch_norm_forward(self, x, self.weight * v, self.bias * v)  # type: ignore[arg-type,attr-defined]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, asr=v"  # type: ignore[misc]


class ASRBatchNorm1d(_ASRBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` in the BN-affine training form (see the module docstring)."""


class ASRBatchNorm2d(_ASRBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` in the BN-affine training form (see the module docstring)."""


class ASRBatchNorm3d(_ASRBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` in the BN-affine training form (see the module docstring)."""


class ASRSequential(nn.Sequential):
    """An ``nn.Sequential`` root that holds the ``asr`` container beside its layers: its forward, length,
    iteration and indexing skip ``asr`` (a plain ``nn.Sequential`` would call it as a layer)."""

    def _layers(self) -> list[nn.Module]:
        return [m for name, m in self._modules.items() if name != CONTAINER and m is not None]

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Sequential's own name
        for module in self._layers():
            input = module(input)
        return input

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._layers())

    def __len__(self) -> int:
        return len(self._layers())

    def __getitem__(self, idx: int | slice) -> nn.Module:  # type: ignore[override]
        if isinstance(idx, slice):
            return nn.Sequential(*self._layers()[idx])
        return self._layers()[idx]


_FORM_OF = {nn.BatchNorm1d: ASRBatchNorm1d, nn.BatchNorm2d: ASRBatchNorm2d, nn.BatchNorm3d: ASRBatchNorm3d}
_BASE_OF = {v: k for k, v in _FORM_OF.items()}


@dataclass(frozen=True)
class Attachment:
    """Where one block is attached: the module ``path``, ``kind`` (``"output"``: the output form, ``"bn"``,
    ``"affine"``, or ``"hook"``: a forward hook, as earlier versions attached), the tuple
    ``index`` a hook scales (None: the whole output), and the block's ``key`` in ``asr``."""

    path: str
    kind: str
    key: str
    index: int | None = None


def bn_form_fits(module: nn.Module) -> bool:
    """``module`` is a plain affine BatchNorm1d/2d/3d without hooks: its class may be swapped for the form."""
    return bool(type(module) in _FORM_OF and module.affine and module.weight is not None
                and not module._forward_hooks and not module._forward_pre_hooks)


def attach(root: nn.Module, attachment: Attachment, block: nn.Module) -> None:
    """Register ``block`` as ``root.asr[key]`` and attach it at ``attachment.path`` (a hook or the BN form)."""
    if CONTAINER not in root._modules:
        if type(root) is nn.Sequential:
            root.__class__ = ASRSequential
        root.add_module(CONTAINER, nn.ModuleDict())
        root.register_forward_pre_hook(HoistValues(root._modules[CONTAINER]))  # type: ignore[arg-type]
        root.register_forward_hook(EndOfForward(root._modules[CONTAINER]), always_call=True)  # type: ignore[arg-type]
    getattr(root, CONTAINER)[attachment.key] = block
    module = root.get_submodule(attachment.path)
    if attachment.kind == "bn":
        module.__class__ = _FORM_OF[type(module)]  # type: ignore[index]
        module.__dict__[_BLOCK] = block
        watch = _watch(root, attachment.path, module)
    elif attachment.kind == "affine":
        handle = module.register_forward_pre_hook(ASRAffine(block))
        module.register_forward_hook(ASRAffineEnd(), always_call=True)
        watch = _watch(root, attachment.path, module, "_forward_pre_hooks", handle)
    elif attachment.kind == "output":
        handle = swap_in(module, ASRHook(block, attachment.index))
        watch = _watch(root, attachment.path, module, "_forward_pre_hooks", handle)
    else:
        handle = module.register_forward_hook(ASRHook(block, attachment.index))
        watch = _watch(root, attachment.path, module, "_forward_hooks", handle)
    hoist = next(h for h in root._forward_pre_hooks.values() if isinstance(h, HoistValues))
    if not hasattr(hoist, "watched"):  # a model pickled before the check
        hoist.watched = []
    hoist.watched.append(watch)


def attachments(root: nn.Module) -> list[Attachment]:
    """Every block attached in ``root`` (hooks and BN forms), in module order."""
    blocks = getattr(root, CONTAINER, None)
    keys = {id(b): k for k, b in blocks.items()} if isinstance(blocks, nn.ModuleDict) else {}
    found = []
    for path, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, _ASRBatchNorm):
            found.append(Attachment(path, "bn", keys.get(id(module.__dict__[_BLOCK]), "?")))
        apply = module.__dict__.get(APPLY)
        if isinstance(module, ASROutput) and isinstance(apply, ASRHook):
            found.append(Attachment(path, "output", keys.get(id(apply.block), "?"), apply.index))
        for hook in module._forward_hooks.values():
            if isinstance(hook, ASRHook):
                found.append(Attachment(path, "hook", keys.get(id(hook.block), "?"), hook.index))
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ASRAffine):
                found.append(Attachment(path, "affine", keys.get(id(hook.block), "?")))
    return found


def has_module_form(root: nn.Module) -> bool:
    """``root`` holds ASR in the module form (an ``asr`` container, hooks or BN forms)."""
    return bool(attachments(root))


def strip_module_form(root: nn.Module) -> dict[str, tuple[Attachment, nn.Module]]:
    """Remove every hook, BN form and the ``asr`` container from ``root`` (in place): the vanilla model.

    Returns ``{key: (attachment, block)}``. Parameters are not touched."""
    found: dict[str, tuple[Attachment, nn.Module]] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if isinstance(module, _ASRBatchNorm):
            block = module.__dict__.pop(_BLOCK)
            module.__class__ = _BASE_OF[type(module)]  # type: ignore[index,assignment]
            found[str(id(block))] = (Attachment(path, "bn", ""), block)
        if isinstance(module, ASROutput):
            apply = swap_out(module)  # type: ignore[arg-type]
            if isinstance(apply, ASRHook):
                found[str(id(apply.block))] = (Attachment(path, "output", "", apply.index), apply.block)
        for handle_id, hook in list(module._forward_hooks.items()):
            if isinstance(hook, ASRHook):
                del module._forward_hooks[handle_id]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(handle_id, None)
                found[str(id(hook.block))] = (Attachment(path, "hook", "", hook.index), hook.block)
            elif isinstance(hook, ASRAffineEnd):
                del module._forward_hooks[handle_id]
                getattr(module, "_forward_hooks_always_called", {}).pop(handle_id, None)
        for handle_id, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, ASRAffine):
                del module._forward_pre_hooks[handle_id]
                found[str(id(hook.block))] = (Attachment(path, "affine", ""), hook.block)
    for hooks in (root._forward_pre_hooks, root._forward_hooks):
        for handle_id, hook in list(hooks.items()):
            if isinstance(hook, (HoistValues, EndOfForward)):
                del hooks[handle_id]
                getattr(root, "_forward_hooks_always_called", {}).pop(handle_id, None)
    blocks = root._modules.get(CONTAINER)
    keys = {id(b): k for k, b in blocks.items()} if isinstance(blocks, nn.ModuleDict) else {}
    if isinstance(blocks, nn.ModuleDict):
        del root._modules[CONTAINER]
    if type(root) is ASRSequential:
        root.__class__ = nn.Sequential  # type: ignore[assignment]
    out = {}
    for attachment, block in found.values():
        key = keys.get(id(block), attachment.path.replace(".", "_"))
        out[key] = (Attachment(attachment.path, attachment.kind, key, attachment.index), block)
    return out
