"""Record every node's output shape (``node.meta['tensor_meta']``) from example inputs.

The passes read these shapes to check broadcasts, to place rank-dependent norms and to map a
scale through reshapes. Running the model here never changes it: modules run in eval mode (no
BatchNorm statistics move) and get their own train/eval flags back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from asr_fx.errors import ASRError

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


def record_shapes(gm: fx.GraphModule, example_inputs: ExampleInputs) -> fx.GraphModule:
    """Run ``gm`` once on ``example_inputs`` (eval mode, no grad) recording each node's shape.

    Refuses inputs the model does not accept with :class:`~asr_fx.errors.ASRError` naming their shapes.
    """
    inputs = as_input_tuple(example_inputs)
    try:
        with preserved_training_modes(gm), torch.no_grad():
            # on copies: an in-place op on a model input must not write into the caller's tensors
            ShapeProp(gm.eval()).propagate(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ASRError(f"example_inputs of shape(s) {shapes} do not fit the model: {first}. "
                       "Pass inputs the model's forward accepts, e.g. (torch.randn(1, 3, 224, 224),)") from None
    return gm


def record_example_shapes(module: fx.GraphModule, context: PassContext) -> PassResult:
    """Record node shapes from the options' ``example_inputs`` when given (:func:`record_shapes`)."""
    example_inputs = context.options.example_inputs
    if example_inputs is None:
        return PassResult(module)
    return PassResult(record_shapes(module, example_inputs))
