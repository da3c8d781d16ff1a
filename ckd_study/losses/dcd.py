"""§4 DCD: discriminative and consistent representation distillation (methods.md §4)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _check_nonnegative, _check_positive, _check_tensor, _compute_dtype, _diagonal_ce, _is_real, _kl_rows, _l2_normalize,
    _to_compute,
)

__all__ = ["DCDLoss", "dcd_loss"]

class DCDLoss(NamedTuple):
    """``total = contrastive + consistency``; ``consistency`` already includes ``consistency_weight``."""

    total: Tensor
    contrastive: Tensor
    consistency: Tensor


# --------------------------------------------------------------------------------------------------------------
# §4 DCD
# --------------------------------------------------------------------------------------------------------------


def dcd_loss(
    student_embed: Tensor,
    teacher_embed: Tensor,
    log_inv_temperature: Optional[Tensor],
    bias: Union[Tensor, float],
    fixed_temperature: Optional[float] = None,
    max_inv_temperature: float = 10.0,
    consistency_weight: float = 0.5,
) -> DCDLoss:
    r"""Discriminative and consistent distillation, DCD (methods.md §4; arXiv 2407.11802).

    Inputs are the projected pooled features (outputs of the trainable linear heads), shape (B, D); they are
    L2-normalised here: ``u_i = norm(student_embed_i)``, ``v_i = norm(teacher_embed_i)``.

    .. math::
        \kappa = \min(\exp\theta, \kappa_{max}),\quad L_{ij} = \kappa\, u_i\cdot v_j + b \\
        L_{con} = \mathrm{mean}_i\,[-\log \mathrm{softmax}_j(L_{ij})[i]]
                  \quad\text{(student anchors, teacher candidates)} \\
        L_{cons} = w_{cons}\cdot\frac1B\sum_i KL(Q_i \| P_i),\ P = \mathrm{rowsoftmax}(L),\
                   Q = \mathrm{rowsoftmax}(L^T)\ \text{(Q not detached)}

    ``total = contrastive + consistency`` (``consistency`` already includes ``consistency_weight``).
    Defaults: ``max_inv_temperature=10`` (kappa_max), ``consistency_weight=0.5``; theta is initialised to 1
    and b to 0 by the owner of the parameters.

    * ``log_inv_temperature`` (theta): 0-dim tensor parameter; ``kappa = torch.clamp(theta.exp(), max=10)``.
    * ``bias`` (b): kept for fidelity with the released code, **but a constant added to every entry of L cannot
      change either softmax (P or Q), so b receives exactly zero gradient** (up to rounding) and is never
      learned; a test proves it. The learnable-vs-fixed temperature ablation therefore isolates kappa.
    * ``fixed_temperature=tau``: replaces kappa by ``1/tau`` (the cosine is *divided* by tau). The released code
      multiplied by 0.07 instead of dividing; ours divides. theta is then unused (may be None).
    * The teacher embedding is **not** detached: the teacher's head is trainable with the student. The caller
      detaches the teacher's backbone features *before* its head, so the frozen teacher gets no gradient.
    """
    _check_tensor("student_embed", student_embed)
    _check_tensor("teacher_embed", teacher_embed)
    if student_embed.dim() != 2:
        raise ValueError(f"student_embed must have shape (B, D), got shape {tuple(student_embed.shape)}")
    if teacher_embed.shape != student_embed.shape:
        raise ValueError("student_embed and teacher_embed must have the same shape (B, D); got "
                         f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}")
    kmax = _check_positive("max_inv_temperature", max_inv_temperature)
    wcons = _check_nonnegative("consistency_weight", consistency_weight)
    u, v = _compute_dtype(student_embed, teacher_embed)
    u = _l2_normalize(u, dim=1)
    v = _l2_normalize(v, dim=1)

    if fixed_temperature is not None:
        kappa = u.new_tensor(1.0 / _check_positive("fixed_temperature", fixed_temperature))
    else:
        if not isinstance(log_inv_temperature, Tensor) or log_inv_temperature.numel() != 1:
            raise ValueError("log_inv_temperature must be a 1-element tensor (theta) unless fixed_temperature "
                             f"is given, got {log_inv_temperature!r}")
        theta = _to_compute(log_inv_temperature).reshape(()).to(u.dtype)
        kappa = torch.clamp(theta.exp(), max=kmax)
    if isinstance(bias, Tensor):
        if bias.numel() != 1:
            raise ValueError(f"bias must be a scalar (float or 1-element tensor), got shape {tuple(bias.shape)}")
        b = _to_compute(bias).reshape(()).to(u.dtype)
    elif _is_real(bias):
        b = u.new_tensor(float(bias))
    else:
        raise ValueError(f"bias must be a float or a 1-element tensor, got {bias!r}")

    logits = kappa * (u @ v.T) + b
    contrastive = _diagonal_ce(logits)
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(logits.T, dim=1)
    consistency = wcons * _kl_rows(log_q, log_p).mean()
    return DCDLoss(contrastive + consistency, contrastive, consistency)
