"""§2 CKD: sample-wise contrastive logit distillation, intra-sample alignment and inter-sample contrast
(methods.md §2)."""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
from torch import Tensor

from ._common import _check_choice, _check_logit_pair, _check_positive, _compute_dtype, _l2_normalize

__all__ = ["CKDLoss", "CKD_ANCHORS", "CKD_NEGATIVES", "CKD_TERMS", "ckd_loss"]

CKD_ANCHORS = ("teacher", "student", "both")
CKD_NEGATIVES = ("teacher_student", "student_student")
CKD_TERMS = ("intra", "inter")


class CKDLoss(NamedTuple):
    """``total`` sums the selected terms; ``intra`` and ``inter`` are always the unweighted terms."""

    total: Tensor
    intra: Tensor
    inter: Tensor


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
