"""The conventional knowledge-distillation training loop: the baseline of ``bench_training.py``.

Written the way the published KD codebases (RepDistiller's ``train_distill``, mdistiller) train, so that the
benchmark compares our engine with what people actually run:

- data: torchvision's own ``CIFAR100`` dataset class (its ``__getitem__``: ``Image.fromarray`` and PIL
  transforms ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean,
  std)``) behind a ``DataLoader(shuffle=True, drop_last=True, num_workers=...)`` with worker processes;
- float32 eager execution in the default (NCHW) memory format, no autocast, no compilation;
- every step: student forward, teacher forward under ``torch.no_grad()``, CE + lambda * CKD
  (``ckd_study.losses.ckd_loss``), ``zero_grad`` / ``backward`` / ``SGD.step``, and the per-step bookkeeping of
  RepDistiller (``loss.item()`` and the batch's top-1 accuracy into running averages).

The networks are the same zoo models our engine trains (``ckd_study.models``, the RepDistiller definitions),
so both loops do the same arithmetic per image; only the data pipeline, the execution mode and the teacher
source differ.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR100
from torchvision.datasets.vision import VisionDataset

from ckd_study.losses import ckd_loss

__all__ = ["InMemoryCIFAR100", "cifar_train_transform", "make_train_loader", "ReferenceDistiller", "train_distill"]


def cifar_train_transform(mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The standard CIFAR training transform of RepDistiller / mdistiller (PIL based)."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
    ])


class InMemoryCIFAR100(CIFAR100):
    """torchvision's ``CIFAR100`` over images already in memory.

    Only the constructor is replaced: torchvision's reads the python pickles of ``cifar-100-python/`` after a
    download/md5 check, but offline only the npz shards exist. The instance then holds exactly what
    torchvision's constructor would leave (``data`` uint8 (N, 32, 32, 3) HWC, ``targets`` a list of ints,
    ``classes``, ``transform``...), so ``__getitem__`` and ``__len__`` are torchvision's own, unchanged.
    """

    def __init__(self, data_hwc: np.ndarray, targets: Iterable[int], classes: Sequence[str],
                 transform: Callable | None, root: str = ".") -> None:
        VisionDataset.__init__(self, root, transform=transform, target_transform=None)
        data_hwc = np.ascontiguousarray(data_hwc, dtype=np.uint8)
        if data_hwc.ndim != 4 or data_hwc.shape[3] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {data_hwc.shape}")
        self.train = True
        self.data = data_hwc
        self.targets = [int(t) for t in targets]
        if len(self.targets) != len(self.data):
            raise ValueError(f"{len(self.data)} images but {len(self.targets)} targets")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def make_train_loader(dataset, batch_size: int, workers: int, device: torch.device,
                      seed: int | None = None) -> DataLoader:
    """The conventional training loader: shuffled, last partial batch dropped, ``workers`` processes,
    pinned host memory only when the batches go to a GPU."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                      pin_memory=device.type == "cuda", generator=generator)


class ReferenceDistiller:
    """One RepDistiller-style distillation step for CKD: ``ce_weight * CE + weight * L_CKD(tau)``.

    ``ckd_options`` are the remaining keyword options of ``ckd_loss`` (anchor, negatives, terms); the
    defaults are the released code's. The teacher is frozen in eval mode; the student trains with SGD
    (momentum, weight decay) like the recipe (lr 0.05, momentum 0.9, weight decay 5e-4).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, device: torch.device | str = "cpu",
                 weight: float = 100.0, temperature: float = 1.0, ce_weight: float = 1.0,
                 ckd_options: dict | None = None, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        self.device = torch.device(device)
        self.student = student.to(self.device).train()
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.ckd_options = dict(ckd_options or {})
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.loss_sum = 0.0
        self.top1_sum = 0.0
        self.seen = 0

    def loss(self, logit_s: torch.Tensor, logit_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss_cls = F.cross_entropy(logit_s, target)
        loss_ckd = ckd_loss(logit_s, logit_t, temperature=self.temperature, **self.ckd_options).total
        return self.ce_weight * loss_cls + self.weight * loss_ckd

    def step(self, images: torch.Tensor, target: torch.Tensor) -> float:
        """One optimisation step on a batch from the loader; returns the loss value (``loss.item()``)."""
        images = images.float().to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        logit_s = self.student(images).logits
        with torch.no_grad():
            logit_t = self.teacher(images).logits
        loss = self.loss(logit_s, logit_t, target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        # RepDistiller's AverageMeters: loss.item() and the batch accuracy every step
        value = loss.item()
        n = target.shape[0]
        self.loss_sum += value * n
        self.top1_sum += float((logit_s.detach().argmax(1) == target).float().sum())
        self.seen += n
        return value

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)


def train_distill(loader: DataLoader, distiller: ReferenceDistiller, max_steps: int | None = None,
                  on_step: Callable[[int, object], None] | None = None) -> int:
    """One epoch (or ``max_steps`` steps) of the conventional loop; ``on_step(step, iterator)`` runs after
    every step (1-based; the benchmark reads its clock there). Returns the number of steps done."""
    distiller.student.train()
    distiller.teacher.eval()
    steps = 0
    iterator = iter(loader)
    for images, target in iterator:
        distiller.step(images, target)
        steps += 1
        if on_step is not None:
            on_step(steps, iterator)
        if max_steps is not None and steps >= max_steps:
            break
    del iterator  # shuts the worker processes down (and reaps them) when the epoch was cut short
    return steps
