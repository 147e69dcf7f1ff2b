"""A trace error's way out, tried before it is offered: every module that stops the trace, named at once.

A :class:`~asr_fx.errors.TraceError` names the module where tracing failed and offers
``leaf_modules=[that module]``. Taken alone, that often leads straight to the next module that does not
trace. :func:`all_blockers` retraces with each named module kept as one call until the model traces
(or a failure names no module, or :data:`MAX_BLOCKERS` are found), so the message can name them all and
say whether the way out was tried and works.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from asr_fx.errors import TraceError

from .trace import trace

#: how many modules the search keeps as calls before it gives up
MAX_BLOCKERS = 8


def _combined(leaf_modules: Any, extra: list[str]) -> Any:
    if leaf_modules is None:
        return list(extra)
    if callable(leaf_modules) and not isinstance(leaf_modules, type):
        return lambda m, name: name in extra or leaf_modules(m, name)
    return [*leaf_modules, *extra]


def all_blockers(model: nn.Module, error: TraceError, leaf_modules: Any = None,
                 example_inputs: tuple[Any, ...] | None = None) -> tuple[list[str], TraceError | None]:
    """``(modules, last error)``: the modules that stop the trace of ``model`` one after the other (from
    ``error``'s on), and the error that remains with all of them kept as calls (``None``: it then traces)."""
    found: list[str] = [error.module] if error.module else []
    last: TraceError | None = error
    while found and len(found) < MAX_BLOCKERS:
        try:
            trace(model, _combined(leaf_modules, found), example_inputs=example_inputs)
        except TraceError as exc:
            last = exc
            if not exc.module or exc.module in found:
                break
            found.append(exc.module)
            continue
        return found, None
    return found, last


def way_out(model: nn.Module, error: TraceError, leaf_modules: Any = None,
            example_inputs: tuple[Any, ...] | None = None) -> str:
    """One sentence for the message: the complete ``leaf_modules=`` list, and whether it was tried."""
    found, last = all_blockers(model, error, leaf_modules, example_inputs)
    if len(found) <= 1 and last is error:
        return ""
    if last is None:
        return f"Tried: with leaf_modules={found!r} the whole model traces."
    first = str(last).split(". Way out:")[0]
    return (f"Modules that stop the trace, one after the other: {found!r}; with all of them kept as calls it still "
            f"fails: {first}.")
