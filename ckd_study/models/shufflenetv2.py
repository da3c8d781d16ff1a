"""ShuffleNetV2 for CIFAR as in RepDistiller's ``models/ShuffleNetv2.py`` (``ShuffleV2`` = net_size 1:
stage widths (116, 232, 464), 1024-channel last 1x1 conv, blocks (3, 7, 3) after each down-sampling unit,
1x1 stride-1 stem to 24 channels, no max-pool). Module names follow RepDistiller (``layerK.i.convJ``, ``conv2``,
``bn2``, ``linear``); ``classifier`` aliases ``linear``.

Features: feats = [relu(bn1(conv1(x))), layer1, layer2, layer3] (each stage's output, after the final unit's
channel shuffle); preact_feats = [stem, pre1, pre2, pre3] where ``preK`` is RepDistiller's: the last unit's
``cat([x1, bn3(conv3(.))])`` before the ReLU *and before the channel shuffle*, so its channel order differs
from ``feats`` (``feats[k] == shuffle(relu(preact_feats[k]))``). The stem entry is post-ReLU in both lists.
``pooled`` is ``avgpool(relu(bn2(conv2(layer3))))`` (1024-d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelOutput, ZooModel, register_model, run_stage

__all__ = ["ShuffleBlock", "BasicBlock", "DownBlock", "ShuffleNetV2", "CONFIGS"]

CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleBlock(nn.Module):
    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.groups
        return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class BasicBlock(nn.Module):
    """Split channels in half; transform the second half (1x1 - dw 3x3 - 1x1); concat; shuffle.

    Returns ``(out, preact)`` with ``preact`` = the concat before the ReLU and before the shuffle (RepDistiller).
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        preact = torch.cat([x1, pre], 1)
        out = self.shuffle(torch.cat([x1, F.relu(pre)], 1))
        return out, preact


class DownBlock(nn.Module):
    """Stride-2 unit: left (dw 3x3 s2 - 1x1) and right (1x1 - dw 3x3 s2 - 1x1) branches, concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        out = self.shuffle(torch.cat([left, right], 1))
        return out, out  # no pre-activation tensor of its own (only used if a stage had zero BasicBlocks)


class ShuffleNetV2(ZooModel):
    def __init__(self, net_size: float = 1, num_classes: int = 100) -> None:
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

        self.stage_channels = (24, *out_channels[:3])
        self.pooled_dim = out_channels[3]
        self.num_classes = num_classes

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    @property
    def classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        out = F.relu(self.bn2(self.conv2(f3)))
        pooled = F.avg_pool2d(out, 4).flatten(1)
        logits = self.linear(pooled)
        return ModelOutput(logits, [f0, f1, f2, f3], [f0, f1_pre, f2_pre, f3_pre], pooled)


@register_model("ShuffleV2")
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # noqa: N802 - RepDistiller's name
    return ShuffleNetV2(net_size=1, num_classes=num_classes)
