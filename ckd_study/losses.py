"""Pure loss functions of the study: KD, DKD, logit standardisation, CKD, MCLD, DCD and CRD.

Every function here is a pure function of its tensor arguments (``CRDMemory`` and the ``CRDNegativeSampler`` it
owns are the stateful modules, because CRD needs a memory bank and, for its negatives, the training labels).
The maths is the one written in ``/work/shared/docs/methods.md`` (cited as "methods.md §N" below).

Conventions shared by every loss:

* **Precision.** Losses are computed in float32 whatever the input dtype: bf16/fp16 inputs are upcast with
  ``.float()``; float64 inputs stay float64 (so ``torch.autograd.gradcheck`` works). See ``_compute_dtype``.
* **Teacher is a constant.** Teacher logits are ``.detach()``-ed inside the logit losses, so no gradient ever
  reaches the teacher. (DCD is the exception: its teacher *embedding* comes out of a trainable head and is
  deliberately not detached; see :func:`dcd_loss`.)
* **Validation.** Bad arguments raise ``ValueError`` naming the argument and the valid values.
* **Multi-part losses** return a ``NamedTuple`` whose first field is ``total``; the other fields are the parts
  (weighted or not, as each docstring states) so that they can be logged.
* **Cost.** The contrastive logit losses (CKD, MCLD) cost O(B^2 * C) per batch and only ever see the batch:
  their cost does not depend on the size of the training set (unlike CRD, whose memory bank holds one entry
  per training sample).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DKDLoss",
    "CKDLoss",
    "MCLDLoss",
    "DCDLoss",
    "kd_loss",
    "dkd_loss",
    "standardize_logits",
    "ckd_loss",
    "mcld_instance_loss",
    "mcld_sample_loss",
    "mcld_category_loss",
    "mcld_loss",
    "linear_warmup",
    "dcd_loss",
    "CRDMemory",
    "CRDNegativeSampler",
    "crd_nce_loss",
    "crd_loss",
    "CRD_NEGATIVES",
    "CKD_ANCHORS",
    "CKD_NEGATIVES",
    "CKD_TERMS",
    "MCLD_NORMALIZE",
    "MCLD_TARGET_MASKS",
    "MCLD_SAMPLE_MODES",
]

# Valid option values (exported so configs/CLIs can validate against the same lists).
CKD_ANCHORS = ("teacher", "student", "both")
CKD_NEGATIVES = ("teacher_student", "student_student")
CKD_TERMS = ("intra", "inter")
MCLD_NORMALIZE = ("l2", "zscore+l2")
MCLD_TARGET_MASKS = ("none", "same_label", "gt_logit")
MCLD_SAMPLE_MODES = ("reverse", "label")
CRD_NEGATIVES = ("exact", "uniform")

# Norm floor used by every L2 normalisation here (the same as ``F.normalize``'s default eps).
_NORM_EPS = 1e-12

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# Return types
# --------------------------------------------------------------------------------------------------------------


class DKDLoss(NamedTuple):
    """``total = tckd + nckd``; ``tckd = alpha*TCKD*tau^2`` and ``nckd = beta*NCKD*tau^2`` (already weighted)."""

    total: Tensor
    tckd: Tensor
    nckd: Tensor


class CKDLoss(NamedTuple):
    """``total`` sums the selected terms; ``intra`` and ``inter`` are always the unweighted terms."""

    total: Tensor
    intra: Tensor
    inter: Tensor


class MCLDLoss(NamedTuple):
    """``total = instance + sample + category``; every part is already multiplied by its weight."""

    total: Tensor
    instance: Tensor
    sample: Tensor
    category: Tensor


class DCDLoss(NamedTuple):
    """``total = contrastive + consistency``; ``consistency`` already includes ``consistency_weight``."""

    total: Tensor
    contrastive: Tensor
    consistency: Tensor


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


# --------------------------------------------------------------------------------------------------------------
# §2 CKD
# --------------------------------------------------------------------------------------------------------------


def _parse_terms(terms) -> frozenset[str]:
    if isinstance(terms, str):
        terms = (terms,)
    try:
        selected = list(terms)
    except TypeError:
        raise ValueError(f"terms must be a non-empty subset of {CKD_TERMS}, got {terms!r}") from None
    if not selected:
        raise ValueError(f"terms must be a non-empty subset of {CKD_TERMS}, got an empty selection")
    for name in selected:
        _check_choice("term", name, CKD_TERMS)
    return frozenset(selected)


def ckd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    anchor: str = "teacher",
    negatives: str = "teacher_student",
    terms: Iterable[str] = ("intra", "inter"),
    inter_positive: bool = True,
) -> CKDLoss:
    r"""Sample-wise contrastive logit distillation, CKD (methods.md §2; arXiv 2404.14109).

    Defaults reproduce the released code: with ``P_ij = norm(t_i) . norm(s_j)`` (rows teacher, columns student)

    .. math:: L = \frac1B\sum_i -\log\frac{\exp(P_{ii}/\tau)}{\sum_j \exp(P_{ij}/\tau)}
              = \underbrace{\mathrm{mean}_i(-P_{ii}/\tau)}_{intra}
              + \underbrace{\mathrm{mean}_i \log\sum_j \exp(P_{ij}/\tau)}_{inter}

    ``intra`` is the intra-sample alignment, ``inter`` the inter-sample contrast; ``intra + inter == total``
    for the default ``terms``. Cost O(B^2 C), independent of the dataset size; no memory bank, no head.

    Options (the open points of methods.md §2):

    * ``anchor``: ``"teacher"`` (rows are teachers, as released), ``"student"`` (rows are students: P' = P^T,
      i.e. inter = mean_i logsumexp_j(P_ji/tau)), ``"both"`` (the average of the two anchored losses; intra is
      identical for both, inter is averaged).
    * ``negatives``: ``"teacher_student"`` (cross pairs, as released) or ``"student_student"``: the positive
      stays (t_i, s_i) with logit P_ii/tau and the negatives of sample i are the student-student similarities
      ``S_ij = norm(s_i).norm(s_j)`` for j != i:
      ``inter = mean_i log(exp(P_ii/tau) + sum_{j!=i} exp(S_ij/tau))``. For this option the anchor does not
      matter (the positive P_ii and the symmetric S give the same value whichever side anchors), so
      ``anchor`` is validated but all three values return the same loss.
    * ``terms``: non-empty subset of {"intra", "inter"}; ``total`` sums the selected terms only (this is how
      the intra-vs-inter ablation switches a term off), while ``intra`` and ``inter`` are always returned.
    * ``inter_positive``: ``True`` (as released) keeps the positive pair inside the log-sum-exp of ``inter``
      (Σ_j over every j); ``False`` sums over the negatives only (Σ_{j≠i}: the paper's words, "negative pairs
      ... from different samples"), for every anchor and both kinds of negatives. ``intra + inter`` is then no
      longer the InfoNCE; it needs a batch of at least two.

    Defaults: temperature 1.0 (the released configs use 1 or 2), anchor "teacher", negatives
    "teacher_student", both terms. The weight lambda_CL (10 / 50 / 100 per pair) is applied by the caller.

    Returns:
        ``CKDLoss(total, intra, inter)``, unweighted terms.
    """
    _check_logit_pair(student_logits, teacher_logits)
    tau = _check_positive("temperature", temperature)
    _check_choice("anchor", anchor, CKD_ANCHORS)
    _check_choice("negatives", negatives, CKD_NEGATIVES)
    selected = _parse_terms(terms)

    s, t = _compute_dtype(student_logits, teacher_logits.detach())
    sn = _l2_normalize(s, dim=1)
    tn = _l2_normalize(t, dim=1)
    logits = (tn @ sn.T) / tau  # P / tau, rows teacher, columns student
    pos = logits.diagonal()
    intra = (-pos).mean()

    if not inter_positive and logits.shape[0] < 2:
        raise ValueError("ckd_loss with inter_positive=False needs a batch of at least 2 (the negatives of a "
                         "sample are the other samples of its batch)")
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if negatives == "teacher_student":
        cross = logits if inter_positive else logits.masked_fill(eye, float("-inf"))
        inter_teacher = torch.logsumexp(cross, dim=1).mean() if anchor in ("teacher", "both") else None
        inter_student = torch.logsumexp(cross, dim=0).mean() if anchor in ("student", "both") else None
        if anchor == "teacher":
            inter = inter_teacher
        elif anchor == "student":
            inter = inter_student
        else:
            inter = 0.5 * (inter_teacher + inter_student)
    else:  # student_student: same for every anchor
        ss = (sn @ sn.T) / tau
        # diagonal: the positive P_ii/tau (or nothing); off-diagonal: S_ij/tau
        row = torch.where(eye, torch.diag_embed(pos) if inter_positive else float("-inf"), ss)
        inter = torch.logsumexp(row, dim=1).mean()

    total = (intra if "intra" in selected else 0.0) + (inter if "inter" in selected else 0.0)
    if not isinstance(total, Tensor):  # pragma: no cover - selected is never empty
        total = intra.new_zeros(())
    return CKDLoss(total, intra, inter)


# --------------------------------------------------------------------------------------------------------------
# §3 MCLD (reimplementation: no public code exists)
# --------------------------------------------------------------------------------------------------------------


def _normalize_masked(x: Tensor, normalize: str, dim: int, keep: Optional[Tensor] = None) -> Tensor:
    """Normalise vectors along ``dim`` ("l2" or "zscore+l2"); ``keep`` (0/1, same shape) drops entries.

    Dropped entries are excluded from the mean and the norm, and are returned as 0 (so they contribute nothing
    to any dot product). "zscore+l2" is computed as centring followed by L2: dividing by the std is a positive
    rescaling that the L2 normalisation removes, so the two are the same function.
    """
    if keep is not None:
        x = x * keep
    if normalize == "zscore+l2":
        if keep is None:
            x = x - x.mean(dim=dim, keepdim=True)
        else:
            count = keep.sum(dim=dim, keepdim=True).clamp_min(1.0)
            x = (x - x.sum(dim=dim, keepdim=True) / count) * keep
    return _l2_normalize(x, dim=dim)


def _anchor_masked_cosine(anchors: Tensor, candidates: Tensor, keep: Tensor, normalize: str) -> Tensor:
    """(B, B) cosine matrix where pair (i, j) uses both vectors with anchor i's dropped classes removed.

    ``keep[i]`` (0/1 over classes) is the class mask of anchor i; it is applied to anchor i *and* to every
    candidate j before the normalisation of that pair. Vectorised in O(B^2 C) (no B x B x C tensor):

    * numerator   sum_c a~_i[c] keep_i[c] (b_j[c] - mu_ij) = (a~ @ b^T)_ij, where ``a~_i`` is anchor i
      normalised with its own mask (zero at dropped classes); the mu_ij term vanishes because for
      "zscore+l2" a~_i is centred over the kept classes (sums to 0), and mu = 0 for "l2";
    * denominator ||keep_i * (b_j - mu_ij)||^2 = (keep @ (b*b)^T)_ij - |keep_i| mu_ij^2
      with mu_ij = (keep @ b^T)_ij / |keep_i| for "zscore+l2" and mu = 0 for "l2".
    """
    a = _normalize_masked(anchors, normalize, dim=1, keep=keep)
    b = candidates
    if normalize == "zscore+l2":
        # Centring over the kept classes is shift invariant: pre-centring b over all classes changes nothing
        # mathematically and avoids cancellation in the "sum of squares minus squared mean" formula below.
        b = b - b.mean(dim=1, keepdim=True)
        count = keep.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
        mu = (keep @ b.T) / count  # (B_anchor, B_candidate)
        sq = keep @ (b * b).T - count * mu * mu
    else:
        sq = keep @ (b * b).T
    return (a @ b.T) / sq.clamp_min(_NORM_EPS**2).sqrt()


def _mcld_common(student_logits, teacher_logits, labels, temperature, normalize, target_mask, need_labels=False):
    b, c = _check_logit_pair(student_logits, teacher_logits)
    tau = _check_positive("temperature", temperature)
    _check_choice("normalize", normalize, MCLD_NORMALIZE)
    _check_choice("target_mask", target_mask, MCLD_TARGET_MASKS)
    y = None
    if labels is not None:
        y = _check_labels(labels, b, c)
    elif need_labels:
        raise ValueError(
            f"labels are required for target_mask={target_mask!r} (only target_mask='none' works without labels)"
        )
    if target_mask == "gt_logit" and c < 2:
        raise ValueError(f"target_mask='gt_logit' needs at least 2 classes, got C={c}")
    s, t = _compute_dtype(student_logits, teacher_logits.detach())
    return s, t, y, tau


def _mcld_similarity(anchors: Tensor, candidates: Tensor, y: Optional[Tensor], tau: float, normalize: str,
                     target_mask: str) -> Tensor:
    """(B, B) logits A_ij = n(anchor_i) . n(candidate_j) / tau, with the gt_logit class drop if requested."""
    if target_mask == "gt_logit":
        keep = 1.0 - F.one_hot(y, anchors.shape[1]).to(anchors.dtype)
        sim = _anchor_masked_cosine(anchors, candidates, keep, normalize)
    else:
        sim = _normalize_masked(anchors, normalize, dim=1) @ _normalize_masked(candidates, normalize, dim=1).T
    return sim / tau


def _remove_same_label_negatives(logits: Tensor, y: Tensor) -> Tensor:
    """Set A_ij = -inf for j != i with y_j == y_i (those pairs leave the denominator)."""
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=logits.device)
    return logits.masked_fill(same & ~eye, float("-inf"))


def _diagonal_ce(logits: Tensor) -> Tensor:
    """mean_i -log softmax_j(logits_ij)[i]."""
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def mcld_instance_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: str = "l2",
    target_mask: str = "none",
) -> Tensor:
    r"""MCLD instance-wise term (methods.md §3.1). **Reimplementation: no public MCLD code exists.**

    Anchor s_i, positive t_i, negatives t_j (j != i) over the B x B matrix
    ``A_ij = n(s_i) . n(t_j) / tau``; the loss is the cross-entropy of each row against the diagonal,
    batch mean: ``mean_i [logsumexp_j A_ij - A_ii]``.

    * ``normalize``: ``"l2"`` (divide by the L2 norm over classes) or ``"zscore+l2"`` (z-score over classes
      then L2, computed as centring then L2, which is the same function).
    * ``target_mask``:
      ``"none"``;
      ``"same_label"``: pairs (i, j), j != i, with y_i == y_j are removed from the denominator (they are
      neither positives nor negatives);
      ``"gt_logit"``: for anchor i, class y_i is removed from *both* vectors of every pair (i, j) before the
      normalisation (the anchor's ground-truth logit is dropped; for "zscore+l2" the mean is taken over the
      C-1 remaining classes). Vectorised with a class mask, O(B^2 C).
    * labels: integer (B,), required unless ``target_mask="none"``.

    Defaults: temperature 1.0, "l2", "none" (see :func:`mcld_loss`).
    """
    s, t, y, tau = _mcld_common(student_logits, teacher_logits, labels, temperature, normalize, target_mask,
                                need_labels=target_mask != "none")
    logits = _mcld_similarity(s, t, y, tau, normalize, target_mask)
    if target_mask == "same_label":
        logits = _remove_same_label_negatives(logits, y)
    return _diagonal_ce(logits)


def mcld_sample_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: str = "l2",
    target_mask: str = "none",
    mode: str = "reverse",
) -> Tensor:
    r"""MCLD sample-wise term (methods.md §3.2). **Reimplementation: no public MCLD code exists.**

    * ``mode="reverse"`` (default): anchor t_i, candidates s_j, i.e. the other direction of the instance
      matrix: ``A'_ij = n(t_i) . n(s_j) / tau``, cross-entropy against the diagonal, batch mean. With
      ``normalize="l2"`` and ``target_mask="none"`` it equals :func:`ckd_loss`'s default total (tested).
      ``target_mask`` acts as in :func:`mcld_instance_loss`, with the anchor now being t_i ("gt_logit" drops
      class y_i of anchor i from t_i and from every s_j; "same_label" removes s_j, j != i, y_j == y_i from
      the denominator).
    * ``mode="label"``: supervised-contrastive: anchor s_i, candidates t_j, ``A_ij = n(s_i) . n(t_j) / tau``,
      positives ``P_i = {j : y_j == y_i}`` (includes i), denominator over all j:
      ``loss_i = -(1/|P_i|) sum_{p in P_i} log softmax_j(A_ij)[p]``, batch mean. Labels required. Here the
      same-label pairs are already positives, so ``target_mask="same_label"`` changes nothing;
      ``"gt_logit"`` applies the class drop to the matrix A as above.

    Defaults: temperature 1.0, "l2", "none", mode "reverse" (see :func:`mcld_loss`).
    """
    _check_choice("mode", mode, MCLD_SAMPLE_MODES)
    need = mode == "label" or target_mask != "none"
    if labels is None and mode == "label":
        raise ValueError("labels are required for mode='label'")
    s, t, y, tau = _mcld_common(student_logits, teacher_logits, labels, temperature, normalize, target_mask,
                                need_labels=need)
    if mode == "reverse":
        logits = _mcld_similarity(t, s, y, tau, normalize, target_mask)
        if target_mask == "same_label":
            logits = _remove_same_label_negatives(logits, y)
        return _diagonal_ce(logits)

    logits = _mcld_similarity(s, t, y, tau, normalize, target_mask)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]).to(log_prob.dtype)
    return (-(pos * log_prob).sum(dim=1) / pos.sum(dim=1)).mean()


def mcld_category_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 1.0,
    normalize: str = "l2",
    target_mask: str = "none",
) -> Tensor:
    r"""MCLD category-wise term (methods.md §3.3). **Reimplementation: no public MCLD code exists.**

    Columns are the items: ``S[:, c]`` is the B-vector of class-c logits across the batch.
    ``K_cc' = n(S[:, c]) . n(T[:, c']) / tau`` (C x C; anchor S[:, c], positive T[:, c], negatives T[:, c'],
    c' != c); loss = cross-entropy of each row against the diagonal, mean over the C classes. Normalisation
    is along the batch dimension (each column).

    * ``target_mask="gt_logit"``: for each sample i its ground-truth entry (i, y_i) is dropped from the class
      columns of both S and T before the normalisation: that entry is zeroed, excluded from the column mean
      ("zscore+l2") and from the column norm, so it contributes nothing to any K_cc'. (Column c thus only
      uses the samples whose label is not c.)
    * ``target_mask="same_label"``: no effect on this term (it is defined on sample pairs, and the category
      term contrasts classes, not samples); labels are then not needed.
    * ``target_mask="none"``: plain.

    Cost O(C^2 B). Defaults: temperature 1.0, "l2", "none" (see :func:`mcld_loss`).
    """
    s, t, y, tau = _mcld_common(student_logits, teacher_logits, labels, temperature, normalize, target_mask,
                                need_labels=target_mask == "gt_logit")
    keep = None
    if target_mask == "gt_logit":
        keep = 1.0 - F.one_hot(y, s.shape[1]).to(s.dtype)
    sn = _normalize_masked(s, normalize, dim=0, keep=keep)
    tn = _normalize_masked(t, normalize, dim=0, keep=keep)
    return _diagonal_ce((sn.T @ tn) / tau)


def linear_warmup(epoch: float, warmup_epochs: float = 20) -> float:
    """Linear warm-up factor ``w(epoch) = min(epoch / warmup_epochs, 1)`` (1 when ``warmup_epochs == 0``).

    The MCLD category weight (methods.md §3.5, default 20 epochs) and DKD's ``warm`` (methods.md §1,
    20 epochs) both have this form; epochs count from 1 in DKD's code, so epoch 1 gives 1/20.
    """
    _check_nonnegative("warmup_epochs", warmup_epochs)
    _check_nonnegative("epoch", epoch)
    if warmup_epochs == 0:
        return 1.0
    return min(float(epoch) / float(warmup_epochs), 1.0)


def mcld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    normalize: str = "l2",
    target_mask: str = "none",
    sample_mode: str = "reverse",
    lambda_instance: float = 50.0,
    lambda_sample: float = 50.0,
    lambda_category: float = 50.0,
    category_weight: float = 1.0,
) -> MCLDLoss:
    r"""Multi-perspective contrastive logit distillation, MCLD (methods.md §3; arXiv 2411.10693).

    **Reimplementation: no public MCLD code exists; every MCLD number must say so.**

    .. math:: L = \lambda_{ins} L_{ins} + \lambda_{sam} L_{sam} + w \cdot \lambda_{cat} L_{cat}

    (the CE term of methods.md §3.5 is added by the caller). ``w = category_weight`` is the warm-up factor
    w(epoch) supplied by the caller (e.g. ``linear_warmup(epoch, 20)``). Returns
    ``MCLDLoss(total, instance, sample, category)`` with every part already weighted
    (``category = lambda_category * category_weight * L_cat``).

    Defaults (our choices, documented because there is no reference code): temperature 1.0,
    normalize "l2", target_mask "none", sample_mode "reverse", and lambda_instance = lambda_sample =
    lambda_category = 50.0: the two sample-level directions then carry a total weight of 100, as CKD's
    lambda_CL = 100 does on its single direction. See :func:`mcld_instance_loss`,
    :func:`mcld_sample_loss` and :func:`mcld_category_loss` for the options and exactly what each
    target mask does.
    """
    lam_i = _check_nonnegative("lambda_instance", lambda_instance)
    lam_s = _check_nonnegative("lambda_sample", lambda_sample)
    lam_c = _check_nonnegative("lambda_category", lambda_category)
    w = _check_nonnegative("category_weight", category_weight)
    _check_choice("sample_mode", sample_mode, MCLD_SAMPLE_MODES)
    if labels is None:
        raise ValueError("labels are required for mcld_loss (an integer tensor of shape (B,))")
    kw = dict(temperature=temperature, normalize=normalize, target_mask=target_mask)
    instance = lam_i * mcld_instance_loss(student_logits, teacher_logits, labels, **kw)
    sample = lam_s * mcld_sample_loss(student_logits, teacher_logits, labels, mode=sample_mode, **kw)
    category = (lam_c * w) * mcld_category_loss(student_logits, teacher_logits, labels, **kw)
    return MCLDLoss(instance + sample + category, instance, sample, category)


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


# --------------------------------------------------------------------------------------------------------------
# §1 CRD (RepDistiller's ContrastMemory + ContrastLoss)
# --------------------------------------------------------------------------------------------------------------


class CRDNegativeSampler(nn.Module):
    """CRD's negatives as released: per anchor, K dataset indices from the *other classes* (methods.md §1).

    RepDistiller's ``CIFAR100InstanceSample`` with ``mode='exact'`` (the setting of its CRD runs) draws, for a
    sample of class y, ``K`` indices from the pool of all training samples whose label is not y, without
    replacement (with replacement only when K exceeds that pool), independently for every sample; the
    positive is the sample's own index. Here the whole batch is drawn at once, on the labels' device, from
    torch's global RNG of that device (the trainer checkpoints it, so a resumed run draws the same negatives):

    * Without replacement: every row gets one uniform random integer key in [0, 2^31) per dataset sample, the
      samples of the anchor's own class get the key -1, and the row keeps the K samples with the largest keys
      (``topk``): a uniformly random K-subset of the other classes, returned directly as dataset indices.
      Two equal keys only matter when they straddle the K-th place (CIFAR sizes: about 2 rows in 100,000),
      and then decide between two samples that are otherwise equally likely.
    * With replacement, for rows whose pool is smaller than K: K independent uniform positions in the pool,
      held implicitly: ``order`` lists the dataset sorted by class (stable), class y occupies
      ``order[start[y] : start[y] + count[y]]``, so pool position p is ``order[p]`` before that block and
      ``order[p + count[y]]`` after it.

    State: O(n_data) (no classes x pool table). Cost per call: B x n_data random keys and a top-K per row
    (B=64, n_data 50,000, K=16,384: about 40 ms on one CPU core, ``benchmarks/bench_losses.py --only crd``),
    against B x (K+1) random integers for uniform sampling.
    """

    def __init__(self, labels: Tensor, nce_k: int):
        super().__init__()
        _check_tensor("labels", labels)
        if labels.dim() != 1 or labels.numel() < 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a non-empty 1-d integer tensor (one label per training sample), "
                             f"got shape {tuple(labels.shape)} {labels.dtype}")
        if isinstance(nce_k, bool) or not isinstance(nce_k, int) or nce_k < 1:
            raise ValueError(f"nce_k must be a positive integer, got {nce_k!r}")
        labels = labels.long()
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got a minimum of {int(labels.min())}")
        counts = torch.bincount(labels)
        present = counts[counts > 0]
        if len(present) < 2:
            raise ValueError("labels hold a single class: there is no other-class sample to draw negatives from")
        self.n_data = labels.numel()
        self.nce_k = nce_k
        # the largest pool belongs to the smallest class present
        self.max_pool = self.n_data - int(present.min())
        # does some class have a pool smaller than K? (then its rows are drawn with replacement, as RepDistiller)
        self.any_with_replacement = bool((self.n_data - present < nce_k).any())
        self.any_without_replacement = nce_k <= self.max_pool
        order = torch.argsort(labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        # class_members[c]: the dataset indices of class c, padded by repeating its first one
        width = torch.arange(int(counts.max()), device=labels.device)
        slot = starts[:, None] + torch.minimum(width[None, :], (counts[:, None] - 1).clamp_min(0))
        members = order[slot.clamp_max(self.n_data - 1)]
        # derived from the labels, so not saved in state_dict (a checkpoint does not change)
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("class_start", starts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_members", members, persistent=False)

    def extra_repr(self) -> str:
        return f"n_data={self.n_data}, nce_k={self.nce_k}, max_pool={self.max_pool}"

    def forward(self, index: Tensor) -> Tensor:
        """(B, K+1) dataset indices: column 0 is ``index`` (the positive), columns 1..K the negatives."""
        y = self.labels[index]
        k, device, bsz = self.nce_k, self.labels.device, index.shape[0]
        if self.any_without_replacement:
            keys = torch.empty(bsz, self.n_data, dtype=torch.int32, device=device).random_()  # [0, 2^31)
            keys.scatter_(1, self.class_members[y], -1)  # the anchor's own class is never among the K largest
            negatives = keys.topk(k, dim=1, sorted=False).indices
        if self.any_with_replacement:
            count = self.class_count[y][:, None]
            pool = self.n_data - count
            position = torch.empty(bsz, k, dtype=torch.int64, device=device).random_() % pool
            drawn = self.order[position + count * (position >= self.class_start[y][:, None])]
            negatives = drawn if not self.any_without_replacement else torch.where(pool < k, drawn, negatives)
        return torch.cat([index[:, None], negatives], dim=1)


class CRDMemory(nn.Module):
    """CRD's two momentum memory banks and NCE scores (methods.md §1; RepDistiller's ``ContrastMemory``).

    Buffers (saved in ``state_dict``):

    * ``memory_student``, ``memory_teacher``: (n_data, feat_dim), initialised uniformly in [-stdv, stdv] with
      ``stdv = 1/sqrt(feat_dim/3)`` (RepDistiller's init; pass ``generator`` for reproducibility).
    * ``z_student``, ``z_teacher``: NCE normalisation constants, initialised to -1 and set *once*, from the
      first batch, to ``mean(exp(out/T)) * n_data`` (then fixed, as in RepDistiller).

    Defaults are CRD's: ``nce_k=16384`` negatives, ``nce_t=0.07``, momentum ``nce_m=0.5``; the CRD weight 0.8
    is applied by the caller. Inputs are expected to be L2-normalised embeddings (CRD's ``Embed`` heads
    normalise), as in RepDistiller; this module does not normalise them.

    Negatives, when :meth:`forward` is not given a ``contrast_index``:

    * ``negatives="exact"`` (default, as released: RepDistiller's ``mode='exact'``): K indices from the
      anchor's *other classes*, without replacement (with replacement only if K exceeds that pool), drawn by
      :class:`CRDNegativeSampler` from the training ``labels`` (required for this mode).
    * ``negatives="uniform"``: K indices uniform over the whole dataset, with replacement (``torch.randint``),
      so a negative may share the anchor's class or be the anchor itself. This is not what RepDistiller's CRD
      runs do; it is what this study did before following the release, kept to reproduce those runs and as
      the cheap, label-free variant (B x (K+1) draws instead of B x pool keys and a top-K).

    Cost: O(B * K * feat_dim) per step (computed as O(B * n_data * feat_dim) dense products when n_data is
    within ``FULL_PRODUCT_MAX_RATIO`` times K+1, which is faster, see ``_dot_products``) plus an
    (n_data x feat_dim x 2) state that grows with the dataset, plus drawing the negatives (``"exact"``: B x pool
    random keys and a top-K, see :class:`CRDNegativeSampler`); the caller must supply the dataset index of
    every sample (and, for ``"exact"``, the labels of the whole training set).
    """

    def __init__(self, feat_dim: int, n_data: int, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 generator: Optional[torch.Generator] = None, negatives: str = "exact",
                 labels: Optional[Tensor] = None):
        super().__init__()
        for name, value in (("feat_dim", feat_dim), ("n_data", n_data), ("nce_k", nce_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.negatives = _check_choice("negatives", negatives, CRD_NEGATIVES)
        self.sampler: Optional[CRDNegativeSampler] = None
        if labels is not None:
            if negatives != "exact":
                raise ValueError(f"labels are only used by negatives='exact', got negatives={negatives!r}")
            if _check_tensor("labels", labels).shape != (n_data,):
                raise ValueError(f"labels must hold one label per memory row, shape ({n_data},), "
                                 f"got {tuple(labels.shape)}")
            self.sampler = CRDNegativeSampler(labels, nce_k)
        _check_positive("nce_t", nce_t)
        if not _is_real(nce_m) or not 0.0 <= float(nce_m) <= 1.0:
            raise ValueError(f"nce_m (momentum) must be in [0, 1], got {nce_m!r}")
        self.feat_dim = feat_dim
        self.n_data = n_data
        self.nce_k = nce_k
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(n_data, feat_dim, generator=generator) * (2 * stdv) - stdv)
        self.register_buffer("memory_teacher", torch.rand(n_data, feat_dim, generator=generator) * (2 * stdv) - stdv)
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, n_data={self.n_data}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
                f"nce_m={self.nce_m}, negatives={self.negatives}")

    def forward(self, student_embed: Tensor, teacher_embed: Tensor, index: Tensor,
                contrast_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Scores of each embedding against the *other* model's memory, then the momentum update.

        Args:
            student_embed, teacher_embed: (B, feat_dim), L2-normalised.
            index: (B,) dataset indices of the batch samples (the positives).
            contrast_index: optional (B, K+1) memory indices; column 0 is expected to be ``index`` (it is used
                as given, as in RepDistiller). When None, column 0 is ``index`` and columns 1..K are drawn
                as ``negatives`` says (class docstring): other-class samples without replacement
                (``"exact"``), or uniformly over [0, n_data) with replacement (``"uniform"``).
        Returns:
            ``(out_student, out_teacher)``, each (B, K+1): ``exp(m_k . x / T) / Z``; column 0 is the positive.
            ``out_student``: student embedding against the teacher memory; ``out_teacher``: teacher embedding
            against the student memory (RepDistiller's out_v1/out_v2).

        After the scores, both memories are updated in place under no_grad:
        ``m[index] = normalize(nce_m * m[index] + (1 - nce_m) * embed)``.
        """
        _check_tensor("student_embed", student_embed)
        _check_tensor("teacher_embed", teacher_embed)
        _check_tensor("index", index)
        if student_embed.dim() != 2 or student_embed.shape[1] != self.feat_dim:
            raise ValueError(f"student_embed must have shape (B, feat_dim={self.feat_dim}), "
                             f"got {tuple(student_embed.shape)}")
        if teacher_embed.shape != student_embed.shape:
            raise ValueError("student_embed and teacher_embed must have the same shape; got "
                             f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}")
        bsz = student_embed.shape[0]
        k = self.nce_k
        if index.shape != (bsz,) or index.is_floating_point():
            raise ValueError(f"index must be an integer tensor of shape (B,) = ({bsz},), got "
                             f"{tuple(index.shape)} {index.dtype}")
        index = index.long()
        if contrast_index is None:
            contrast_index = self._draw_contrast_index(index)
        else:
            if contrast_index.shape != (bsz, k + 1) or contrast_index.is_floating_point():
                raise ValueError(f"contrast_index must be an integer tensor of shape (B, nce_k+1) = "
                                 f"({bsz}, {k + 1}), got {tuple(contrast_index.shape)}")
            contrast_index = contrast_index.long()

        dtype = self.memory_student.dtype
        xs = _to_compute(student_embed).to(dtype)
        xt = _to_compute(teacher_embed).to(dtype)
        out_student = torch.exp(self._dot_products(self.memory_teacher, xs, contrast_index) / self.nce_t)
        out_teacher = torch.exp(self._dot_products(self.memory_student, xt, contrast_index) / self.nce_t)

        with torch.no_grad():
            # Z is set once from the first batch (RepDistiller checks Z < 0 on every call).
            if float(self.z_student) < 0:
                self.z_student.fill_(float(out_student.mean()) * self.n_data)
            if float(self.z_teacher) < 0:
                self.z_teacher.fill_(float(out_teacher.mean()) * self.n_data)
        out_student = out_student / self.z_student
        out_teacher = out_teacher / self.z_teacher

        with torch.no_grad():
            m = self.nce_m
            for memory, x in ((self.memory_student, xs), (self.memory_teacher, xt)):
                pos = memory.index_select(0, index) * m + x.detach() * (1.0 - m)
                memory.index_copy_(0, index, _l2_normalize(pos, dim=1))
        return out_student, out_teacher


    def _draw_contrast_index(self, index: Tensor) -> Tensor:
        """(B, K+1) memory indices, column 0 the positive ``index``, drawn from the device's global RNG."""
        if self.negatives == "uniform":
            contrast_index = torch.randint(0, self.n_data, (index.shape[0], self.nce_k + 1),
                                           device=self.memory_student.device)
            contrast_index[:, 0] = index
            return contrast_index
        if self.sampler is None:
            raise ValueError("negatives='exact' draws other-class negatives and needs the training labels: build "
                             "CRDMemory with labels=..., pass a contrast_index, or use negatives='uniform'")
        return self.sampler(index)

    # Up to this many memory rows per contrast column, scoring the whole memory beats gathering rows (CPU,
    # B=64, K=4096: dense 15 / 61 / 130 ms at 10k / 50k / 100k rows, gather ~260 ms at any size; bench_losses.py).
    FULL_PRODUCT_MAX_RATIO = 32

    def _dot_products(self, memory: Tensor, x: Tensor, contrast_index: Tensor) -> Tensor:
        """``out[b, j] = memory[contrast_index[b, j]] . x[b]``, (B, K+1); the memory takes no gradient.

        Gathering the B*(K+1) rows moves B*(K+1)*feat_dim floats (134 MB a call for B=64, K=4096) and then
        does a memory-bound batched matrix-vector product. When the memory has at most
        ``FULL_PRODUCT_MAX_RATIO * (K+1)`` rows (CIFAR: 50k rows, K=16384) one dense ``x @ memory.T``
        (B x n_data) followed by a gather of the wanted scores is far faster (CPU, B=64, K=4096: 17x at 10k
        rows, 4x at 50k; benchmarks/RESULTS.md) and needs less memory; the values agree to float rounding
        (summation order).
        """
        bsz, columns = contrast_index.shape
        memory = memory.detach()
        if self.n_data <= self.FULL_PRODUCT_MAX_RATIO * columns:
            if torch.is_grad_enabled() and x.requires_grad:
                # the product's backward needs the memory as it is now; forward() updates it in place next
                memory = memory.clone()
            return (x @ memory.t()).gather(1, contrast_index)
        rows = memory.index_select(0, contrast_index.reshape(-1)).view(bsz, columns, self.feat_dim)
        return torch.bmm(rows, x.unsqueeze(2)).squeeze(2)


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
