"""An ultralytics YOLO model: instrument the nn.Module inside, train, fuse: YOLO's own class throughout.

    python examples/yolo.py              # yolov8n from its yaml (random weights) at 64x64

The training step here uses a stand-in loss on random images; with real data, train the instrumented
module with your own loop or put it back into ultralytics' trainer. Nothing is downloaded.
"""

import argparse

import torch
from ultralytics import YOLO

import asr_fx


def tensors(value):
    """The tensors in a model output (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [t for item in items for t in tensors(item)]


def main(config: str = "yolov8n.yaml", steps: int = 1, size: int = 64) -> None:
    torch.manual_seed(0)
    # --8<-- [start:yolo]
    detector = YOLO(config).model  # the DetectionModel (an nn.Module) inside
    x = torch.randn(1, 3, size, size)
    asr_model = asr_fx.instrument(detector, example_inputs=(x,))
    print(f"{config}: {len(asr_fx.get_config(asr_model)['sites'])} ASR sites")

    optimizer = torch.optim.SGD(asr_model.parameters(), lr=0.01)
    for _ in range(steps):  # a stand-in loss: use ultralytics' detection loss with real labels
        outputs = asr_model(torch.randn(2, 3, size, size))  # train mode: the head's raw maps
        loss = sum(t.float().pow(2).mean() for t in tensors(outputs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    fused = asr_fx.fuse(asr_model.eval(), strict=True, example_inputs=(x,))
    # ultralytics' DetectionModel again, vanilla architecture: its own exporters and predictors take it
    # --8<-- [end:yolo]
    assert type(fused) is type(detector) and asr_fx.count_parameters(fused) == asr_fx.count_parameters(detector)
    print(f"{type(fused).__name__}: {asr_fx.count_parameters(fused):,} parameters, as before ASR")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="yolov8n.yaml")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    main(args.config, args.steps, args.size)
