"""Capture step: functional norm/linear calls on a composite layer's own parameters become calls of a
plain layer at the same path.

Libraries build layers that subclass a torch layer but compute it themselves: timm's
``BatchNormAct2d`` (``F.batch_norm`` then an activation inside the same module), ``LayerNorm2d``
(permute, ``F.layer_norm``, permute), ``GroupNormAct``. RMS norms are the same story without a torch base
class: a composite module calling ``F.rms_norm`` or timm's ``rms_norm`` / ``fast_rms_norm`` on its own
``weight`` (then an activation, say) has that call become a :class:`CallingRMSNorm` (an ``nn.RMSNorm`` that
makes the module's own call). An RMS norm module that is nothing more (timm's ``RmsNorm``) is kept whole
before this step (:mod:`.rms_norm_modules`). Traced through, they leave a functional call
on the module's parameters, which no placement rule sees as a layer, with the training flag frozen to
the mode of the trace. This pass replaces each such call ``F.batch_norm(x, m.running_mean,
m.running_var, m.weight, m.bias, ...)`` by a call of a plain ``nn.BatchNorm2d`` (``nn.LayerNorm``,
``nn.GroupNorm``, ``nn.Linear``) installed at the module's path, holding the same tensors (so
state_dict keys do not change) and the module's children (the activation, now its own call). The
activation stays a separate node after the norm, so a site lands between them (the paper's norm-act
site) and a fold never crosses it; the plain BatchNorm reads its own ``training`` flag at run time.

Equivalence: exact, in train and eval mode: the plain layer's forward makes the same call with the same
arguments (checked: eps, momentum, the running-stat buffers, groups / normalized shape). Calls whose
arguments do not match the module's own state are left as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_MODULE_STATE = set(nn.Module().__dict__)
#: ``gm.meta`` key: the paths whose twin's call is the module's whole forward (its output is the module's)
WHOLE_MODULE_TWINS = "asr_fx.whole_module_twins"


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attr_path(arg: Any) -> str | None:
    return str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def _owner(node: fx.Node, gm: fx.GraphModule, attrs: dict[str, Any]) -> str | None:
    """The module path that owns every parameter argument named in ``attrs`` (``None`` -> must be absent)."""
    owner = None
    for name, arg in attrs.items():
        path = _attr_path(arg)
        if arg is None:
            continue
        if path is None or "." not in path:
            return None
        prefix, leaf = path.rsplit(".", 1)
        if leaf != name or (owner is not None and prefix != owner):
            return None
        owner = prefix
    return owner


def _batch_norm_base(module: nn.Module) -> type | None:
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(module, base):
            return base
    return None


def _match_batch_norm(node: fx.Node, module: nn.Module) -> type | None:
    base = _batch_norm_base(module)
    if base is None or not isinstance(module, _BatchNorm):
        return None
    if _arg(node, 7, "eps", 1e-5) != module.eps or module.momentum is None:
        return None
    momentum = _arg(node, 6, "momentum", 0.1)
    if isinstance(momentum, fx.Node) or (momentum != module.momentum and momentum != 0.0):
        return None
    if (module.weight is None) != (_arg(node, 3, "weight") is None):
        return None
    stats = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    if module.track_running_stats and any(_attr_path(s) is None for s in stats):
        return None
    return base


def _match_layer_norm(node: fx.Node, module: nn.Module) -> type | None:
    if not isinstance(module, nn.LayerNorm):
        return None
    shape = tuple(_arg(node, 1, "normalized_shape", ()))
    if shape != tuple(module.normalized_shape) or _arg(node, 4, "eps", 1e-5) != module.eps:
        return None
    return nn.LayerNorm


def _match_group_norm(node: fx.Node, module: nn.Module) -> type | None:
    if not isinstance(module, nn.GroupNorm):
        return None
    if _arg(node, 1, "num_groups") != module.num_groups or _arg(node, 4, "eps", 1e-5) != module.eps:
        return None
    return nn.GroupNorm


def _match_linear(node: fx.Node, module: nn.Module) -> type | None:
    return nn.Linear if isinstance(module, nn.Linear) else None


class CallingRMSNorm(nn.RMSNorm):
    """An ``nn.RMSNorm`` (so the layer rules see an RMS norm) whose forward makes the call the library's
    module made: ``function(x, normalized_shape, weight, eps)``, the same function with the same arguments."""

    function: Callable[..., torch.Tensor]
    computes_its_base = True  # the layer rules treat it as a plain nn.RMSNorm (graph_queries.is_plain_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, self.normalized_shape, self.weight, self.eps)


def _shape(value: Any) -> tuple[Any, ...] | None:
    if isinstance(value, int):
        return (value,)
    return tuple(value) if isinstance(value, (tuple, list, torch.Size)) else None


def _match_rms_norm(node: fx.Node, module: nn.Module) -> type | None:
    """Any module with the call's ``normalized_shape`` and ``eps`` (given explicitly) and a weight: the
    function's own defaults differ between libraries, so an omitted ``eps`` is not matched."""
    shape, eps = _shape(_arg(node, 1, "normalized_shape")), _arg(node, 3, "eps", _MISSING)
    if shape is None or shape != _shape(getattr(module, "normalized_shape", None)) or eps is _MISSING \
            or eps != getattr(module, "eps", _MISSING) or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    return CallingRMSNorm


