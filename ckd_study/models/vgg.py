"""CIFAR VGG with batch norm (no FC stack: global average pool + Linear(512, num_classes)), as RepDistiller's
``models/vgg.py`` ``vggN_bn``. Five conv blocks with max-pools between them; ``vgg8`` uses cfg 'S'.
Module names (``blockK.i``, ``classifier``) follow RepDistiller so its checkpoints load.

Features: feats = [relu(block0), relu(block1), ..., relu(block4)] (each block ends with a BN; the ReLU is
applied outside it); preact_feats = [relu(block0), block1, ..., block4] (stem entry post-ReLU, as in
RepDistiller). For 32x32 inputs the spatial sizes are 32, 16, 8, 4, 4 (``pool3`` only runs for 64x64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, ZooModel, init_fan_out_normal, register_model

__all__ = ["VGG", "CFG"]

CFG: dict[str, list[list[int]]] = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: list[int], in_channels: int, batch_norm: bool) -> nn.Sequential:
    """[conv3x3(bias) - (bn) - relu] * len(widths), minus the trailing ReLU (applied in ``forward``)."""
    layers: list[nn.Module] = []
    for v in widths:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100) -> None:
        super().__init__()
        self.block0 = _make_block(cfg[0], 3, batch_norm)
        self.block1 = _make_block(cfg[1], cfg[0][-1], batch_norm)
        self.block2 = _make_block(cfg[2], cfg[1][-1], batch_norm)
        self.block3 = _make_block(cfg[3], cfg[2][-1], batch_norm)
        self.block4 = _make_block(cfg[4], cfg[3][-1], batch_norm)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        self.stage_channels = tuple(widths[-1] for widths in cfg)
        self.pooled_dim = cfg[4][-1]
        self.num_classes = num_classes

        init_fan_out_normal(self)

    def get_bn_before_relu(self) -> list[nn.Module]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        x = self.pool3(f3) if h == 64 else f3
        f4_pre = self.block4(x)
        f4 = F.relu(f4_pre)
        pooled = self.pool4(f4).flatten(1)
        logits = self.classifier(pooled)
        return ModelOutput(logits, [f0, f1, f2, f3, f4], [f0, f1_pre, f2_pre, f3_pre, f4_pre], pooled)


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CFG["S"], batch_norm=True, num_classes=num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CFG["A"], batch_norm=True, num_classes=num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CFG["B"], batch_norm=True, num_classes=num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CFG["D"], batch_norm=True, num_classes=num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CFG["E"], batch_norm=True, num_classes=num_classes)
