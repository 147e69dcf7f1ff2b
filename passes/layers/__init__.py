"""Layer rules: one module per layer family, each saying how that layer is recognised, its channels
and channel axis, how a scale on its output or input folds into it, and why it refuses. Placement
and fold both read these rules, so they cannot disagree about what can take a scale."""
