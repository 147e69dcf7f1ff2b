"""Graph utilities every phase reads: op tables as data (:mod:`.op_tables`), read-only node
questions (:mod:`.graph_queries`), alias analysis (:mod:`.aliases`), the train/eval save-and-restore
(:mod:`.modes`) and the immutable :class:`.records.FoldRecord`. Nothing here changes a graph."""
