"""What :func:`asr_fx.fuse` reports: the :class:`FusionReport` (where every constant per-channel scale went,
and why not where it stayed), kept on the fused module under :data:`FUSION_KEY`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tabulate import tabulate
from torch import nn

from asr_fx.passes.graph.records import FoldRecord
from asr_fx.passes.infra import latest_by

#: where :func:`asr_fx.fuse` keeps the :class:`FusionReport` on the fused GraphModule: ``fused.meta[FUSION_KEY]``
FUSION_KEY = "asr_fx.fusion"


@dataclass
class FusionReport:
    """One :class:`~asr_fx.passes.graph.records.FoldRecord` per constant ``mul`` that :func:`asr_fx.fuse` saw.

    ``blocks``: the module paths of the model's ASR blocks (:class:`~asr_fx.passes.forms.asr_blocks.ASR`), when
    it has any. Then only their scales are ASR sites (:attr:`unfolded`); a scale the model computes from
    its own parameters elsewhere (a gate ``sigmoid(alpha)``, a layer scale) is reported but not counted.
    Without blocks (ASR written by hand on a plain ``psi``), every scale computed from parameters counts.
    """

    records: list[FoldRecord] = field(default_factory=list)
    blocks: tuple[str, ...] = ()

    @classmethod
    def from_pass_records(cls, records: list[FoldRecord], blocks: tuple[str, ...] = ()) -> FusionReport:
        """The report of one fusion run: the newest record per constant ``mul`` (a later pass, such as
        propagation, emits a new record for a ``mul`` an earlier pass left), in first-seen order."""
        return cls(latest_by(records, lambda r: (r.mul, r.site, r.target)), tuple(blocks))

    def is_asr_site(self, record: FoldRecord) -> bool:
        """Whether ``record``'s scale is an ASR site's: made inside one of :attr:`blocks`, or (a model
        without blocks) computed from parameters."""
        if not self.blocks:
            return record.from_attention
        return any(record.site == b or record.site.startswith(b + ".") for b in self.blocks)

    @property
    def folded(self) -> list[FoldRecord]:
        return [r for r in self.records if r.folded]

    @property
    def unfolded(self) -> list[FoldRecord]:
        """ASR sites (:meth:`is_asr_site`) that are still a ``mul``."""
        return [r for r in self.records if not r.folded and self.is_asr_site(r)]

    @property
    def muls_removed(self) -> int:
        return len(self.folded)

    def summary(self) -> dict[str, int]:
        """How many scales went where: ``{"bn": 16, "next-conv": 1, "left as Mul": 2, ...}``."""
        return dict(Counter(r.where for r in self.records))

    def unfolded_message(self) -> str:
        """The error text of ``fuse(strict=True)``: how many ASR sites stayed a ``mul``, then one line
        per site naming the producer it follows and why it could not fold."""
        lines = [f"{len(self.unfolded)} ASR site(s) could not be folded and stay as a constant Mul:"]
        lines += [f"  {r.site or r.mul} after `{r.target}`: {r.reason}" for r in self.unfolded]
        return "\n".join(lines)

    def table(self) -> str:
        """Every record as a text table: site, mul node, producer, where it folded, into which
        layer(s), and the reason (why it folded there, or why not)."""
        rows = [(r.site or "-", r.mul, r.target, r.where, getattr(r, "into", ""), r.reason) for r in self.records]
        return tabulate(rows, headers=["site", "mul", "producer", "folded into", "layer(s)", "reason"])

    def to_dict(self) -> dict:
        """JSON-ready: counts of folded and unfolded scales and, per record, site, mul, producer,
        where/into and reason (what ``asr-fx fuse --json`` prints under ``fusion``)."""
        return {
            "folded": len(self.folded),
            "unfolded": len(self.unfolded),
            "records": [
                {"site": r.site, "mul": r.mul, "producer": r.target, "where": r.where, "into": getattr(r, "into", ""),
                 "reason": r.reason}
                for r in self.records
            ],
        }

    def __str__(self) -> str:
        return self.table()


def fusion_report(fused: nn.Module) -> FusionReport | None:
    """The :class:`FusionReport` that :func:`asr_fx.fuse` attached to its result (None: not a fused model):
    in ``fused.__dict__`` for the user's own class, in a GraphModule's ``meta``."""
    if FUSION_KEY in fused.__dict__:
        return fused.__dict__[FUSION_KEY]
    meta = fused.__dict__.get("meta")
    return meta.get(FUSION_KEY) if isinstance(meta, dict) else None
