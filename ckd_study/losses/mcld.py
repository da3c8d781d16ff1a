"""§3 MCLD: multi-perspective contrastive logit distillation (methods.md §3; a reimplementation, no public code)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    _check_choice, _check_labels, _check_logit_pair, _check_nonnegative, _check_positive, _compute_dtype, _diagonal_ce,
    _l2_normalize, _NORM_EPS,
)

__all__ = [
    "MCLDLoss", "MCLD_NORMALIZE", "MCLD_SAMPLE_MODES", "MCLD_TARGET_MASKS", "linear_warmup", "mcld_category_loss",
    "mcld_instance_loss", "mcld_loss", "mcld_sample_loss",
]

MCLD_NORMALIZE = ("l2", "zscore+l2")
MCLD_TARGET_MASKS = ("none", "same_label", "gt_logit")
MCLD_SAMPLE_MODES = ("reverse", "label")


class MCLDLoss(NamedTuple):
    """``total = instance + sample + category``; every part is already multiplied by its weight."""

    total: Tensor
    instance: Tensor
    sample: Tensor
    category: Tensor


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
