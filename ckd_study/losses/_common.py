"""What every loss module shares: the compute dtype, argument validation and two numerics helpers."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

# Norm floor used by every L2 normalisation here (the same as ``F.normalize``'s default eps).
_NORM_EPS = 1e-12

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------------------------
# Helpers: dtype, validation
# --------------------------------------------------------------------------------------------------------------


def _to_compute(x: Tensor) -> Tensor:
    """Upcast bf16/fp16 to float32; leave float32 and float64 untouched (float64 keeps gradcheck exact)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _compute_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Apply :func:`_to_compute` to each tensor and promote them to one common float dtype.

    The result is float32 unless one input is float64 (then float64). Integer inputs are cast to float32.
    """
    out = []
    for x in tensors:
        x = _to_compute(x)
        if not x.is_floating_point():
            x = x.float()
        out.append(x)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in out) else torch.float32
    return tuple(x.to(dtype) for x in out)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_positive(name: str, value) -> float:
    if not _is_real(value) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_nonnegative(name: str, value) -> float:
    if not _is_real(value) or float(value) < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(repr(c) for c in choices)}")
    return value


def _check_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor, min_classes: int = 1) -> tuple[int, int]:
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape (B, C), got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape (B, C); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, c = student_logits.shape
    if b < 1:
        raise ValueError(f"student_logits must hold at least one sample, got shape {tuple(student_logits.shape)}")
    if c < min_classes:
        raise ValueError(f"this loss needs at least {min_classes} classes, got C={c}")
    return b, c


def _check_labels(labels, batch: int, num_classes: int) -> Tensor:
    """labels: integer tensor of shape (B,) with values in [0, C).

    The value range is checked for CPU tensors only (checking it on an accelerator would force a host sync on
    every call; an out-of-range label there fails inside ``gather``/``one_hot`` instead).
    """
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be an integer torch.Tensor of shape ({batch},), got {type(labels).__name__}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape (B,) = ({batch},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.device.type == "cpu" and batch > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return labels.long()


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) = sum_c p_c (log p_c - log q_c) from log-probabilities; 0*log0 := 0.

    ``log_p`` belongs to the target distribution p. Entries with p_c == 0 contribute exactly 0 (and no NaN
    gradient), which a plain ``F.kl_div(..., log_target=True)`` would not guarantee when log p_c = -inf.
    """
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def _l2_normalize(x: Tensor, dim: int) -> Tensor:
    """x / max(||x||_2, eps) along ``dim`` (same as ``F.normalize``; written out for the masked variants)."""
    return x / x.pow(2).sum(dim=dim, keepdim=True).clamp_min(_NORM_EPS**2).sqrt()


def _diagonal_ce(logits: Tensor) -> Tensor:
    """mean_i -log softmax_j(logits_ij)[i]."""
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
