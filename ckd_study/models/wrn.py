"""Wide ResNets (Zagoruyko & Komodakis 2016, pre-activation blocks) as in RepDistiller's ``models/wrn.py``.

``wrn_D_K``: depth D = 6n+4, widen factor K, widths [16, 16K, 32K, 64K], dropout 0. Module names follow
RepDistiller (``blockK.layer.i.convShortcut``, final ``bn1``, ``fc``) so its checkpoints load.

Features. The network is pre-activation, so a block's output is a raw residual sum:
    feats        = [conv1(x), block1, block2, relu(bn1(block3))]
    preact_feats = [conv1(x), block2.layer[0].bn1(block1), block3.layer[0].bn1(block2), bn1(block3)]
``preact_feats`` are RepDistiller's ``preact=True`` features (each stage output after the BN that opens the
next stage, before its ReLU). The last ``feats`` entry is taken after the final BN+ReLU (the tensor that is
pooled), so ``feats[-1] == relu(preact_feats[-1])``; RepDistiller's ``is_feat`` list uses the raw block3 sum
there instead. The BN that produces a preact feature is applied once per forward and its output reused inside
the next stage, so BN running statistics are updated exactly as in a plain forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, ZooModel, register_model

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet"]


class BasicBlock(nn.Module):
    """bn-relu-conv3x3-bn-relu-(dropout)-conv3x3 + shortcut (1x1 conv on the activated input if shapes change)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes  # noqa: N815 - RepDistiller's name
        self.convShortcut = (  # noqa: N815 - RepDistiller's name (state-dict key)
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor, bn_x: torch.Tensor | None = None) -> torch.Tensor:
        """``bn_x``: ``self.bn1(x)`` when the caller has already computed it (to expose it as a feature)."""
        if bn_x is None:
            bn_x = self.bn1(x)
        act = F.relu(bn_x)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor, bn_x: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.layer):
            x = block(x, bn_x if i == 0 else None)
        return x


class WideResNet(ZooModel):
    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]  # noqa: N815 - RepDistiller's name

        self.stage_channels = tuple(channels)
        self.pooled_dim = channels[3]
        self.num_classes = num_classes

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f1_pre = self.block2.layer[0].bn1(f1)
        f2 = self.block2(f1, f1_pre)
        f2_pre = self.block3.layer[0].bn1(f2)
        f3 = self.block3(f2, f2_pre)
        f3_pre = self.bn1(f3)
        f3_act = F.relu(f3_pre)
        pooled = F.avg_pool2d(f3_act, 8).flatten(1)
        logits = self.fc(pooled)
        return ModelOutput(logits, [f0, f1, f2, f3_act], [f0, f1_pre, f2_pre, f3_pre], pooled)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(depth=16, widen_factor=1, num_classes=num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(depth=16, widen_factor=2, num_classes=num_classes)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(depth=40, widen_factor=1, num_classes=num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(depth=40, widen_factor=2, num_classes=num_classes)
