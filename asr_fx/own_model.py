"""The user's own model with ASR in it: placing the blocks of a traced graph on the model's modules,
and fusing such a model back into the user's class.

Why this design: the graph is how asr-fx *reads* a model (placement needs data flow), but the model
people train is their object, whose ``forward`` takes keyword arguments (``labels=``, ``targets``,
``return_dict=``), whose methods and attributes their trainer calls. So ``instrument`` traces a copy
to choose the sites, then attaches each block to the module whose output the site is, in the model
itself (:mod:`asr_fx.passes.forms.module_form`: the output form, a subclass of the module's class whose
forward is its own then the block, or the BN-affine training form as a BatchNorm subclass): nothing of
the forward is replaced, no argument is specialised.

A site has a place in the model when it is the output (or, for ``nn.MultiheadAttention``, the first
output) of a module that the forward calls exactly once, and the module the trace saw at that path
is the model's own (not a composite layer the trace went through, such as a norm with its
activation inside). Sites without such a place (functional code) make :func:`plan` return the reason,
and the caller falls back.

``fuse`` on this form (:func:`fuse_module_form`): the blocks are put back into a traced copy as
graph nodes (:func:`graph_form`), the ordinary fuse pipeline folds them, and the folded weights are
written into a stripped copy of the model (:func:`asr_fx.into_vanilla.fuse_into`, checked on a probe
input): the user's class, no hooks, no ``asr``. Where a fold has no place in that class, the fused
GraphModule is returned with a warning saying why.
"""

from __future__ import annotations

import copy
import operator
import types
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from asr_fx.config import asr_config, set_config
from asr_fx.errors import ASRError
from asr_fx.passes import Site, trace
from asr_fx.passes.capture.plain_layers import WHOLE_MODULE_TWINS
from asr_fx.passes.forms.insert import insert_asr
from asr_fx.passes.forms.module_form import (
    CONTAINER,
    Attachment,
    affine_form_fits,
    attach,
    attachments,
    bn_form_fits,
    strip_module_form,
)

#: ``model.__dict__`` entry with the ``leaf_modules`` instrument traced with (fuse traces with them again)
LEAVES = "_asr_fx_leaf_modules"


def keep_leaf_modules(model: nn.Module, leaf_modules: Any) -> None:
    """Record ``leaf_modules`` on ``model`` for :func:`asr_fx.fuse`'s trace, when it is a list of names and
    classes (picklable with the model; a predicate is not kept: pass it to ``fuse`` again)."""
    if isinstance(leaf_modules, (list, tuple, set)) and leaf_modules and \
            all(isinstance(x, (str, type)) for x in leaf_modules):
        model.__dict__[LEAVES] = list(leaf_modules)


def _mha_output(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ``nn.MultiheadAttention`` call when ``node`` is its ``[0]``."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1:] != (0,):
        return None
    call = node.args[0]
    if isinstance(call, fx.Node) and call.op == "call_module" and \
            isinstance(gm.get_submodule(str(call.target)), nn.MultiheadAttention):
        return call
    return None


def _what(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} `{target}`"


def site_attachment(gm: fx.GraphModule, site: Site, model: nn.Module, calls: Counter,
                    bn_affine_form: bool) -> Attachment | str:
    """Where ``site``'s block goes in ``model`` (an :class:`Attachment`), or why it has no place there."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes[site.node]
    index = None
    mha = _mha_output(gm, node)
    if mha is not None:
        node, index = mha, 0
    if node.op != "call_module":
        return f"site `{site.node}` is the value of functional code ({_what(node)}), not the output of a module"
    path = str(node.target)
    if calls[path] != 1:
        return (f"site `{site.node}`: the forward calls `{path}` {calls[path]} times, a block on its output would "
                "scale every call")
    try:
        own = model.get_submodule(path)
    except AttributeError:
        return f"site `{site.node}`: the model has no module `{path}` (the trace made it)"
    traced = gm.get_submodule(path)
    if type(own) is not type(traced) and path not in gm.meta.get(WHOLE_MODULE_TWINS, ()):
        if index is None and affine_form_fits(own, traced):  # a composite layer: its norm/linear output scaled
            return Attachment(path, "affine", site.node)
        return (f"site `{site.node}`: the trace reads `{path}` ({type(own).__name__}) as a {type(traced).__name__} "
                "(a composite layer traced through), so the module's own output is another value")
    if bn_affine_form and index is None and bn_form_fits(own):
        return Attachment(path, "bn", site.node)
    # an instance ``forward`` (set in __init__, or by a library's dispatch) would skip the output form's: a hook
    kind = "hook" if "forward" in own.__dict__ else "output"
    return Attachment(path, kind, site.node, index)


def plan(gm: fx.GraphModule, sites: Sequence[Site], model: nn.Module, bn_affine_form: bool) -> list[Attachment] | str:
    """One :class:`Attachment` per site, or the reasons (joined) why some site has no place in ``model``."""
    if CONTAINER in model.__dict__ or (hasattr(model, CONTAINER) and CONTAINER not in model._modules):
        return f"the model already has an attribute `{CONTAINER}`"
    if CONTAINER in model._modules:
        return f"the model already has a submodule `{CONTAINER}`"
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    found = [site_attachment(gm, s, model, calls, bn_affine_form) for s in sites]
    problems = [f for f in found if isinstance(f, str)]
    if problems:
        return "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    paths = Counter(a.path for a in found if isinstance(a, Attachment))
    shared = [p for p, n in paths.items() if n > 1]
    if shared:
        return f"several sites are outputs of one module ({shared[:3]})"
    return [a for a in found if isinstance(a, Attachment)]


def _site_dtype(gm: fx.GraphModule, node_name: str) -> torch.dtype | None:
    """The dtype of the value a block scales: recorded by shape propagation, else that of the parameters of
    the layer that produced it."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    recorded = getattr(node.meta.get("tensor_meta"), "dtype", None)
    if recorded is not None:
        return recorded
    if node.op == "call_module":
        for t in (*gm.get_submodule(str(node.target)).parameters(), *gm.get_submodule(str(node.target)).buffers()):
            if t.is_floating_point():
                return t.dtype
    return None


def place_like(gm: fx.GraphModule, model: nn.Module) -> None:
    """The graph form: the new ASR state on the model's device, each block in the dtype of the value it
    scales at its own site (not the dtype of some other parameter of the model)."""
    ref: torch.Tensor | None = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    if ref is None:
        return
    if ref.device.type != "cpu":
        gm.to(ref.device)
    if not isinstance(getattr(gm, CONTAINER, None), nn.Module):
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(f"{CONTAINER}.") and node.args \
                and isinstance(node.args[0], fx.Node):
            dtype = _site_dtype(gm, node.args[0].name) or (ref.dtype if ref.is_floating_point() else None)
            if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
                gm.get_submodule(str(node.target)).to(dtype)


def attach_blocks(model: nn.Module, gm: fx.GraphModule, found: Sequence[Attachment]) -> None:
    """Move each block of ``gm.asr`` into ``model`` at its attachment, on the model's device and in the
    dtype of the value it scales."""
    ref: torch.Tensor | None = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), None)
    blocks = getattr(gm, CONTAINER)
    for a in found:
        block = blocks[a.key]
        if ref is not None:
            dtype = _site_dtype(gm, a.key) or (ref.dtype if ref.is_floating_point() else None)
            block.to(ref.device)
            if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
                block.to(dtype)
        attach(model, a, block)


