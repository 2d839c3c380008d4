"""CIFAR-style ResNet-18 (3x3 stem, no max-pool), with the width of the DER paper's reduced variant.

``ResNet18(width=64)`` is the standard CIFAR ResNet-18; ``width=20`` is the reduced ResNet-18
of GEM/DER ("nf=20"). Written without torchvision.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from retain.models.base import ContinualModel, register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_model
class ResNet18(ContinualModel):
    """ResNet-18 for 32x32 inputs; the outputs of the four stages are the intermediate
    representations (B, C, H, W), which POD-spatial pools."""

    def __init__(self, num_outputs: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 2, 2, 2]
        stages = []
        in_planes = width
        for p, s in zip(planes, strides, strict=True):
            stages.append(nn.Sequential(BasicBlock(in_planes, p, s), BasicBlock(p, p, 1)))
            in_planes = p
        self.stages = nn.ModuleList(stages)
        self.num_features = planes[-1]
        self.num_outputs = int(num_outputs)
        self.add_task_params()

    def get_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            out = stage(out)
            self._intermediate_representation_cache.append(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
