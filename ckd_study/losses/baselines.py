"""§1 baselines: KD, DKD and logit standardisation (methods.md §1)."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _check_labels, _check_logit_pair, _check_nonnegative, _check_positive, _check_tensor, _compute_dtype, _is_real,
    _kl_rows, _to_compute,
)

__all__ = ["DKDLoss", "dkd_loss", "kd_loss", "standardize_logits"]

class DKDLoss(NamedTuple):
    """``total = tckd + nckd``; ``tckd = alpha*TCKD*tau^2`` and ``nckd = beta*NCKD*tau^2`` (already weighted)."""

    total: Tensor
    tckd: Tensor
    nckd: Tensor


# --------------------------------------------------------------------------------------------------------------
# §1 Baselines: KD, DKD, logit standardisation
# --------------------------------------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Hinton's knowledge distillation (methods.md §1, "KD").

    .. math:: L_{KD} = \frac{\tau^2}{B}\sum_i KL\big(\mathrm{softmax}(t_i/\tau)\,\|\,\mathrm{softmax}(s_i/\tau)\big)

    Sum over classes, mean over the batch, scaled by tau^2 (so gradient magnitudes do not shrink with tau).
    Default ``temperature=4.0`` (the study's KD setting; the training total is ``0.1*CE + 0.9*KD``, applied by
    the caller). For KD+LS pass :func:`standardize_logits` outputs and ``temperature=2.0``.

    Args:
        student_logits: (B, C). teacher_logits: (B, C), detached inside.
    Returns:
        0-dim float32 tensor (float64 for float64 inputs). It is exactly 0 when student == teacher.
    """
    _check_logit_pair(student_logits, teacher_logits)
    tau = _check_positive("temperature", temperature)
    s, t = _compute_dtype(student_logits, teacher_logits.detach())
    log_ps = F.log_softmax(s / tau, dim=1)
    log_pt = F.log_softmax(t / tau, dim=1)
    return _kl_rows(log_pt, log_ps).mean() * tau**2


