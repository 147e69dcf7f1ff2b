"""Capture: an ``nn.Module`` in, a ``torch.fx.GraphModule`` out that computes the same function in
train and eval mode (:func:`.trace.trace`), plus, with example inputs, the shapes and dtypes each
node carries in ``node.meta`` (:mod:`.shapes`). Nothing else in ``passes/`` calls torch.fx's tracer."""
