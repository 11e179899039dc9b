"""Classifiers for the benchmark tools, with no torchvision dependency.

`resnet18` has the layer layout of torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2], 64..512 channels,
11,689,512 parameters at 1000 classes, as torchvision's), so throughput figures are comparable. For small
inputs (side < 64, e.g. CIFAR's 32x32) the stem is the usual CIFAR variant — a 3x3 stride-1 convolution and no
max-pool — because the ImageNet stem would shrink a 32x32 image to 1x1 before the last stage.
`SmallCNN` is a few-layer network that trains in seconds on CPU, for accuracy runs at tiny scale.
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("resnet18", "small")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, small_input: bool = False):
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        stages, in_planes = [], 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """conv(32)-conv(32)-pool-conv(64)-conv(64)-pool-fc(128)-fc: ~90% on Fashion-MNIST in a few epochs."""

    def __init__(self, num_classes: int = 10, in_size: int = 28):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2),
                                      *block(32, 64), *block(64, 64), nn.MaxPool2d(2))
        side = in_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * side * side, 128),
                                  nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18(num_classes: int = 1000, image_size: int = 224) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, small_input=image_size < 64)


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """The classifier called `name` ("resnet18" or "small") for square inputs of side `image_size`."""
    if name == "resnet18":
        return resnet18(num_classes, image_size)
    if name == "small":
        if image_size < 4:
            raise ValueError(f"model 'small' needs images of at least 4x4, got {image_size}")
        return SmallCNN(num_classes, image_size)
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