_MISSING = object()


def _rms_norm_functions() -> tuple[Callable[..., Any], ...]:
    """``F.rms_norm``, and timm's ``rms_norm``/``fast_rms_norm`` (same signature) when timm is imported."""
    timm_norms = sys.modules.get("timm.layers.fast_norm")
    found = [getattr(timm_norms, name, None) for name in ("rms_norm", "fast_rms_norm")] if timm_norms else []
    return (F.rms_norm, *(f for f in found if callable(f)))


#: function -> (its parameter arguments: name -> (index, keyword), matcher giving the plain class)
_FUNCTIONS: dict[Callable[..., Any], tuple[dict[str, tuple[int, str]], Callable[[fx.Node, nn.Module], type | None]]] = {
    F.batch_norm: ({"running_mean": (1, "running_mean"), "running_var": (2, "running_var"), "weight": (3, "weight"),
                    "bias": (4, "bias")}, _match_batch_norm),
    F.layer_norm: ({"weight": (2, "weight"), "bias": (3, "bias")}, _match_layer_norm),
    F.group_norm: ({"weight": (2, "weight"), "bias": (3, "bias")}, _match_group_norm),
    F.linear: ({"weight": (1, "weight"), "bias": (2, "bias")}, _match_linear),
}
_RMS_NORM = ({"weight": (2, "weight")}, _match_rms_norm)


def _function_table() -> dict[Callable[..., Any], tuple[dict[str, tuple[int, str]], Callable[..., type | None]]]:
    return {**_FUNCTIONS, **dict.fromkeys(_rms_norm_functions(), _RMS_NORM)}


def plain_twin(base: Any, module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A ``base`` instance with ``module``'s configuration, tensors and the given children."""
    twin = base.__new__(base)
    nn.Module.__init__(twin)
    for key, value in module.__dict__.items():
        if key not in _MODULE_STATE:
            setattr(twin, key, value)
    twin.training = module.training
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, child in children.items():
        twin._modules[name] = child
    return twin


def _is_composite(module: nn.Module, base: Any) -> bool:
    return type(module).forward is not base.forward


def plain_layers(gm: fx.GraphModule, original: nn.Module) -> list[str]:
    """Replace functional calls on a composite layer's own parameters by calls of a plain layer.

    ``original`` is the module that was traced (the owner of the real submodules). Modifies ``gm`` in
    place; returns the module paths that became plain layers.
    """
    graph = gm.graph
    done: dict[str, nn.Module] = {}
    functions = _function_table()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in functions:
            continue
        params, match = functions[node.target]
        attrs = {name: _arg(node, i, kw) for name, (i, kw) in params.items()}
        path = _owner(node, gm, attrs)
        if not path or path in done:
            continue
        try:
            module = original.get_submodule(path)
        except AttributeError:
            continue
        base = match(node, module)
        if base is None or not _is_composite(module, base) or isinstance(gm.get_submodule(path), type(module)):
            continue
        placeholder = gm.get_submodule(path)
        twin = plain_twin(base, module, dict(placeholder.named_children()))
        if isinstance(twin, CallingRMSNorm):
            twin.function, twin.normalized_shape = node.target, _shape(module.normalized_shape)  # type: ignore[assignment]
            twin.elementwise_affine = True
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, twin)
        done[path] = twin
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    if done:
        gm.meta[WHOLE_MODULE_TWINS] = sorted(p for p in done if _is_whole_module(graph, p))
        _drop_counter_updates(graph, done)
        for node in reversed(list(graph.nodes)):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        gm.recompile()
    return list(done)


def _is_whole_module(graph: fx.Graph, path: str) -> bool:
    """Whether the twin's call is all that the module at ``path`` computed (so the module's own output is
    the twin's): no other traced node ran inside it, by the tracer's ``nn_module_stack``."""
    inside = [n for n in graph.nodes if n.op != "get_attr" and path in n.meta.get("nn_module_stack", {})]
    return len(inside) == 1 and inside[0].op == "call_module" and inside[0].target == path


def _drop_counter_updates(graph: fx.Graph, paths: dict[str, nn.Module]) -> None:
    """``num_batches_tracked.add_(1)`` of a replaced BatchNorm: the plain BatchNorm counts itself."""
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "add_" and not node.users:
            path = _attr_path(node.args[0])
            if path and path.endswith(".num_batches_tracked") and path.rsplit(".", 1)[0] in paths:
                graph.erase_node(node)
