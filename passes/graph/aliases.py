"""Which graph values share storage, and which ops write into it: the one alias/write analysis the
fold passes ask before they erase a multiply.

A *view* (``view``, ``reshape``, ``flatten``, ``permute``, ``transpose``, indexing, ...) shares its
input's storage; an *in-place op* (``mul_``, ``add_``, ``relu_``, ``inplace=True`` modules and
functions, ``a += b`` / ``a *= b`` recorded as ``operator.iadd`` / ``imul``) writes into its first
argument's storage and returns it. Values linked by either are one *storage class*; its *root* is the
value that allocated it (a layer's output, a model input).

Erasing ``mul = x * c`` and giving its uses to ``x`` (what a fold does) merges ``mul``'s storage class
into ``x``'s, and drops ``mul``'s own write when ``mul`` is in place. :func:`erase_refusal` says when
that would change what some read sees; nothing here changes a graph.
"""

from __future__ import annotations

import torch.fx as fx

from .graph_queries import calls_one_of, is_inplace, module_of, node_label, reads_only_metadata
from .op_tables import IDENTITY_MODULES, RESHAPE_MODULES, VIEW_FUNCTIONS, VIEW_METHODS
from .refusals import Refusal


def is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s result may share storage with its first argument (a view or a reshape)."""
    return calls_one_of(gm, node, RESHAPE_MODULES, VIEW_FUNCTIONS, VIEW_METHODS)


def aliases_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s result is (or may be) its first argument's storage: a view, an in-place op, or
    a module that returns its input itself (Dropout in eval, Identity)."""
    return bool(node.args) and isinstance(node.args[0], fx.Node) and \
        (is_view(gm, node) or is_inplace(gm, node) or isinstance(module_of(gm, node), IDENTITY_MODULES))


def storage_root(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The value that allocated ``node``'s storage (walking back through views and in-place ops)."""
    while aliases_input(gm, node):
        node = node.args[0]  # type: ignore[assignment]
    return node


def alias_descendants(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """``node`` and every value that shares its storage by being derived from it (views, in-place ops)."""
    found, stack, seen = [], [node], {node}
    while stack:
        current = stack.pop()
        found.append(current)
        for user in current.users:
            if user not in seen and user.args and user.args[0] is current and aliases_input(gm, user):
                seen.add(user)
                stack.append(user)
    return found


def _upstream(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    chain = [node]
    while aliases_input(gm, chain[-1]):
        chain.append(chain[-1].args[0])  # type: ignore[arg-type]
    return chain


def erase_refusal(gm: fx.GraphModule, mul: fx.Node, x: fx.Node,
                  order: dict[fx.Node, int] | None = None) -> Refusal | None:
    """Why erasing ``mul`` (its uses given to its operand ``x``) would change a read, or ``None``.

    A fold is alias-safe when no in-place write is involved (values only), or when ``x``'s storage
    is private to the chain ``root -> ... -> x -> mul``: it is not a model input (the caller reads
    it after the call) and no value in it is read by anything but the next step of that chain. With
    ``order`` (fold into the producer, where ``x`` itself becomes the scaled value), a read of ``x``'s
    storage after an in-place ``mul`` sees the scaled value either way and is allowed.
    """
    downstream = alias_descendants(gm, mul)
    root = storage_root(gm, x)
    storage = alias_descendants(gm, root)
    writes = [n for n in (*downstream, *storage) if n is not mul and is_inplace(gm, n)]
    mul_inplace = is_inplace(gm, mul)
    if not writes and not mul_inplace:
        return None
    write = f"`{node_label(mul)}` ({mul.name})" if mul_inplace else f"`{node_label(writes[0])}` ({writes[0].name})"
    if root.op == "placeholder":
        return Refusal(f"the in-place {write} would write into (or no longer write into) the model input "
                       f"`{root.name}`, which the caller reads after the call; the mul stays")
    chain = set(_upstream(gm, x))
    private = chain | ({mul, *downstream} if mul_inplace else set())
    for node in storage:
        if node not in private:
            return Refusal(f"the in-place {write} and `{node.name}` share the storage of `{root.name}`; "
                           "folding would change what one of them reads; the mul stays")
    for node in chain:
        step = {mul} if node is x else {u for u in node.users if u in chain}
        for reader in node.users:
            if reader in step or reader in private or reads_only_metadata(reader):
                continue
            if order is not None and mul_inplace and order.get(reader, -1) > order.get(mul, 0):
                continue
            return Refusal(f"the in-place {write} would change what `{reader.name}` reads from `{node.name}`; "
                           "the mul stays")
    return None
