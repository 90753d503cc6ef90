"""Models defined in the package: an MLP, a small CNN for the 8x8 digits, one for 28x28 MNIST, and PreAct-ResNet18.

PreActResNet18 follows the CIFAR-style layout used across the backdoor literature (3x3 stem, four stages of two
pre-activation blocks, 1x1 projection shortcuts where the shape changes, no final norm), and its parameter names
match that layout's usual checkpoints (``conv1``, ``layerK.J.bn1``, ``layerK.J.shortcut.0``, ``linear``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden Linear+ReLU layers of ``hidden`` units, then a Linear classifier."""

    def __init__(self, in_features: int = 64, hidden: int = 128, depth: int = 2, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Small residual CNN for 1x8x8 digits (the model of docs/calibration.md).

    conv(1->w)+BN+ReLU; h + ReLU(BN(conv(w->w))); conv(w->2w, stride 2)+BN+ReLU; global average pool; linear.
    Two permutation groups: the w-channel stream and the 2w channels of conv3.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation (N, 2w) the classifier reads."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = h + F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.bn3(self.conv3(h)))
        return torch.flatten(self.pool(h), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MnistCNN(nn.Module):
    """Small residual CNN for 1x28x28 MNIST (the MNIST victim of ``tsc_fast.testbed.victims``).

    conv5x5(1->w)+BN+ReLU at 28x28; max-pool to 14x14; h + ReLU(BN(conv(w->w))); conv(w->2w)+BN+ReLU; max-pool
    to 7x7; conv(2w->4w)+BN+ReLU; global MAX pool; linear. Three permutation groups: the w-channel stream, the 2w
    channels of conv3 and the 4w channels of conv4. Width 16: 26.7k parameters and 2.6M multiply-adds per
    image, so a default TSC run (about 12k curve steps at batch 32) stays a few minutes on one CPU thread.

    Design measurements (4000 clean MNIST training images, Adam lr 3e-3, batch 64, 12 epochs, seed 0; test ACC
    per epoch from epoch 4): the same network with a 3x3 first conv and global AVERAGE pooling swung between 90
    and 97% from one epoch to the next and ended at 96.7; global max pooling alone: 97.1-98.1, 97.8 at the end;
    with the 5x5 first conv too (this model): 96.4-98.4, 98.4 at the end.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(4 * width)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation (N, 4w) the classifier reads."""
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = h + F.relu(self.bn2(self.conv2(h)))
        h = F.max_pool2d(F.relu(self.bn3(self.conv3(h))), 2)
        h = F.relu(self.bn4(self.conv4(h)))
        return torch.flatten(self.pool(h), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        planes = [width, 2 * width, 4 * width, 8 * width]
        in_planes = width
        stages = []
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(PreActBlock(in_planes, p, stride), PreActBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


ARCHITECTURES = {"mlp": MLP, "cnn": DigitsCNN, "mnist_cnn": MnistCNN, "preact_resnet18": PreActResNet18}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a package model by name (``mlp``, ``cnn``, ``mnist_cnn``, ``preact_resnet18``)."""
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(**kwargs)


def build_classifier(arch: str, image_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """A package model (``mlp``, ``cnn``, ``mnist_cnn``, ``preact_resnet18``) sized for ``image_shape`` (C, H, W),
    seeded init.

    The global torch RNG is left untouched.
    """
    channels, height, width = (int(s) for s in image_shape)
    if arch == "mlp":
        options: dict[str, Any] = {"in_features": channels * height * width, "num_classes": num_classes}
    else:
        options = {"in_channels": channels, "num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, **options)
