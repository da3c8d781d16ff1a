"""The model interface shared by every network in the zoo.

Every model's ``forward(x)`` returns a :class:`ModelOutput`. A NamedTuple (not a dataclass) so that it
travels through ``torch.compile`` and ``torch.jit`` unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn


class ModelOutput(NamedTuple):
    """What every model returns.

    logits:       (B, num_classes)
    feats:        per-stage outputs after their activation, stem first: [stem, stage1, ..., stageK] (B, C_k, H_k, W_k)
    preact_feats: the same stages before their final activation (equal to ``feats`` where a stage has none)
    pooled:       (B, pooled_dim) penultimate vector that the classifier reads
    """

    logits: torch.Tensor
    feats: list[torch.Tensor]
    preact_feats: list[torch.Tensor]
    pooled: torch.Tensor


class ZooModel(nn.Module):
    """Base class: subclasses set ``stage_channels`` (channels of each entry of ``feats``), ``pooled_dim``
    and ``num_classes`` in ``__init__`` so that methods can size their heads without a forward pass."""

    stage_channels: tuple[int, ...]
    pooled_dim: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def run_stage(stage: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a stage of blocks that each return ``(output, pre_activation)``; the stage's output and the last
    block's pre-activation (``preact_feats``)."""
    preact = x
    for block in stage:
        x, preact = block(x)
    return x, preact


_REGISTRY: dict[str, Callable[..., ZooModel]] = {}


def init_fan_out_normal(model: nn.Module) -> None:
    """RepDistiller's initialisation of VGG and MobileNetV2, module by module in ``model.modules()`` order:
    convolutions N(0, sqrt(2 / fan_out)) with fan_out = k_h * k_w * out_channels and zero bias, batch norm
    weight 1 and bias 0, linear layers N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def register_model(name: str) -> Callable[[Callable[..., ZooModel]], Callable[..., ZooModel]]:
    def wrap(factory: Callable[..., ZooModel]) -> Callable[..., ZooModel]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def create_model(name: str, num_classes: int = 100) -> ZooModel:
    """Build a zoo model by name, e.g. ``create_model("resnet8x4", 100)``."""
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; valid names: {', '.join(available_models())}"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _REGISTRY[name](num_classes=num_classes)
