"""Record every node's output shape (``node.meta['tensor_meta']``) from example inputs.

The passes read these shapes to check broadcasts, to place rank-dependent norms and to map a
scale through reshapes. Running the model here never changes it: modules run in eval mode (no
BatchNorm statistics move) and get their own train/eval flags back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from asr_fx.errors import InputShapeError

from ..graph.modes import preserved_training_modes
from ..infra import PassContext, PassResult

ExampleInputs = torch.Tensor | Sequence[torch.Tensor]


def as_input_tuple(example_inputs: ExampleInputs | None) -> tuple[torch.Tensor, ...] | None:
    """``example_inputs`` as a tuple of positional inputs: a bare tensor is one input."""
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _mutable(value: Any) -> Any:
    """Plain lists and dicts for torch.fx's immutable argument containers: the generated code passes a plain
    ``[a, b]``, and a called function may write into it (torchvision's Swin3D window-size helper does)."""
    if isinstance(value, immutable_list) or type(value) is list:
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict) or type(value) is dict:
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class _NodeFailed(Exception):
    def __init__(self, node: fx.Node, error: BaseException) -> None:
        super().__init__(str(error))
        self.node, self.error = node, error


class _ShapeRecorder(fx.Interpreter):
    """torch.fx's ShapeProp (``node.meta['tensor_meta']`` and ``['type']``), with the arguments the generated
    code would pass (mutable lists) and no traceback printed to stderr."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(tuple(args)), _mutable(dict(kwargs))

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except _NodeFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the node
            raise _NodeFailed(n, exc) from exc
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def record_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Run ``gm`` once on ``example_inputs`` (eval mode, no grad) recording each node's shape.

    Refuses inputs the captured model does not run on with :class:`~asr_fx.errors.InputShapeError` naming their
    shapes and the graph node that failed.
    """
    inputs = as_input_tuple(example_inputs)
    try:
        with preserved_training_modes(gm), torch.no_grad():
            # on copies: an in-place op on a model input must not write into the caller's tensors
            _ShapeRecorder(gm.eval()).run(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        error = exc.error if isinstance(exc, _NodeFailed) else exc
        first = (str(error).strip().splitlines() or [""])[0][:300]
        where = ""
        if isinstance(exc, _NodeFailed):
            target = exc.node.target if isinstance(exc.node.target, str) else getattr(exc.node.target, "__name__", "")
            where = f" at graph node `{exc.node.name}` ({exc.node.op} {target})"
        raise InputShapeError(f"example_inputs of shape(s) {shapes} do not run through the captured model{where}: "
                              f"{type(error).__name__}: {first}. If the model's own forward fails on them too, pass "
                              "inputs it accepts, e.g. (torch.randn(1, 3, 224, 224),); if it runs on them, keep the "
                              "module around that call as one call with leaf_modules=[...]",
                              shape=list(shapes[0]) if shapes else None) from None
    return gm


def record_example_shapes(module: fx.GraphModule, context: PassContext) -> PassResult:
    """Record node shapes from ``example_inputs`` when given (:func:`record_shapes`)."""
    example_inputs = context.options.get("example_inputs")
    if example_inputs is None:
        return PassResult(module, False)
    return PassResult(record_shapes(module, example_inputs), False)
