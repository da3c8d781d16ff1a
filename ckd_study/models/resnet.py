"""CIFAR ResNets (He et al. 2016, the 3-stage 6n+2 family) as defined in RepDistiller / mdistiller.

resnet8 ... resnet110 use widths [16, 16, 32, 64]; the ``x4`` variants use [32, 64, 128, 256]. All use the
BasicBlock (resnet110 included, as in RepDistiller). Module names follow RepDistiller's ``models/resnet.py``
so that its checkpoints load with ``load_state_dict``.

Features (RepDistiller ``forward(x, is_feat=True, preact=...)`` without the pooled vector):
    feats        = [relu(bn1(conv1(x))), layer1, layer2, layer3]          (post-ReLU)
    preact_feats = [relu(bn1(conv1(x))), layer1_pre, layer2_pre, layer3_pre]
where ``layerK_pre`` is the last block's ``bn2(conv2(.)) + shortcut`` before its ReLU. As in RepDistiller the
stem entry is the post-ReLU tensor in both lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, ZooModel, register_model, run_stage

__all__ = ["BasicBlock", "CifarResNet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn (+ shortcut) -> relu. ``forward`` returns ``(out, preact)``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact


class CifarResNet(ZooModel):
    """RepDistiller's CIFAR ``ResNet(depth, num_filters, 'basicblock')``."""

    def __init__(self, depth: int, num_filters: list[int] | tuple[int, ...], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"BasicBlock CIFAR ResNet depth must be 6n+2, got {depth}")
        if len(num_filters) != 4:
            raise ValueError(f"num_filters must have 4 entries (stem + 3 stages), got {num_filters}")
        n = (depth - 2) // 6
        block = BasicBlock
        self.depth = depth
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        self.stage_channels = (num_filters[0],) + tuple(f * block.expansion for f in num_filters[1:])
        self.pooled_dim = num_filters[3] * block.expansion
        self.num_classes = num_classes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN layers whose outputs (plus shortcut) give ``preact_feats[1:]`` (RepDistiller / OFD)."""
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        f0 = x
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        pooled = self.avgpool(f3).flatten(1)
        logits = self.fc(pooled)
        return ModelOutput(logits, [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre], pooled)


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _SMALL, num_classes=num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _SMALL, num_classes=num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _SMALL, num_classes=num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _SMALL, num_classes=num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _SMALL, num_classes=num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _SMALL, num_classes=num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _SMALL, num_classes=num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _X4, num_classes=num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _X4, num_classes=num_classes)