def remove(model: nn.Module) -> dict[str, tuple[Attachment, nn.Module]]:
    """Undo the module form on ``model`` in place (hooks, BN forms, ``asr``, the config): the vanilla model."""
    blocks = strip_module_form(model)
    set_config(model, None)
    model.__dict__.pop(LEAVES, None)
    return blocks


def unattached_blocks(model: nn.Module) -> list[str]:
    """Keys of ``model.asr`` whose block is attached nowhere (a norm replaced after ``instrument``, say)."""
    blocks = model._modules.get(CONTAINER)
    if not isinstance(blocks, nn.ModuleDict):
        return []
    attached = {a.key for a in attachments(model)}
    return [k for k in blocks if k not in attached]


def tree_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """``module`` with every submodule copied but its tensors shared (no tensor memory): tracing and the fold
    passes may replace modules, hooks and tensors in the copy, leaving ``module`` as it was; folds then make new
    tensors, unless ``module`` is private to the caller (``fuse``'s own copy: ``folding_in_place``)."""
    memo = {} if memo is None else memo
    if id(module) not in memo:
        twin = type(module).__new__(type(module))  # not copy.copy: a parametrized module refuses pickling
        twin.__dict__.update(module.__dict__)
        twin.__dict__.update({k: v.copy() for k, v in module.__dict__.items() if "hooks" in k and isinstance(v, dict)})
        for name, value in module.__dict__.items():  # `self.forward = self.forward_x`: bound to the twin
            if isinstance(value, types.MethodType) and value.__self__ is module:
                twin.__dict__[name] = types.MethodType(value.__func__, twin)
        memo[id(module)] = twin
        twin._parameters = dict(module._parameters)
        twin._buffers = dict(module._buffers)
        twin._modules = {k: (tree_copy(m, memo) if m is not None else None) for k, m in module._modules.items()}
    return memo[id(module)]


def graph_form(vanilla: nn.Module, blocks: dict[str, tuple[Attachment, nn.Module]], leaf_modules: Any,
               example_inputs: tuple[Any, ...] | None) -> fx.GraphModule:
    """``vanilla`` traced in eval mode with each block inserted after its module's call (the graph form
    :func:`asr_fx.fuse`'s pipeline folds). Raises :class:`ASRError` when a module is not one call."""
    gm = trace(tree_copy(vanilla).eval(), leaf_modules, bind_training=False, example_inputs=example_inputs)
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    sites, made = [], {}
    for key, (a, block) in blocks.items():
        found = calls.get(a.path, [])
        if len(found) != 1:
            raise ASRError(f"fuse: the ASR block `asr.{key}` hooks `{a.path}`, which the traced forward calls "
                           f"{len(found)} times; fuse needs it called once (as instrument saw it)")
        node = found[0]
        if a.index is not None:
            node = next((u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                         and u.args[1:] == (a.index,)), None)
            if node is None:
                raise ASRError(f"fuse: the traced forward never reads output [{a.index}] of `{a.path}`, which the "
                               f"block `asr.{key}` scales")
        sites.append(Site(node.name, a.path, "module", 0, -1, a.path))
        made[node.name] = copy.deepcopy(block)
    return insert_asr(gm, sites, lambda s: made[s.node])


def fused_into_class(fused: fx.GraphModule, model: nn.Module, into_vanilla: Any,
                     example_inputs: tuple[Any, ...] | None, leaf_modules: Any) -> nn.Module:
    """The fused weights written into a stripped copy of ``model`` (its own class; see the module docstring).
    Raises :class:`asr_fx.errors.VanillaModelError` (nothing returned) where a fold has no place in it."""
    vanilla = copy.deepcopy(model)
    remove(vanilla)
    return into_vanilla(fused, vanilla, model, example_inputs=example_inputs, leaf_modules=leaf_modules)


def is_module_form(model: nn.Module) -> bool:
    """``model`` is an instrumented model in the module form (its config says so, or blocks are attached)."""
    config = asr_config(model)
    return (config is not None and config.form == "module") or bool(attachments(model))
