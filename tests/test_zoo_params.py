"""Parameter counts of the zoo against the RepDistiller architectures, counted layer by layer in this file.

The arithmetic below is written from the architectures as RepDistiller defines them (``models/resnet.py``,
``wrn.py``, ``vgg.py``, ``mobilenetv2.py``, ``ShuffleNetv1.py``): channels, kernel sizes, groups, which convs
carry a bias, one weight and one bias per BatchNorm channel, the classifier. It never looks at our modules, so a
changed width, a missing shortcut or an extra BN shows up as a different count; the totals must also round to
the sizes published in methods.md §0. Where the stage structure allows it, each stage is checked on its own.
"""

from __future__ import annotations

import pytest
import torch

from ckd_study.models import create_model

NUM_CLASSES = 100


def conv(cin: int, cout: int, k: int, groups: int = 1, bias: bool = False) -> int:
    return (cin // groups) * cout * k * k + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers)


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# CIFAR ResNet (BasicBlock, depth 6n + 2, widths [stem, stage1, stage2, stage3])
# ---------------------------------------------------------------------------------------------------------
def resnet_stages(depth: int, widths: tuple[int, int, int, int]) -> dict[str, int]:
    n = (depth - 2) // 6
    parts = {"stem": conv(3, widths[0], 3) + bn(widths[0])}
    inplanes = widths[0]
    for s, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
        total = 0
        for i in range(n):
            cin = inplanes if i == 0 else planes
            total += conv(cin, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if i == 0 and (stride != 1 or cin != planes):  # 1x1 projection shortcut + BN
                total += conv(cin, planes, 1) + bn(planes)
        parts[f"layer{s}"] = total
        inplanes = planes
    parts["fc"] = linear(widths[3], NUM_CLASSES)
    return parts


# ---------------------------------------------------------------------------------------------------------
# Wide ResNet (pre-activation blocks, depth 6n + 4, widths [16, 16k, 32k, 64k])
# ---------------------------------------------------------------------------------------------------------
def wrn_stages(depth: int, k: int) -> dict[str, int]:
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    parts = {"conv1": conv(3, 16, 3)}
    for s in range(1, 4):
        cin0, cout = widths[s - 1], widths[s]
        total = 0
        for i in range(n):
            cin = cin0 if i == 0 else cout
            total += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if cin != cout:  # 1x1 shortcut, no BN of its own
                total += conv(cin, cout, 1)
        parts[f"block{s}"] = total
    parts["bn1"] = bn(widths[3])
    parts["fc"] = linear(widths[3], NUM_CLASSES)
    return parts


# ---------------------------------------------------------------------------------------------------------
# VGG with BN (configuration 'S' for vgg8: one conv per block; convs have biases), 512 -> classes
# ---------------------------------------------------------------------------------------------------------
def vgg_total(blocks: list[list[int]]) -> int:
    total, cin = 0, 3
    for block in blocks:
        for cout in block:
            total += conv(cin, cout, 3, bias=True) + bn(cout)
            cin = cout
    return total + linear(512, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# MobileNetV2 (expansion T, width multiplier w; RepDistiller's mobile_half: T=6, w=0.5)
# ---------------------------------------------------------------------------------------------------------
def mobilenetv2_total(t: int = 6, width: float = 0.5) -> int:
    settings = [(1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2),
                (t, 320, 1, 1)]
    cin = int(32 * width)
    total = conv(3, cin, 3) + bn(cin)
    for expand, c, repeats, _ in settings:
        cout = int(c * width)
        for _ in range(repeats):
            hidden = cin * expand
            total += conv(cin, hidden, 1) + bn(hidden)                        # pointwise expansion
            total += conv(hidden, hidden, 3, groups=hidden) + bn(hidden)      # depthwise
            total += conv(hidden, cout, 1) + bn(cout)                         # pointwise projection
            cin = cout
    last = 1280  # int(1280 * width) only for width > 1
    return total + conv(cin, last, 1) + bn(last) + linear(last, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# ShuffleNetV1 (groups 3, out planes [240, 480, 960], blocks [4, 8, 4]; the first block of a stage concatenates
# an average-pooled shortcut, so its branch outputs out - in channels)
# ---------------------------------------------------------------------------------------------------------
def shufflev1_total(out_planes=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3) -> int:
    total = conv(3, 24, 1) + bn(24)
    cin = 24
    for out, n in zip(out_planes, blocks):
        for i in range(n):
            branch = out - cin if i == 0 else out
            mid = branch // 4
            g1 = 1 if cin == 24 else groups  # the very first 1x1 conv is not grouped
            total += conv(cin, mid, 1, groups=g1) + bn(mid)
            total += conv(mid, mid, 3, groups=mid) + bn(mid)
            total += conv(mid, branch, 1, groups=groups) + bn(branch)
            cin = out
    return total + linear(out_planes[-1], NUM_CLASSES)


# name -> (total from the arithmetic, per-part counts or None, published size in M from methods.md §0)
ZOO = {
    "resnet56": (resnet_stages(56, (16, 16, 32, 64)), 0.86),
    "resnet8x4": (resnet_stages(8, (32, 64, 128, 256)), 1.23),
    "resnet32x4": (resnet_stages(32, (32, 64, 128, 256)), 7.43),
    "resnet20": (resnet_stages(20, (16, 16, 32, 64)), 0.28),
    "wrn_40_2": (wrn_stages(40, 2), 2.26),
    "wrn_16_2": (wrn_stages(16, 2), 0.70),
    "wrn_40_1": (wrn_stages(40, 1), 0.57),
    "vgg8": ({"total": vgg_total([[64], [128], [256], [512], [512]])}, 3.97),
    "vgg13": ({"total": vgg_total([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]])}, 9.46),
    "MobileNetV2": ({"total": mobilenetv2_total()}, 0.81),
    "ShuffleV1": ({"total": shufflev1_total()}, 0.95),
}


def test_arithmetic_by_hand_for_two_models():
    """The two counts the rest rests on, spelled out: resnet56 and wrn_40_2 for 100 classes."""
    # resnet56: stem 3·16·9 + 32; stage 1: 9 blocks of 2·(16·16·9 + 32); stage 2: first block 16→32 with a
    # 1x1 projection (16·32 + 64), then 8 blocks 32→32; stage 3 likewise 32→64; fc 64·100 + 100.
    stage1 = 9 * 2 * (16 * 16 * 9 + 32)
    stage2 = (16 * 32 * 9 + 64) + (32 * 32 * 9 + 64) + (16 * 32 + 64) + 8 * 2 * (32 * 32 * 9 + 64)
    stage3 = (32 * 64 * 9 + 128) + (64 * 64 * 9 + 128) + (32 * 64 + 128) + 8 * 2 * (64 * 64 * 9 + 128)
    resnet56 = (3 * 16 * 9 + 32) + stage1 + stage2 + stage3 + (64 * 100 + 100)
    assert resnet56 == 861_620 == sum(ZOO["resnet56"][0].values())
    # wrn_40_2: 6 blocks per stage, widths 16→32→64→128; block = bn(in) + 3x3(in→out) + bn(out) + 3x3(out→out)
    # (+ 1x1 in→out shortcut where in != out); then bn(128) and fc 128·100 + 100.
    def block(cin, cout):
        return 2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9 + (cin * cout if cin != cout else 0)

    wrn_40_2 = (3 * 16 * 9) + sum(block(a, b) + 5 * block(b, b) for a, b in ((16, 32), (32, 64), (64, 128)))
    wrn_40_2 += 2 * 128 + 128 * 100 + 100
    assert wrn_40_2 == 2_255_156 == sum(ZOO["wrn_40_2"][0].values())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_parameter_count_equals_the_architecture_arithmetic(name):
    parts, published = ZOO[name]
    parts = dict(parts)
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES)
    expected = sum(parts.values())
    assert count(model) == expected, (name, count(model), expected)
    assert round(expected / 1e6, 2) == published, (name, expected)  # methods.md §0, two decimals
    if "total" not in parts:  # per stage: the modules carry RepDistiller's names
        children = dict(model.named_children())
        stem = parts.pop("stem", None)
        if stem is not None:
            assert count(children["conv1"]) + count(children["bn1"]) == stem, name
        for part, value in parts.items():
            assert count(children[part]) == value, (name, part)
