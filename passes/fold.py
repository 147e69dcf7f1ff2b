"""Pass 5, fold: ``mul(layer(x), c)`` with ``c`` a per-channel constant becomes ``layer'(x)``.

Equivalence: ``layer'(x) == layer(x) * c`` for every input, by the formulas of
:mod:`asr_fx.passes._fold_rules` (the paper's Appendix A), up to float rounding.

Matches ``operator.mul``/``imul``, ``torch.mul``, ``Tensor.mul``/``mul_`` in either operand order,
where ``c`` is a ``get_attr`` tensor (possibly through ``expand_as(x)``/``type_as(x)``/``to(x.dtype)``) (a parameter such as a layer scale, or what
:func:`fold_constants` made of ``act(F(psi))``) that is one value, or varies along one dimension
(``(1,C,1,1)``, ``(C,1,1)``, ``(C,)``, ``(1,1,C)``, ...). The layer is a call of a conv /
conv-transpose (any groups), BN / SyncBN, GN, IN, LN or linear module, ``getitem(mha(...), 0)`` of
an ``nn.MultiheadAttention`` (its output projection), or a functional form on attribute weights
(:mod:`asr_fx.passes.fold_functional`). Between the layer and the ``mul`` the scale also moves back
through ops that commute with it (ReLU / max pooling for ``c >= 0``, average pooling, dropout,
identity, permutes and channel-preserving reshapes), into both inputs of an ``add`` and into the
pieces of a channel ``cat``, as long as each value on the way has no other user.

Refuses (records the reason and leaves the ``mul`` for :func:`propagate_scales`): a value on the
way with other users (folding would change them), a module called at more than one place,
parameters shared with another module or call (tied weights), an in-place ``mul_`` of a value that
something reads before it, scales that vary along more than one dimension or not along the layer's
channels, scales that broadcast the value to a larger shape, and layers without a rule.

Shapes: with recorded shapes (``example_inputs`` to :func:`asr_fx.fuse`) every broadcast is
checked. Without them, a scale with a leading batch dimension (``(1,C,1,1)``, ``(1,1,C)``) is taken
to match a batched layer output, as it does in a model run on batches; rank-dependent layers
(BatchNorm1d, GroupNorm, reshapes) need the shapes and are refused without them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ._fold_rules import Target, TensorUsage, scale_outputs
from ._patterns import channel_info, is_add, is_mul
from .constant_fold import FOLDED_PREFIX, fetch_attr
from .fold_functional import output_target
from .propagate import (_SHAPE_QUERIES, State, _constant_mul_input, _is_reshape, _permuted, _shape, is_inplace,
                        map_through, match)

_CAT = (torch.cat, torch.concat, torch.concatenate)


@dataclass
class FoldRecord:
    """What happened to one constant ``mul``.

    ``where`` it went (``bn``, ``conv``, ``linear``, ``norm``, ``next-conv``, ``next-linear``,
    ``next-bn``, or ``left as Mul``), ``into`` which layers, and the ``reason`` it was not folded
    (or, for a scale pushed forward, why its producer could not take it).
    """

    mul: str
    site: str
    target: str
    where: str
    reason: str = ""
    from_attention: bool = False
    into: str = ""

    @property
    def folded(self) -> bool:
        return self.where != "left as Mul"


def site_of(node: fx.Node) -> str:
    """The innermost module path whose ``forward`` created ``node`` (e.g. ``asr.layer1_0_bn3``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


_ADAPTERS = ("expand_as", "type_as", "to")


def _reads_only_meta_of(arg: object, x: fx.Node) -> bool:
    """``arg`` is ``x`` itself, ``x.dtype``/``x.device``/``x.shape``, or a literal."""
    if not isinstance(arg, fx.Node):
        return True
    return arg is x or (arg.op == "call_function" and arg.target is getattr and arg.args[0] is x
                        and arg.args[1] in ("dtype", "device", "shape"))


def adapted_constant(node: object, x: fx.Node) -> fx.Node | None:
    """The ``get_attr`` ``c`` when ``node`` is ``c.expand_as(x)``, ``c.type_as(x)`` or ``c.to(x.dtype)``:
    in ``x * node`` these only adapt ``c`` to ``x`` (broadcasting and the layer's dtype do the same)."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in _ADAPTERS):
        return None
    c = node.args[0]
    if not (isinstance(c, fx.Node) and c.op == "get_attr"):
        return None
    rest = [*node.args[1:], *node.kwargs.values()]
    return c if all(_reads_only_meta_of(a, x) for a in rest) else None


def constant_operand(gm: fx.GraphModule, mul: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """``(x, c)`` for a ``mul`` of a graph value by a ``get_attr`` tensor (or by ``c.expand_as(x)``,
    ``c.type_as(x)``, ``c.to(x.dtype)``), else ``None``."""
    a, b = mul.args
    for x, c in ((a, b), (b, a)):
        if isinstance(x, fx.Node):
            c = adapted_constant(c, x) or c
        if isinstance(c, fx.Node) and c.op == "get_attr" and isinstance(x, fx.Node) and x.op != "get_attr":
            value = fetch_attr(gm, str(c.target))
            if isinstance(value, torch.Tensor):
                return x, value
    return None


def per_channel_scale(c: torch.Tensor, mul: fx.Node, x: fx.Node) -> State | str:
    """``c`` as ``(v, position)`` (see :data:`~asr_fx.passes.propagate.State`), or why it is not per-channel."""
    if not c.is_floating_point():
        return f"scale has dtype {c.dtype}, not floating point"
    before, after = _shape(x), _shape(mul)
    if before is not None and (c.dim() > len(before) or (after is not None and after != before)):
        return f"scale of shape {tuple(c.shape)} broadcasts the value to a larger shape"
    c = c.detach()
    big = [i for i, s in enumerate(c.shape) if s != 1]
    if not big:
        return c.reshape(()), None
    if len(big) > 1:
        return f"scale of shape {tuple(c.shape)} varies along more than one dimension"
    return c.reshape(-1), big[0] - c.dim()


def _computed(mul: fx.Node, x: fx.Node) -> bool:
    """Whether the scale was computed from parameters (folded by :func:`fold_constants`), as an
    attention value is, rather than being a parameter itself (a layer scale)."""
    c = mul.args[1] if mul.args[0] is x else mul.args[0]
    c = adapted_constant(c, x) or c
    return isinstance(c, fx.Node) and str(c.target).startswith(FOLDED_PREFIX)


def _is_shape_query(node: fx.Node) -> bool:
    """A use that reads only a value's shape or dtype: ``x.size()``, ``x.shape``, ``x.dtype``,
    ``c.expand_as(x)`` / ``c.type_as(x)`` of a constant."""
    if node.op == "call_method" and node.target in _ADAPTERS:
        return isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
    return node.op == "call_method" and node.target in _SHAPE_QUERIES or \
        node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")


def _other_users(node: fx.Node, user: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u is not user and not _is_shape_query(u)]


def producer_target(gm: fx.GraphModule, node: fx.Node) -> Target | None:
    """The layer whose output ``node`` is, as a fold target, or ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        found = None if isinstance(module, nn.MultiheadAttention) else scale_outputs(module)
        info = channel_info(gm, node)
        if found is None or info is None:
            return None
        kind, apply, tensors = found
        return Target(str(node.target), kind, info.channels, info.position, tensors, apply, module)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        mha_node = node.args[0]
        if isinstance(mha_node, fx.Node) and mha_node.op == "call_module":
            mha = gm.get_submodule(str(mha_node.target))
            if isinstance(mha, nn.MultiheadAttention):
                kind, apply, tensors = scale_outputs(mha)  # type: ignore[misc]
                return Target(f"{mha_node.target}.out_proj", kind, mha.embed_dim, -1, tensors, apply, mha)
        return None
    return output_target(gm, node)


def _channels_of(gm: fx.GraphModule, node: fx.Node, pos: int, depth: int = 8) -> int | None:
    """The size of ``node``'s value along dim ``pos``, from recorded shapes or from the layers that made it."""
    shape = _shape(node)
    if shape is not None:
        return shape[pos] if -len(shape) <= pos < 0 else None
    if depth == 0:
        return None
    target = producer_target(gm, node)
    if target is not None:
        return target.channels if target.position == pos else None
    if is_add(node):
        return _channels_of(gm, node.args[0], pos, depth - 1)  # type: ignore[arg-type]
    cat = _cat_pieces(gm, node, pos, depth - 1)
    if isinstance(cat, tuple) and cat[1] is not None:
        return sum(cat[1])
    moved = map_through(gm, node, (torch.ones(()), None), forward=False)
    if isinstance(moved, tuple) and _permuted(node) is None and not _is_reshape(gm, node):
        return _channels_of(gm, node.args[0], pos, depth - 1)  # type: ignore[arg-type]
    return None


def _cat_pieces(gm: fx.GraphModule, node: fx.Node, pos: int | None, depth: int = 8) -> tuple[list[fx.Node], list[int] | None] | str | None:
    """The inputs of a ``cat`` along the scaled dim and their sizes there (``None`` sizes: unknown)."""
    if node.op != "call_function" or node.target not in _CAT:
        return None
    pieces = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return "a cat of non-graph values"
    shape = _shape(node)
    if pos is not None and dim >= 0:
        if shape is None:
            return "a cat whose rank is unknown; pass example_inputs to fuse"
        dim -= len(shape)
    if pos is not None and dim != pos:
        return "a cat along another dimension than the scaled one"
    sizes = [_channels_of(gm, p, dim, depth) for p in pieces] if pos is not None else None
    if sizes is not None and None in sizes:
        return "a cat of pieces of unknown size; pass example_inputs to fuse"
    return list(pieces), sizes


def plan_backward(gm: fx.GraphModule, node: fx.Node, state: State, usage: TensorUsage,
                  budget: list[int]) -> list[tuple[Target, torch.Tensor]] | str:
    """The layers that must take ``state`` so that ``node``'s value comes out scaled, or the reason."""
    budget[0] -= 1
    if budget[0] < 0:
        return "the scale would have to move through too many nodes"
    target = producer_target(gm, node)
    if target is not None:
        vec = match(target, state, usage)
        return vec if isinstance(vec, str) else [(target, vec)]
    scaled = _constant_mul_input(gm, node)
    if scaled is not None:  # a constant mul left in place (another site) commutes with this scale
        inputs: list[tuple[fx.Node, State]] = [(scaled, state)]
    elif is_add(node):
        inputs = [(a, state) for a in node.args]  # type: ignore[misc]
    else:
        cat = _cat_pieces(gm, node, state[1])
        if isinstance(cat, str):
            return f"`{node.name}` is {cat}"
        if cat is not None:
            pieces, sizes = cat
            if sizes is None:
                inputs = [(p, state) for p in pieces]
            else:
                inputs = [(p, (v, state[1])) for p, v in zip(pieces, state[0].split(sizes))]
        else:
            moved = map_through(gm, node, state, forward=False)
            if moved is None:
                return f"the value comes from `{node.name}`, which is not a layer that can take a scale"
            if isinstance(moved, str):
                return moved
            if not isinstance(node.args[0], fx.Node):
                return f"`{node.name}` has no graph input"
            inputs = [(node.args[0], moved)]
    if len({id(n) for n, _ in inputs}) != len(inputs):
        return f"`{node.name}` uses the same value twice"
    plan: list[tuple[Target, torch.Tensor]] = []
    for child, child_state in inputs:
        others = _other_users(child, node)
        if others:
            return f"`{child.name}` has {len(others)} other user(s); folding there would change them"
        found = plan_backward(gm, child, child_state, usage, budget)
        if isinstance(found, str):
            return found
        plan += found
    return plan


def _kinds(plan: list[tuple[Target, torch.Tensor]]) -> str:
    return "+".join(sorted({t.kind for t, _ in plan}))


def apply_plan(plan: list[tuple[Target, torch.Tensor]]) -> None:
    """Fold each 1-D scale into its target (in the target's dtype)."""
    with torch.no_grad():
        for target, vec in plan:
            target.apply(vec.to(target.tensors[0].dtype) if target.tensors else vec)


def fold_scales(gm: fx.GraphModule, usage: TensorUsage | None = None) -> tuple[fx.GraphModule, list[FoldRecord]]:
    """Fold every per-channel constant ``mul`` into the layer(s) that produced its other operand.

    Modifies ``gm`` in place and returns it with one record per constant ``mul`` seen. One pass
    over the graph; the parameter-usage table is built once (or passed in: folds keep it valid,
    since the tensors they create are used once and are not in it).
    """
    usage = usage or TensorUsage(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    records: list[FoldRecord] = []
    for mul in list(gm.graph.nodes):
        if not is_mul(mul):
            continue
        operands = constant_operand(gm, mul)
        if operands is None:
            continue
        x, c = operands
        record = FoldRecord(mul=mul.name, site=site_of(mul), target=str(x.target) if x.op == "call_module" else x.name,
                            where="left as Mul", from_attention=_computed(mul, x))
        records.append(record)
        state = per_channel_scale(c, mul, x)
        if isinstance(state, str):
            record.reason = state
            continue
        others = _other_users(x, mul)
        if others and (not is_inplace(gm, mul) or any(order.get(u, 0) < order[mul] for u in others)):
            record.reason = f"`{x.name}` has {len(others)} other user(s); folding into it would change them"
            continue
        with torch.no_grad():
            plan = plan_backward(gm, x, state, usage, [64])
        if isinstance(plan, str):
            record.reason = plan
            continue
        apply_plan(plan)
        record.where = _kinds(plan)
        record.into = ", ".join(t.label for t, _ in plan)
        mul.replace_all_uses_with(x)
        gm.graph.erase_node(mul)
    gm.recompile()
    return gm, records
