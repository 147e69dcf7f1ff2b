"""Built-in models: the paper's CIFAR ResNets, so demos and tests need no download."""

from .resnet_cifar import cifar_resnet, resnet164

__all__ = ["cifar_resnet", "resnet164"]