def _as_sample_weight(name: str, value, batch: int, like: Tensor) -> Tensor:
    """A float, a 0-dim tensor, or a per-sample tensor of shape (B,) -> tensor broadcastable against (B,)."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape == (batch,):
            return _to_compute(value).to(like.dtype)
        raise ValueError(f"{name} must be a float or a tensor of shape () or (B,) = ({batch},), "
                         f"got shape {tuple(value.shape)}")
    if not _is_real(value):
        raise ValueError(f"{name} must be a finite float or a tensor of shape (B,), got {value!r}")
    return like.new_tensor(float(value))


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: Union[float, Tensor] = 1.0,
    beta: Union[float, Tensor] = 8.0,
    temperature: float = 4.0,
) -> DKDLoss:
    r"""Decoupled knowledge distillation (methods.md §1, "DKD").

    With p = softmax(t/tau), q = softmax(s/tau) and y the label:

    * TCKD (target-class KD): binary KL between the teacher's ``[p_y, 1 - p_y]`` and the student's
      ``[q_y, 1 - q_y]``.
    * NCKD (non-target KD): KL between teacher and student distributions over the non-target classes, i.e. the
      softmax of the logits with the target class removed (``p_c / (1 - p_y)`` for c != y).

    ``tckd = alpha * tau^2 * mean_i TCKD_i``, ``nckd = tau^2 * mean_i beta_i * NCKD_i``,
    ``total = tckd + nckd`` (the parts are already weighted). Defaults: alpha=1, beta=8, tau=4 (DKD's
    CIFAR defaults; beta is 2 or 6 for some pairs, see methods.md §1). The training loss
    ``CE + warm * total`` with ``warm = min(epoch/20, 1)`` is assembled by the caller.

    Exact and numerically stable: the non-target log-softmax is computed on the (B, C-1) tensor of non-target
    logits (the target column is removed, not pushed to -1000), and ``log(1 - p_y)`` is
    ``logsumexp(non-target) - logsumexp(all)``.

    Identity (tested): with alpha=1 and the per-sample ``beta_i = 1 - p_y(teacher at tau)``,
    ``total == kd_loss(s, t, tau)`` because ``KL = TCKD + (1 - p_y) * NCKD``.

    Args:
        labels: integer (B,). alpha, beta: floats or per-sample tensors of shape (B,).
    """
    b, c = _check_logit_pair(student_logits, teacher_logits, min_classes=2)
    y = _check_labels(labels, b, c)
    tau = _check_positive("temperature", temperature)
    s, t = _compute_dtype(student_logits, teacher_logits.detach())
    a_w = _as_sample_weight("alpha", alpha, b, s)
    b_w = _as_sample_weight("beta", beta, b, s)

    gt = F.one_hot(y, c).bool()

    def parts(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z / tau
        lse_all = torch.logsumexp(z, dim=1)
        non_target = z[~gt].view(b, c - 1)  # row order is preserved; each row keeps its C-1 non-target logits
        lse_nt = torch.logsumexp(non_target, dim=1)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        log_binary = torch.stack([z_y - lse_all, lse_nt - lse_all], dim=1)  # log [p_y, 1 - p_y]
        log_nt = non_target - lse_nt[:, None]  # log-softmax over the non-target classes
        return log_binary, log_nt

    t_bin, t_nt = parts(t)
    s_bin, s_nt = parts(s)
    tckd = (a_w * _kl_rows(t_bin, s_bin)).mean() * tau**2
    nckd = (b_w * _kl_rows(t_nt, s_nt)).mean() * tau**2
    return DKDLoss(tckd + nckd, tckd, nckd)


def standardize_logits(logits: Tensor, eps: float = 1e-7, unbiased: bool = True) -> Tensor:
    r"""Logit standardisation (methods.md §1, "LS"): z-score over the class dimension (the last one).

    .. math:: z(x) = \frac{x - \mathrm{mean}(x)}{\epsilon + \mathrm{std}(x)},\qquad
              \mathrm{std}(x) = \sqrt{\tfrac{1}{C - 1}\textstyle\sum_c (x_c - \mathrm{mean}(x))^2}

    Default ``unbiased=True``: the sample (Bessel-corrected, C - 1) std, which is what the released code
    computes (sunshangquan/logit-standardization-KD, ``normalize()`` in ``mdistiller/distillers/KD.py`` and
    ``DKD.py``: torch's default ``std()``) and therefore what its KD+LS / DKD+LS numbers were trained with;
    ``eps=1e-7`` is added to the std, as there.

    ``unbiased=False`` uses the population std (divide by C), i.e. rows of unit variance. It exists to
    reproduce this study's KD+LS / DKD+LS runs made before the default followed the released code, and for
    comparison with z-scores computed elsewhere with numpy's default ``ddof=0``. The two differ by a constant
    factor: ``z_population = z_unbiased * sqrt(C / (C - 1))`` (up to ``eps``), i.e. the same as a base
    temperature ``sqrt((C - 1) / C)`` times smaller (0.995x for C=100).

    Invariant to adding a constant and to multiplying by a positive scalar (up to ``eps``), so e.g.
    ``kd_loss(standardize_logits(s), standardize_logits(t), 2.0)`` (KD+LS: base temperature 2, KD weight 9
    applied by the caller) does not see the logit scale. Returned in float32 (float64 for float64 input).
    """
    _check_tensor("logits", logits)
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension, got a 0-dim tensor")
    _check_nonnegative("eps", eps)
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased must be a bool, got {unbiased!r}")
    if unbiased and logits.shape[-1] < 2:
        raise ValueError("the unbiased std needs at least 2 classes; pass unbiased=False for a single class")
    x = _to_compute(logits)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
    return (x - mean) / (std + eps)
