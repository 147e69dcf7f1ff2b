"""The ASR paper's CIFAR recipe: ResNet-164 with ASR(SE), trained with DDP under torchrun, then fused.

The paper (Appendix B.1, Table 10, ResNet164 column): SGD with momentum 0.9, learning rate 0.1, divided
by 10 (gamma 0.1) at epochs 81 and 122, weight decay 1e-4, 164 epochs, batch size 128, with
normalisation, random cropping and horizontal flipping; psi starts at 0.1 with a sigmoid (Appendix C),
and psi and the attention network train with the same optimizer, weight decay and schedule as every
other parameter. Those are this script's defaults; ``--batch-size`` is the global batch, split over
the processes.

    # CPU, 2 processes (gloo), synthetic data (torchvision's FakeData), 2 steps, a small ResNet:
    torchrun --nproc_per_node 2 examples/train_cifar.py --depth 20 --max-steps 2 --out ckpt.pt
    # the paper's experiment on a GPU machine (nccl), CIFAR-100 from a local folder (no download):
    torchrun --nproc_per_node 4 examples/train_cifar.py --data ~/data --dataset cifar100 --out r164.pt
    # then: fold every ASR block, export ONNX and verify it
    asr-fx fuse r164.pt -o resnet164.onnx

``--data`` is the folder torchvision's ``CIFAR10/CIFAR100(root, download=False)`` reads
(``cifar-10-batches-py`` / ``cifar-100-python`` inside it). Accuracy on the test split is printed after
every epoch; the checkpoint (:func:`asr_fx.save`, rank 0, after every epoch) is what ``asr-fx fuse`` takes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torchvision
import torchvision.transforms as T
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import asr_fx

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder holding CIFAR (torchvision layout); none: FakeData")
    p.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    p.add_argument("--depth", type=int, default=164,
                   help="bottleneck ResNet depth 9n+2 (164: the paper's; 20 for a test)")
    p.add_argument("--attention", default="se", help="ASR's attention network (se, eca, srm, ie, spa, cbam)")
    p.add_argument("--epochs", type=int, default=164)
    p.add_argument("--milestones", type=int, nargs="*", default=[81, 122], help="epochs at which lr *= gamma")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, over all processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    p.add_argument("--fake-size", type=int, default=512, help="FakeData images (train; test gets a quarter)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="asr_cifar.pt", help="checkpoint written by asr_fx.save after every epoch")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """(train, test, classes): CIFAR from ``--data``, else FakeData of CIFAR's shape."""
    classes = 100 if args.dataset == "cifar100" else 10
    norm = T.Normalize(MEAN[args.dataset], STD[args.dataset])
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    if args.data is None:
        fake = torchvision.datasets.FakeData
        return (fake(args.fake_size, (3, 32, 32), classes, train_tf, random_offset=0),
                fake(max(args.fake_size // 4, 1), (3, 32, 32), classes, test_tf, random_offset=args.fake_size), classes)
    cls = torchvision.datasets.CIFAR100 if args.dataset == "cifar100" else torchvision.datasets.CIFAR10
    return (cls(args.data, train=True, transform=train_tf, download=False),
            cls(args.data, train=False, transform=test_tf, download=False), classes)


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (nccl on GPUs, gloo on CPUs); one process without it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, world: int) -> float:
    """Top-1 accuracy over the whole test split (each process counts its shard; the counts are summed)."""
    model.eval()
    counts = torch.zeros(2, device=device)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            counts += torch.stack([(model(x).argmax(1) == y).sum(), torch.tensor(len(y), device=device)]).float()
    if world > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1].clamp_min(1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup()
    torch.manual_seed(args.seed)  # the same init on every process (DDP also broadcasts rank 0's)
    train_set, test_set, classes = datasets(args)
    vanilla = asr_fx.build("asr_fx.models:cifar_resnet", depth=args.depth, num_classes=classes)
    model = asr_fx.instrument(vanilla, args.attention, example_inputs=(torch.randn(2, 3, 32, 32),)).to(device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    per_process = max(args.batch_size // world, 1)
    sampler = DistributedSampler(train_set, seed=args.seed) if world > 1 else None
    test_sampler = DistributedSampler(test_set, shuffle=False) if world > 1 else None
    train_loader = DataLoader(train_set, per_process, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda")
    test_loader = DataLoader(test_set, per_process, sampler=test_sampler, num_workers=args.workers)
    # psi and F train with everything else: the same SGD, weight decay and schedule (the paper's recipe)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, args.gamma)
    loss_fn = nn.CrossEntropyLoss()
    if rank == 0:
        print(f"ResNet-{args.depth} + ASR({args.attention}) at {len(asr_fx.asr_config(model).sites)} sites, "
              f"{asr_fx.count_parameters(model):,} parameters; {world} process(es) on {device}; "
              f"{'FakeData' if args.data is None else args.dataset}; global batch {per_process * world}", flush=True)
    step = 0
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        start, total, seen = time.time(), 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            total, seen, step = total + float(loss.detach()) * len(y), seen + len(y), step + 1
            if args.max_steps is not None and step >= args.max_steps:
                break
        sched.step()
        acc = evaluate(net, test_loader, device, world)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {total / max(seen, 1):.4f}  test acc {100 * acc:.2f}%  "
                  f"lr {opt.param_groups[0]['lr']:.4g}  {time.time() - start:.1f}s", flush=True)
            asr_fx.save(model, args.out, input_shape=[1, 3, 32, 32])
        if args.max_steps is not None and step >= args.max_steps:
            break
    if rank == 0:
        print(f"wrote {args.out}; fuse it with: asr-fx fuse {args.out} -o resnet{args.depth}.onnx", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
