"""Forms: the ASR blocks and the graph rewrites that put them in and take them out. Each training
form is a pair applied by ``instrument`` and undone by ``fuse`` (:mod:`.bn_affine_training_form`,
:mod:`.hoist_attention_values`); :mod:`.insert` puts a block after each site and
:mod:`.convert_existing` turns a model's own channel attention into its ASR form. Every rewrite
keeps the function with ``v = 1`` (or, for the pairs, exactly)."""
