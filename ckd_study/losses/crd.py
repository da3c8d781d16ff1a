"""§1 CRD's NCE loss on the scores of :class:`~ckd_study.losses.crd_memory.CRDMemory` (methods.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _check_tensor, _to_compute

__all__ = ["CRD_NEGATIVES", "crd_loss", "crd_nce_loss"]

CRD_NEGATIVES = ("exact", "uniform")


def crd_nce_loss(out: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    r"""RepDistiller's ``ContrastLoss`` (NCE) on the (B, K+1) scores of :class:`CRDMemory` (methods.md §1).

    With ``Pn = 1/n_data`` (uniform noise), ``x_0`` the positive and ``x_k`` (k=1..K) the negatives:

    .. math:: P_{pos} = \frac{x_0}{x_0 + K P_n + \epsilon},\quad
              P_{neg} = \frac{K P_n}{x_k + K P_n + \epsilon},\quad
              L = -\frac1B\Big(\sum_i \log P_{pos,i} + \sum_{i,k} \log P_{neg,i,k}\Big)
    """
    _check_tensor("out", out)
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(f"out must have shape (B, K+1) with K >= 1, got {tuple(out.shape)}")
    if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
        raise ValueError(f"n_data must be a positive integer, got {n_data!r}")
    x = _to_compute(out)
    bsz, m = x.shape[0], x.shape[1] - 1
    noise = m * (1.0 / float(n_data))
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / bsz


def crd_loss(out_student: Tensor, out_teacher: Tensor, n_data: int) -> Tensor:
    """CRD loss (methods.md §1): ``crd_nce_loss(out_student) + crd_nce_loss(out_teacher)``, as in RepDistiller's
    ``CRDLoss`` (its weight 0.8 is applied by the caller)."""
    return crd_nce_loss(out_student, n_data) + crd_nce_loss(out_teacher, n_data)
