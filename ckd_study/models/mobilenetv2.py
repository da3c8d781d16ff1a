"""MobileNetV2 for CIFAR as in RepDistiller's ``models/mobilenetv2.py`` (``mobile_half``: expansion T=6,
width multiplier 0.5, stride-2 stem, last 1x1 conv to 1280 channels, 2x2 average pool).

Registered as ``MobileNetV2``. Module names (``conv1``, ``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``)
follow RepDistiller's and mdistiller's ``models/.../mobilenetv2.py``, so their checkpoints load with
``load_state_dict(strict=True)``: as there, the classifier is an ``nn.Linear`` wrapped in a one-element
``nn.Sequential`` (``model.classifier[0]`` is the linear layer; its keys are ``classifier.0.weight/bias``).
State dicts saved before this module matched those keys (``classifier.weight/bias``) still load: a
load-state-dict pre-hook renames them.

Features (RepDistiller's ``is_feat`` list; the blocks end in a linear bottleneck, so there is no
pre-activation variant and ``preact_feats`` is ``feats``):
    [stem (16ch, 16x16), blocks[1] (12ch, 16x16), blocks[2] (16ch, 8x8), blocks[4] (48ch, 4x4), blocks[6] (160ch, 2x2)]
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ModelOutput, ZooModel, init_fan_out_normal, register_model

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """pw expand (always present, also for t=1) - dw 3x3 - pw linear; residual when stride 1 and inp == oup."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def _rename_legacy_classifier_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: ``classifier.weight/bias`` (this study's keys before they followed
    RepDistiller) become ``classifier.0.weight/bias``."""
    for name in ("weight", "bias"):
        old = f"{prefix}classifier.{name}"
        if old in state_dict:
            state_dict[f"{prefix}classifier.0.{name}"] = state_dict.pop(old)


class MobileNetV2(ZooModel):
    def __init__(self, T: int = 6, num_classes: int = 100, width_mult: float = 0.5, input_size: int = 32) -> None:  # noqa: N803
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        # t (expansion), c (channels before width_mult), n (repeats), s (first stride)
        setting = [
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        stem_channels = input_channel
        self.blocks = nn.ModuleList()
        block_out: list[int] = []
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            block_out.append(output_channel)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.register_load_state_dict_pre_hook(_rename_legacy_classifier_keys)

        self.stage_channels = (stem_channels, block_out[1], block_out[2], block_out[4], block_out[6])
        self.pooled_dim = self.last_channel
        self.num_classes = num_classes

        init_fan_out_normal(self)

    def get_bn_before_relu(self) -> list[nn.Module]:
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f0 = self.conv1(x)
        out = self.blocks[0](f0)
        f1 = self.blocks[1](out)
        f2 = self.blocks[2](f1)
        out = self.blocks[3](f2)
        f3 = self.blocks[4](out)
        out = self.blocks[5](f3)
        f4 = self.blocks[6](out)
        pooled = self.avgpool(self.conv2(f4)).flatten(1)
        logits = self.classifier(pooled)
        feats = [f0, f1, f2, f3, f4]
        return ModelOutput(logits, feats, list(feats), pooled)


@register_model("MobileNetV2")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=0.5)
