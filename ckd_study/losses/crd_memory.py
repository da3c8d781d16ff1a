"""CRD's stateful parts: the memory bank of one embedding per training sample and the sampler of its negatives
(methods.md §1; RepDistiller keeps them in their own module too). The loss on their scores is in ``crd``."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._common import _check_choice, _check_positive, _check_tensor, _is_real, _l2_normalize, _to_compute
from .crd import CRD_NEGATIVES

__all__ = ["CRDMemory", "CRDNegativeSampler"]

# --------------------------------------------------------------------------------------------------------------
# §1 CRD's memory bank and negatives (RepDistiller's ContrastMemory)
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
