"""What every layer rule answers, and the values it answers with.

A layer rule (:class:`LayerRule`, one per layer family, one file each in this folder) says of a graph node:

- :meth:`~LayerRule.recognise`: a :class:`LayerMatch` (channels, channel axis, the module a site
  names, the layer a scale folds into), or a :class:`~asr_fx.passes.graph.refusals.NoMatch` saying
  why the node is not this layer;
- :meth:`~LayerRule.output_target`: the :class:`Target` that folds ``layer(x) * v`` (the paper's
  Appendix A), or a :class:`~asr_fx.passes.graph.refusals.Refusal` saying why this layer cannot
  take it (a ``NoMatch`` when the node is not this layer);
- :meth:`~LayerRule.input_target`: the same for ``layer(x * s)``, a scale pushed forward into it.

:class:`TensorUsage` is the one check every fold makes before it replaces a tensor: a fold may only
replace a tensor nothing else uses. Nothing here changes a graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..graph.graph_queries import ChannelInfo, fetch_attr, is_plain_layer, module_of
from ..graph.refusals import NoMatch, Refusal


@dataclass(frozen=True)
class LayerMatch:
    """A node recognised as a layer: ``channels`` along ``position`` (the channel dimension counted
    from the right, ``None`` where it depends on an input rank that is unknown); ``module``: the
    module path a site there names (empty for a functional call); ``fold_target``: what takes the
    scale; ``refusal``: why a scale after it cannot fold (known before training), else ``None``."""

    rule: LayerRule
    channels: int
    position: int | None
    module: str
    fold_target: str
    refusal: Refusal | None = None


class Target:
    """One layer that can take a per-channel scale, on its output or its input side.

    ``label``: what the report names (a module path or node name); ``kind``: where the scale went
    (``conv``, ``bn``, ``next-conv``, ...); ``channels`` and ``position`` (the channel dimension
    counted from the right, ``None`` where unknown) on the scaled side; ``tensors``: the parameters
    and buffers ``apply`` replaces (checked to be used nowhere else); ``module``: the module called,
    if any (checked to be called once); ``refuse(v)``: a :class:`Refusal` saying why a 1-D ``v``
    cannot fold (or ``None``), asked before anything changes; ``apply(v)`` folds it. ``dtype``: the
    dtype the layer computes in (its first floating parameter/buffer's, else the recorded dtype of its
    output, else ``None``: unknown, and a fold is refused); every scale is cast to it before it folds.
    """

    __slots__ = ("label", "kind", "channels", "position", "tensors", "apply", "module", "refuse", "dtype")

    def __init__(self, label: str, kind: str, channels: int, position: int | None, tensors: list[torch.Tensor],
                 apply: Callable[[torch.Tensor], None], module: nn.Module | None = None,
                 refuse: Callable[[torch.Tensor], Refusal | None] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.label, self.kind, self.channels, self.position = label, kind, channels, position
        self.tensors, self.apply, self.module = tensors, apply, module
        self.refuse = refuse or (lambda v: None)
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        self.dtype = floating[0] if floating else dtype


#: what :meth:`LayerRule.output_target` and :meth:`LayerRule.input_target` answer
TargetOrRefusal = Target | Refusal | NoMatch


class LayerRule:
    """One layer family. Subclasses set :attr:`name` and override what the family can do; by default
    a rule takes no scale on either side. ``is_site``: whether placement offers a site after the layer
    (functional calls fold, but placement's rules look for layer modules and never put a block after one)."""

    name: str = ""
    is_site: bool = True

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        raise NotImplementedError

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        return NoMatch(f"{self.name} takes no scale on its output")

    def input_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        return NoMatch(f"{self.name} takes no scale on its input")

    def __repr__(self) -> str:
        return f"<layer rule {self.name}>"


class FunctionalLayerRule(LayerRule):
    """A rule for a functional call that folds but is no placement site: it recognises a node exactly where
    :meth:`output_target` finds a :class:`Target` there (its refusal, else, as the no-match reason)."""

    is_site = False

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        found = self.output_target(gm, node)
        if not isinstance(found, Target):
            return found if isinstance(found, NoMatch) else NoMatch(found.reason)
        return LayerMatch(self, found.channels, found.position, "", node.name)


#: why a site's scale cannot fold when the layer's channel axis depends on an unknown input rank
UNKNOWN_AXIS = Refusal("channel dimension unknown: pass example_inputs")


def layout_match(rule: LayerRule, node: fx.Node, info: ChannelInfo, module: str, fold_target: str) -> LayerMatch:
    """The match of a layer with channel layout ``info`` (refused where its channel axis is unknown)."""
    return LayerMatch(rule, info.channels, info.position, module, fold_target,
                      UNKNOWN_AXIS if info.position is None else None)


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters and buffers (not its children's)."""
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("asr_fx_fold_in_place", default=False)
_BEFORE_WRITE: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar(
    "asr_fx_before_write", default=None)


@contextlib.contextmanager
def folding_in_place(before_write: Callable[[torch.Tensor], None] | None = None) -> Iterator[None]:
    """Inside the block, :func:`replace_tensor` writes into the existing tensor when shape, dtype and device
    allow. Only for a model whose tensors no one else holds (a private copy, or ``inplace=True``): the
    folded tensors themselves are then changed, not replaced. ``before_write(tensor)`` is called before each
    such write (to keep the old values: ``fuse(..., inplace=True)`` restores them if it refuses)."""
    token, hook = _IN_PLACE.set(True), _BEFORE_WRITE.set(before_write)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)
        _BEFORE_WRITE.reset(hook)


def replace_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set ``owner.<name>`` to a fresh copy of ``value``, as a Parameter if it was one (inside
    :func:`folding_in_place`: ``value`` written into the tensor already there, when it fits).

    Parameters are replaced by new ``nn.Parameter`` objects (never written into in place, so a tensor
    that something else shares is never changed); callers check beforehand that no other call or module
    uses them (:class:`TensorUsage`). Inside :func:`folding_in_place` (what :func:`asr_fx.fuse` uses on
    its private copy, whose tensors nothing outside shares) the new values are written into the existing
    tensors instead: no second copy of a folded layer is held while folding."""
    old = getattr(owner, name)
    if _IN_PLACE.get() and isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype \
            and old.device == value.device and not old._is_view() and old.data_ptr() != value.data_ptr():
        before_write = _BEFORE_WRITE.get()
        if before_write is not None:
            before_write(old)
        with torch.no_grad():
            old.copy_(value.detach())
        return
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
    else:
        setattr(owner, name, value.detach().clone())


def call_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (or keyword ``name``) of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_call_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set argument ``index`` (or keyword ``name``) of a call."""
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


#: a tensor a call reads from an attribute of the model: ``(owner module, attribute name, tensor)``
Attribute = tuple[nn.Module, str, torch.Tensor]


def attribute_tensor(gm: fx.GraphModule, arg: Any) -> Attribute | None:
    """``(owner, name, tensor)`` of a ``get_attr`` argument that is a tensor, else ``None``."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    path = str(arg.target)
    owner_path, _, name = path.rpartition(".")
    value = fetch_attr(gm, path)
    if not isinstance(value, torch.Tensor):
        return None
    return (gm.get_submodule(owner_path) if owner_path else gm), name, value


def weight_and_bias(gm: fx.GraphModule, node: fx.Node,
                    weight_index: int) -> tuple[Attribute | None, Attribute | None] | Refusal:
    """The weight (argument ``weight_index`` or ``weight=``) and bias (the next one or ``bias=``) of a
    functional layer call, each ``None`` where the call passes none; a :class:`Refusal` where one it
    passes is computed in the graph rather than read from a parameter or buffer."""
    weight_arg, bias_arg = call_arg(node, weight_index, "weight"), call_arg(node, weight_index + 1, "bias")
    weight, bias = attribute_tensor(gm, weight_arg), attribute_tensor(gm, bias_arg)
    if (weight_arg is not None and weight is None) or (bias_arg is not None and bias is None):
        return Refusal(f"`{node.name}`'s weight or bias is computed in the graph, not a parameter")
    return weight, bias


def scale_attribute(found: Attribute | None, v: torch.Tensor) -> None:
    """Replace the attribute tensor ``found`` by itself times ``v`` (nothing where ``found`` is ``None``)."""
    if found is not None:
        replace_tensor(found[0], found[1], found[2] * v)


def attribute_values(*found: Attribute | None) -> list[torch.Tensor]:
    """The tensors of the given attributes, skipping ``None``: what a :class:`Target` of them replaces."""
    return [f[2] for f in found if f is not None]


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

    def refusal(self, target: Target) -> Refusal | None:
        """Why folding into ``target`` would change another call or user, or ``None``."""
        if target.module is not None and self.calls[id(target.module)] > 1:
            return Refusal(f"module `{target.label}` is called at {self.calls[id(target.module)]} places; folding "
                           "would change the other calls")
        if any(self.count[id(t)] > 1 for t in target.tensors):
            return Refusal(f"`{target.label}` shares a parameter with another call or module (tied weights)")
        return None


class ModuleLayerRule(LayerRule):
    """A rule for calls of one kind of layer module (exactly its torch forward: :func:`is_plain_layer`).
    Subclasses give :meth:`accepts` (the classes), :meth:`layout` (channels and axis of the output),
    :attr:`kind` and :meth:`scale_output`; those that take an input scale also :meth:`input_channels`,
    :meth:`scale_input` and, where a scale can be refused, :meth:`input_refusal`."""

    kind: str = ""
    takes_input_scale: bool = False

    def accepts(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def layout(self, module: nn.Module, node: fx.Node) -> ChannelInfo:
        raise NotImplementedError

    def scale_output(self, module: nn.Module, v: torch.Tensor) -> None:
        raise NotImplementedError

    def input_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def scale_input(self, module: nn.Module, s: torch.Tensor) -> None:
        raise NotImplementedError

    def input_refusal(self, module: nn.Module, s: torch.Tensor) -> Refusal | None:
        return None

    def plain_module(self, gm: fx.GraphModule, node: fx.Node) -> nn.Module | NoMatch:
        module = module_of(gm, node)
        if module is None or not self.accepts(module):
            return NoMatch(f"not a call of a {self.name} module")
        if not is_plain_layer(module):  # a composite layer (norm + activation, ...): a scale does not commute into it
            return NoMatch(f"`{node.target}` ({type(module).__name__}) overrides its {self.name}'s forward")
        return module

    def recognise(self, gm: fx.GraphModule, node: fx.Node) -> LayerMatch | NoMatch:
        module = self.plain_module(gm, node)
        if isinstance(module, NoMatch):
            return module
        path = str(node.target)
        return layout_match(self, node, self.layout(module, node), path, path)

    def output_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        module = self.plain_module(gm, node)
        if isinstance(module, NoMatch):
            return module
        info = self.layout(module, node)
        return Target(str(node.target), self.kind, info.channels, info.position, own_tensors(module),
                      lambda v: self.scale_output(module, v), module)

    def input_target(self, gm: fx.GraphModule, node: fx.Node) -> TargetOrRefusal:
        module = self.plain_module(gm, node)
        if isinstance(module, NoMatch):
            return module
        if not self.takes_input_scale:
            return Refusal(f"a {self.name} takes no scale on its input")
        return Target(str(node.target), f"next-{self.kind}", self.input_channels(module),
                      self.layout(module, node).position, own_tensors(module), lambda s: self.scale_input(module, s),
                      module, refuse=lambda s: self.input_refusal(module, s))
