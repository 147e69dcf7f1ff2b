"""What an ONNX file holds, read without running it: its op multiset, weight count and inputs (re-exported
by :mod:`asr_fx.verify`, where they used to live)."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx


def onnx_op_counts(model: str | os.PathLike | onnx.ModelProto) -> dict[str, int]:
    """The op-type multiset of an ONNX model's main graph (and of its local functions)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in proto.graph.node)
    for function in proto.functions:
        counts.update(node.op_type for node in function.node)
    return dict(sorted(counts.items()))


def onnx_parameter_count(proto: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers (the weights) of an ONNX model; no data is read."""
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type in floating)


def onnx_inputs(proto: onnx.ModelProto) -> list[tuple[str, list[int | str]]]:
    """``(name, dims)`` of each graph input; symbolic dims as their names (``"?"`` when unnamed)."""
    initializers = {t.name for t in proto.graph.initializer}
    return [(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in i.type.tensor_type.shape.dim]) for i in proto.graph.input if i.name not in initializers]


def op_count_diff(expected: dict[str, int], actual: dict[str, int]) -> str:
    """``"Mul: 3 (expected 0), Conv: 12 (expected 13)"``: the op types whose counts differ."""
    ops = sorted(set(expected) | set(actual))
    return ", ".join(f"{op}: {actual.get(op, 0)} (expected {expected.get(op, 0)})"
                     for op in ops if actual.get(op, 0) != expected.get(op, 0)) or "none"


__all__ = ["onnx_inputs", "onnx_op_counts", "onnx_parameter_count", "op_count_diff"]
