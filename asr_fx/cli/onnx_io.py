"""The ONNX options the library's ``export_onnx`` does not take yet: input/output names, dynamic height/width.

Lead, at merge: the "lib" branch adds ``input_names``/``output_names`` and dynamic height/width to
``asr_fx.export_onnx``. Then pass ``args.input_names``/``args.output_names``/``args.dynamic_shape`` to it,
export straight to OUT, delete :func:`publish_renamed` and :func:`export_dynamic_options`' refusal, and this module with them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from asr_fx.errors import ASRError


def default_output_names(count: int) -> list[str]:
    """``output0``, ``output1``, ...: what the report calls the outputs, and so what the file calls them."""
    return [f"output{i}" for i in range(count)]


def check_name_counts(input_names: Sequence[str] | None, output_names: Sequence[str] | None, n_inputs: int,
                      n_outputs: int) -> None:
    """Refuse ``--input-names``/``--output-names`` with the wrong number of names, before the export."""
    for option, given, count in (("--input-names", input_names, n_inputs), ("--output-names", output_names, n_outputs)):
        if given is not None and len(given) != count:
            raise ASRError(f"{option}: {len(given)} name(s) for {count} {option[2:-6]}(s) of the model")
        if given is not None and len(set(given)) != len(given):
            raise ASRError(f"{option}: each name once, got {','.join(given)}")


def publish_renamed(src: str | os.PathLike, path: str | os.PathLike, input_names: Sequence[str] | None,
                    output_names: Sequence[str] | None) -> None:
    """Write the verified ONNX file ``src`` to ``path`` with its graph inputs and outputs renamed:
    a temporary file beside ``path``, then a rename, so ``path`` is only ever absent, old or complete."""
    path = Path(path)
    model = onnx.load(str(src))
    graph = model.graph
    renames: dict[str, str] = {}
    for option, given, values in (("--input-names", input_names, graph.input), ("--output-names", output_names, graph.output)):
        if given is None:
            continue
        if len(given) != len(values):
            raise ASRError(f"{option}: {len(given)} name(s) for {len(values)} {option[2:-6]}(s) of the model "
                           f"({', '.join(v.name for v in values)})")
        renames.update({v.name: new for v, new in zip(values, given) if v.name != new})
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    clash = sorted((set(renames.values()) & taken) - set(renames))
    if clash:
        raise ASRError(f"--input-names/--output-names: {', '.join(clash)} already name(s) a tensor inside the model; "
                       "choose other names")
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.checker.check_model(model)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a new file gets the umask's permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_dynamic_options(dims: Sequence[str] | None) -> dict[str, bool]:
    """``export_onnx`` keywords for ``--dynamic-shape``; height and width are refused until the library takes them."""
    if not dims:
        return {"dynamic_batch": False}
    if set(dims) - {"batch"}:
        raise ASRError(f"--dynamic-shape {','.join(dims)}: this asr_fx.export_onnx makes only the batch dimension "
                       "dynamic; use --dynamic-shape batch (height and width come with the library's dynamic shapes)")
    return {"dynamic_batch": True}
