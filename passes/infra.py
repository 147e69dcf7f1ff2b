"""The pass contract and the pipeline runner, in the manner of ``torch.fx.passes.infra``.

A pipeline pass is a function ``(module, context) -> PassResult``: the module it returns (the same
object, or a new one: tracing makes a GraphModule of a plain module) and the records it made (fold
records, sites, ...). ``context.options`` is the run's typed options (a frozen dataclass each pipeline
declares beside it). Records are immutable and never edited by a
later pass: a later pass that has more to say about the same thing emits its own record
(:func:`latest_by` keeps the newest per key). A :class:`Pipeline` is a named, declared tuple of
passes; running it lints the graph after every pass and adds the failing pass's name to any
exception raised inside it (``exc.__notes__``), without changing the exception's type or message.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch.fx as fx
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    """What one pass returns: the ``module`` and the ``records`` it made."""

    module: nn.Module
    records: tuple[Any, ...] = ()


@dataclass
class PassContext:
    """What the passes of one pipeline run share: the run's ``options`` (a frozen dataclass, read-only)
    and every record the passes before made (appended by the runner, in order)."""

    options: Any = None
    records: list[Any] = field(default_factory=list)

    def records_of(self, kind: type[T]) -> list[T]:
        """The records of one type that earlier passes made, in order."""
        return [r for r in self.records if isinstance(r, kind)]


#: a pipeline step: ``(module, context) -> PassResult``; a step after tracing takes the GraphModule
Pass = Callable[[Any, PassContext], PassResult]


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+), or the same ``__notes__`` list on Python 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__)


def graph_modules(module: nn.Module) -> list[fx.GraphModule]:
    """Every GraphModule in ``module``'s tree (itself first, if it is one)."""
    return [m for m in module.modules() if isinstance(m, fx.GraphModule)]


@dataclass(frozen=True)
class Pipeline:
    """A named list of passes, run in order by :meth:`run`."""

    name: str
    passes: tuple[Pass, ...]

    def pass_names(self) -> list[str]:
        return [pass_name(p) for p in self.passes]

    def run(self, module: nn.Module, options: Any = None) -> tuple[nn.Module, list[Any]]:
        """Run every pass on ``module`` with ``options``; returns the final module and all records, in order.

        After each pass every GraphModule in the result is linted (``graph.lint()``). An exception
        inside a pass (or its lint) gets a note naming the pass and this pipeline, and propagates.
        """
        context = PassContext(options)
        for p in self.passes:
            try:
                result = p(module, context)
                for gm in graph_modules(result.module):
                    gm.graph.lint()
            except Exception as exc:
                _add_note(exc, f"asr-fx: raised in pass `{pass_name(p)}` of the `{self.name}` pipeline")
                raise
            module = result.module
            context.records.extend(result.records)
        return module, context.records


def latest_by(records: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """One record per key, the newest, in the order the keys first appeared."""
    latest: dict[Hashable, T] = {}
    for record in records:
        latest[key(record)] = record  # dict keeps the first insertion's position
    return list(latest.values())
