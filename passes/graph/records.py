"""The records the fold passes make: one :class:`FoldRecord` per constant ``mul`` a pass decided on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FoldRecord:
    """What happened to one constant ``mul``, as one pass decided it (immutable once made).

    ``where`` it went (``bn``, ``conv``, ``linear``, ``norm``, ``sdpa-value``, ``next-conv``, ``next-linear``,
    ``next-bn``, or ``left as Mul``), ``into`` which layers, and the ``reason`` it was not folded
    (or, for a scale pushed forward, why its producer could not take it). A later pass that moves
    the same ``mul`` emits a new record for it; the fusion report keeps the newest per ``mul``.
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
        return self.where != LEFT_AS_MUL


LEFT_AS_MUL = "left as Mul"
