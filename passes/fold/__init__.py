"""Fold: an inference GraphModule with ASR blocks inlined in, one without any per-channel constant
``mul`` out (where it can fold), plus a :class:`~asr_fx.passes.graph.records.FoldRecord` for each
multiply saying where it went or why it stayed. Constants are folded first (:mod:`.constant_fold`),
checked finite (:mod:`.check_finite`), folded back into producers (:mod:`.fold`), pushed forward into
the next layers (:mod:`.propagate`), then dead code goes (:mod:`.cleanup`). The scale algebra
(:mod:`.scale_algebra`) and the plan (:mod:`.fold_plan`) are the core both directions share."""
