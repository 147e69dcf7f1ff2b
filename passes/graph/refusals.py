"""The two negative answers every rule and every fold step gives, each carrying its reason as text a
user reads: :class:`NoMatch` (the node is not what was asked about: not this layer, not an op a scale
moves through) and :class:`Refusal` (it is, but this scale cannot go there)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoMatch:
    """The node is not what a rule or step looks for; ``reason`` says what it looked for."""

    reason: str


@dataclass(frozen=True)
class Refusal:
    """The node is what was looked for, but the scale cannot go there; ``reason`` says why."""

    reason: str
