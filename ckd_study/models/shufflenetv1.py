"""ShuffleNet (v1) for CIFAR as in RepDistiller's ``models/ShuffleNetv1.py`` (``ShuffleV1``: groups 3,
out_planes [240, 480, 960], num_blocks [4, 8, 4], 1x1 stride-1 stem to 24 channels, no max-pool).
Module names follow RepDistiller (``layerK.i.convJ``, ``linear``); ``classifier`` aliases ``linear``.

Features: feats = [relu(bn1(conv1(x))), layer1, layer2, layer3] (post-ReLU); preact_feats replaces each stage
with the last unit's ``bn3(conv3(.)) + shortcut`` before its ReLU (stem entry post-ReLU, as in RepDistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, ZooModel, register_model, run_stage

__all__ = ["ShuffleBlock", "Bottleneck", "ShuffleNetV1"]


class ShuffleBlock(nn.Module):
    """Channel shuffle: (N, g*k, H, W) -> (N, k, g, H, W) order -> (N, g*k, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 - shuffle - dw 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups  # the first unit reads the 24-channel stem: no grouping there
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.shuffle1(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


class ShuffleNetV1(ZooModel):
    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

        self.stage_channels = (24, *out_planes)
        self.pooled_dim = out_planes[2]
        self.num_classes = num_classes

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0  # the stride-2 unit concatenates its pooled input
            layers.append(Bottleneck(self.in_planes, out_planes - cat_planes, stride=stride, groups=groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        pooled = F.avg_pool2d(f3, 4).flatten(1)
        logits = self.linear(pooled)
        return ModelOutput(logits, [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre], pooled)


@register_model("ShuffleV1")
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # noqa: N802 - RepDistiller's name
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
