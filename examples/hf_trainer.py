"""Hugging Face Trainer: train an instrumented transformers model, fuse it, save it with save_pretrained.

    python examples/hf_trainer.py            # a tiny ConvNeXt from a config, 2 steps on random images

Random weights from a config and synthetic data: nothing is downloaded.
"""

import argparse
import tempfile

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, Trainer, TrainingArguments

import asr_fx


class RandomImages(torch.utils.data.Dataset):
    """Synthetic labelled images, in the dict form Trainer passes to the model."""

    def __init__(self, n: int, size: int) -> None:
        self.images, self.labels = torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}




def main(steps: int = 2, size: int = 32, out: str | None = None) -> None:
    torch.manual_seed(0)
    out = out or tempfile.mkdtemp(prefix="asr-fx-hf-")
    # --8<-- [start:trainer]
    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
    x = torch.randn(2, 3, size, size)
    asr_model = asr_fx.instrument(ConvNextForImageClassification(config), example_inputs=(x,))
    # still a ConvNextForImageClassification: labels=, the loss, save_pretrained all work

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1)
    Trainer(model=asr_model, args=args, train_dataset=RandomImages(16, size)).train()

    fused = asr_fx.fuse(asr_model.eval(), strict=True)  # a ConvNextForImageClassification, vanilla architecture
    fused.save_pretrained(f"{out}/convnext-asr")  # from_pretrained gives the fused model back
    # --8<-- [end:trainer]
    assert type(asr_model) is type(fused) is ConvNextForImageClassification
    again = ConvNextForImageClassification.from_pretrained(f"{out}/convnext-asr").eval()
    with torch.no_grad():
        error = (again(x).logits - asr_model(x).logits).abs().max() / asr_model(x).logits.abs().max()
    print(f"saved {out}/convnext-asr; reloaded vs trained: max rel error {error:.1e}")
    assert error < 1e-4


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("-o", "--out", default=None, help="output folder (default: a new temporary folder)")
    args = parser.parse_args()
    main(args.steps, args.size, args.out)
