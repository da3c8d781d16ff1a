"""Distillation methods: one registered class per method (spec: ``shared/docs/methods.md``).

A method is an ``nn.Module`` that owns its extra trainable modules (projection heads, learnable temperature,
CRD's memory), sizes them from the teacher's and student's feature widths, and maps one batch's outputs to a
dict of named, already-weighted loss terms, e.g. ``{"ce": ..., "ckd_intra": ..., "ckd_inter": ...}``. The
training loop sums, logs and back-propagates them without knowing which method produced them.

Options live in one dataclass per method (``Method.Options``): its defaults are the defaults of the study and
are validated when built. ``create_method(name, student, teacher, num_train=..., train_labels=..., **options)``
builds a method.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .models import ModelOutput, ZooModel

Terms = dict[str, torch.Tensor]


class MethodError(ValueError):
    """Unknown method or invalid method option; the message names the option and the valid values."""


def _check(ok: bool, method: str, option: str, message: str) -> None:
    if not ok:
        raise MethodError(f"method {method!r}, option {option!r}: {message}")


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``Options`` and implement :meth:`loss_terms`.

    Class attributes describe what the method needs, so the engine can prepare it generically:
    ``needs_teacher``; ``teacher_outputs`` (which fields of the teacher's ModelOutput it reads; the teacher
    cache can serve ``logits`` and ``pooled``); ``needs_indices`` (sample indices, e.g. CRD's memory).
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    needs_teacher: ClassVar[bool] = True
    teacher_outputs: ClassVar[frozenset[str]] = frozenset({"logits"})
    needs_indices: ClassVar[bool] = False

    def __init__(self, student: ZooModel, teacher: ZooModel | None, options: Any, num_train: int,
                 train_labels: torch.Tensor | None = None) -> None:
        super().__init__()
        self.options = options
        self.num_train = num_train

    def loss_terms(self, student_out: ModelOutput, teacher_out: ModelOutput | None, labels: torch.Tensor,
                   indices: torch.Tensor, epoch: int) -> Terms:
        """Named, already-weighted loss terms for one batch. ``epoch`` is 1-based (warm-ups read it)."""
        raise NotImplementedError

    def forward(self, student_out, teacher_out, labels, indices, epoch) -> Terms:  # noqa: D401
        return self.loss_terms(student_out, teacher_out, labels, indices, epoch)

    def added_state(self) -> dict[str, int]:
        """What the method adds to the student's training, recorded with each run (the evidence for claims such as
        "CKD needs no projection head and no memory bank"): ``method_parameters``, the trainable values of its
        own modules (heads, a learned temperature), and ``method_buffer_values``, the values it carries from step
        to step in checkpointed buffers (CRD's memory bank). Index tables rebuilt at start-up (CRD's sampler)
        are not counted; neither are the student and the teacher, which are never submodules of a method."""
        parameter_names = {name for name, _ in self.named_parameters()}
        return {"method_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "method_buffer_values": sum(v.numel() for name, v in self.state_dict().items()
                                            if name not in parameter_names)}

    def epoch_metrics(self) -> dict[str, float]:
        """Method state worth a line per epoch (a learned temperature, ...), read after the epoch's last step;
        the trainer adds it to the epoch's record in ``metrics.jsonl`` under these names."""
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise MethodError(f"unknown method {name!r}; valid methods: {', '.join(available_methods())}")
    return _METHODS[name]


def resolve_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option of method ``name`` with defaults filled in, validated; as a plain JSON-able dict. An option
    the method lists in ``Options.ADDED_LATER`` is left out at its default, so that runs stored before it
    existed keep their run ids."""
    plain = _to_plain(build_options(name, options))
    for option, default in getattr(method_class(name).Options, "ADDED_LATER", {}).items():
        if plain.get(option) == default:
            del plain[option]
    return plain


def build_options(name: str, options: Mapping[str, Any] | None = None) -> Any:
    cls = method_class(name)
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    given = dict(options or {})
    unknown = sorted(set(given) - valid)
    if unknown:
        raise MethodError(f"method {name!r}: unknown option(s) {unknown}; valid options: {', '.join(sorted(valid))}")
    hints = typing.get_type_hints(cls.Options)
    given = {k: _canonical_option(name, k, hints[k], v) for k, v in given.items()}
    opts = cls.Options(**given)
    opts.validate(name)
    return opts


def _canonical_option(method: str, option: str, declared: Any, value: Any) -> Any:
    """``value`` as the option's declared type, so equal settings hash to one run id (``1`` and ``1.0`` for a
    float option; a JSON list for a tuple option). Booleans are never numbers; floats must be finite."""
    args = typing.get_args(declared)
    if type(None) in args:  # X | None
        if value is None:
            return None
        declared = next(a for a in args if a is not type(None))
    origin = typing.get_origin(declared) or declared
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), method, option, f"must be a list, got {value!r}")
        return tuple(value)
    if declared is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), method, option,
               f"not a number: {value!r}")
        _check(math.isfinite(value), method, option, f"must be a finite number, got {value!r}")
        return float(value)
    if declared is int:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        _check(ok and not isinstance(value, bool), method, option, f"not a whole number: {value!r}")
        return int(value)
    if declared is bool:
        _check(isinstance(value, bool), method, option, f"must be true or false, got {value!r}")
        return value
    if declared is str:
        _check(isinstance(value, str), method, option, f"must be a string, got {value!r}")
    return value


def _to_plain(opts: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(opts).items()}


def create_method(name: str, student: ZooModel, teacher: ZooModel | None = None, num_train: int = 50_000,
                  train_labels: torch.Tensor | None = None, **options: Any) -> Method:
    """Build method ``name`` for a student/teacher pair.

    ``num_train`` sizes CRD's memory; ``train_labels`` (the (num_train,) labels of the training set, indexed
    like the sample indices the trainer passes) lets CRD draw its negatives from the other classes, as
    released. Methods that do not need them ignore both.
    """
    cls = method_class(name)
    opts = build_options(name, options)
    if cls.needs_teacher and teacher is None:
        raise MethodError(f"method {name!r} distils from a teacher, but no teacher model was given")
    return cls(student, teacher, opts, num_train, train_labels=train_labels)


def _positive(method: str, **values: float) -> None:
    for option, value in values.items():
        _check(isinstance(value, (int, float)) and value > 0, method, option, f"must be > 0, got {value!r}")


def _non_negative(method: str, **values: float) -> None:
    for option, value in values.items():
        _check(isinstance(value, (int, float)) and value >= 0, method, option, f"must be >= 0, got {value!r}")


def _warmup_factor(epoch: int, warmup: float) -> float:
    """Linear warm-up ``min(epoch / warmup, 1)`` (mdistiller's DKD schedule; epoch is 1-based)."""
    return 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Baselines (methods.md §1)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CEOptions:
    """CE (methods.md §1): the student alone, cross-entropy; no options."""

    def validate(self, method: str) -> None:
        pass


@register_method
class CE(Method):
    """Cross-entropy only: teachers and the student baseline."""

    name = "ce"
    Options = CEOptions
    needs_teacher = False
    teacher_outputs = frozenset()

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        return {"ce": F.cross_entropy(student_out.logits.float(), labels)}


@dataclass(frozen=True)
class KDOptions:
    """KD (Hinton, methods.md §1): ``ce_weight·CE + kd_weight·KD(τ)``. Defaults: 0.1 / 0.9 / τ=4."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def validate(self, method: str) -> None:
        _positive(method, temperature=self.temperature)
        _non_negative(method, ce_weight=self.ce_weight, kd_weight=self.kd_weight)


@register_method
class KD(Method):
    """Hinton KD, ``L = 0.1·CE + 0.9·KL(softmax(t/4) ‖ softmax(s/4))·16``."""

    name = "kd"
    Options = KDOptions

    def _logits(self, out: ModelOutput) -> torch.Tensor:
        """The logits the KD term compares (the LS variant z-scores them)."""
        return out.logits

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        kd = losses.kd_loss(self._logits(student_out), self._logits(teacher_out), o.temperature)
        return {"ce": o.ce_weight * F.cross_entropy(student_out.logits.float(), labels), "kd": o.kd_weight * kd}


@dataclass(frozen=True)
class KDLSOptions(KDOptions):
    """KD+LS (methods.md §1): KD on z-scored logits, ``z = (l − mean(l)) / (1e-7 + std(l))`` per sample.
    Defaults: base temperature 2, KD weight 9, CE weight 0.1, unbiased std (all as released).

    ``unbiased_std`` (default True): z-score with the sample (C − 1) std, as the released code
    (sunshangquan/logit-standardization-KD, ``normalize()``: torch's default ``std()``). False uses the
    population std (unit-variance rows), the same as a base temperature 0.995× as large for C=100; kept to
    reproduce this study's LS runs made before the default followed the released code.
    """

    temperature: float = 2.0
    ce_weight: float = 0.1
    kd_weight: float = 9.0
    unbiased_std: bool = True

    def validate(self, method: str) -> None:
        super().validate(method)
        _check(isinstance(self.unbiased_std, bool), method, "unbiased_std",
               f"must be a bool, got {self.unbiased_std!r}")


@register_method
class KDLS(KD):
    """KD on z-scored logits (logit standardisation, methods.md §1)."""

    name = "kd_ls"
    Options = KDLSOptions

    def _logits(self, out: ModelOutput) -> torch.Tensor:
        return losses.standardize_logits(out.logits, unbiased=self.options.unbiased_std)


@dataclass(frozen=True)
class DKDOptions:
    """DKD (methods.md §1): ``ce_weight·CE + w(epoch)·(α·TCKD + β·NCKD)``. Defaults: τ=4, α=1, β=8, linear
    warm-up over 20 epochs, CE weight 1.

    β is 2 for resnet56→20 and resnet110→32 and 6 for the vgg13/wrn_40_2 pairs; ``config.PAIR_METHOD_DEFAULTS``
    applies those per pair.
    """

    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup: float = 20.0
    ce_weight: float = 1.0

    def validate(self, method: str) -> None:
        _positive(method, temperature=self.temperature)
        _non_negative(method, alpha=self.alpha, beta=self.beta, warmup=self.warmup, ce_weight=self.ce_weight)


@register_method
class DKD(Method):
    name = "dkd"
    Options = DKDOptions

    def _logits(self, out: ModelOutput) -> torch.Tensor:
        """The logits TCKD/NCKD compare (the LS variant z-scores them)."""
        return out.logits

    def _alpha_beta(self) -> tuple[float, float]:
        """The weights of TCKD and NCKD (the LS variant scales both by its KD weight)."""
        return self.options.alpha, self.options.beta

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        alpha, beta = self._alpha_beta()
        parts = losses.dkd_loss(self._logits(student_out), self._logits(teacher_out), labels, alpha=alpha,
                                beta=beta, temperature=o.temperature)
        warm = _warmup_factor(epoch, o.warmup)
        return {"ce": o.ce_weight * F.cross_entropy(student_out.logits.float(), labels),
                "dkd_tckd": warm * parts.tckd, "dkd_nckd": warm * parts.nckd}


@dataclass(frozen=True)
class DKDLSOptions(DKDOptions):
    """DKD+LS (methods.md §1): DKD on z-scored logits,
    ``ce_weight·CE + w(epoch)·kd_weight·(α·TCKD + β·NCKD)`` with τ the base temperature.

    Defaults, as released (sunshangquan/logit-standardization-KD, ``tools/train.py`` with ``--logit-stand``):
    base temperature 2, ``kd_weight`` 9 multiplying both α and β (so α=9, β=72 with DKD's α=1, β=8; the
    per-pair β of ``config.PAIR_METHOD_DEFAULTS`` is multiplied too), warm-up 20, CE weight 1. Without the
    factor the distillation term is 9× weaker than the one the published DKD+LS numbers were trained with;
    ``kd_weight=1`` gives plain DKD weights on z-scored logits.

    ``unbiased_std``: as for ``kd_ls`` (default True, the released sample std; False, the population std).
    """

    temperature: float = 2.0
    kd_weight: float = 9.0
    unbiased_std: bool = True

    def validate(self, method: str) -> None:
        super().validate(method)
        _non_negative(method, kd_weight=self.kd_weight)
        _check(isinstance(self.unbiased_std, bool), method, "unbiased_std",
               f"must be a bool, got {self.unbiased_std!r}")


@register_method
class DKDLS(DKD):
    name = "dkd_ls"
    Options = DKDLSOptions

    def _logits(self, out: ModelOutput) -> torch.Tensor:
        return losses.standardize_logits(out.logits, unbiased=self.options.unbiased_std)

    def _alpha_beta(self) -> tuple[float, float]:
        o = self.options
        return o.kd_weight * o.alpha, o.kd_weight * o.beta


@dataclass(frozen=True)
class CRDOptions:
    """CRD (methods.md §1): linear heads + L2 norm on pooled features, negatives from memory banks.

    Defaults: ``feat_dim`` 128, ``nce_k`` 16,384 negatives, NCE temperature 0.07, memory momentum 0.5,
    weight 0.8, CE weight 1, ``negatives`` "exact". Head input widths are inferred from the models'
    ``pooled_dim``.

    ``negatives``: for an anchor of class y, ``"exact"`` (default, as released: RepDistiller's
    ``mode='exact'``) draws the K negative indices from the training samples of the other classes, without
    replacement (with replacement only if K exceeds that pool), the positive being the anchor's own index;
    it needs ``train_labels`` (see :func:`create_method`; without them the method warns and samples
    uniformly). ``"uniform"`` draws them uniformly over the whole training set with replacement (same-class
    samples and the anchor itself can be negatives): what this study did before following the release,
    kept to reproduce those runs."""

    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    weight: float = 0.8
    ce_weight: float = 1.0
    negatives: str = "exact"

    def validate(self, method: str) -> None:
        _check(isinstance(self.feat_dim, int) and self.feat_dim >= 1, method, "feat_dim",
               f"must be a positive integer, got {self.feat_dim!r}")
        _check(isinstance(self.nce_k, int) and self.nce_k >= 1, method, "nce_k",
               f"must be a positive integer, got {self.nce_k!r}")
        _positive(method, nce_t=self.nce_t)
        _check(0 <= self.nce_m < 1, method, "nce_m", f"must be in [0, 1), got {self.nce_m!r}")
        _non_negative(method, weight=self.weight, ce_weight=self.ce_weight)
        _check(self.negatives in losses.CRD_NEGATIVES, method, "negatives",
               f"unknown negatives {self.negatives!r}; valid: {', '.join(losses.CRD_NEGATIVES)}")


class Embed(nn.Module):
    """Linear projection followed by L2 normalisation (CRD's embedding head)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.float()), dim=1)


@register_method
class CRD(Method):
    name = "crd"
    Options = CRDOptions
    teacher_outputs = frozenset({"pooled"})
    needs_indices = True

    def __init__(self, student, teacher, options, num_train, train_labels=None):
        super().__init__(student, teacher, options, num_train, train_labels)
        _check(options.nce_k < num_train, self.name, "nce_k",
               f"must be smaller than the training set ({num_train} samples), got {options.nce_k}")
        negatives = options.negatives
        if negatives == "exact" and train_labels is None:
            warnings.warn("crd: negatives='exact' draws other-class negatives and needs the training labels, but "
                          "create_method(..., train_labels=...) was not given them: sampling negatives UNIFORMLY "
                          "over the training set instead (the pre-release behaviour, negatives='uniform')",
                          UserWarning, stacklevel=3)
            negatives = "uniform"
        if train_labels is not None and negatives == "exact":
            _check(tuple(train_labels.shape) == (num_train,), self.name, "train_labels",
                   f"must hold one label per training sample, shape ({num_train},), got {tuple(train_labels.shape)}")
        self.embed_student = Embed(student.pooled_dim, options.feat_dim)
        self.embed_teacher = Embed(teacher.pooled_dim, options.feat_dim)
        self.memory = losses.CRDMemory(options.feat_dim, num_train, nce_k=options.nce_k, nce_t=options.nce_t,
                                       nce_m=options.nce_m, negatives=negatives,
                                       labels=train_labels if negatives == "exact" else None)

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        out_s, out_t = self.memory(self.embed_student(student_out.pooled),
                                   self.embed_teacher(teacher_out.pooled.detach()), indices)
        return {"ce": o.ce_weight * F.cross_entropy(student_out.logits.float(), labels),
                "crd": o.weight * losses.crd_loss(out_s, out_t, self.num_train)}


# ---------------------------------------------------------------------------------------------------------
# CKD (methods.md §2)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CKDOptions:
    """CKD: ``ce_weight·CE + weight·L_CKD(τ)``, L_CKD = intra + inter (methods.md §2).

    Defaults reproduce the released code: teacher-anchored InfoNCE over L2-normalised logits, τ=1,
    λ_CL=100 (per-pair values from the released configs are applied by ``config.PAIR_METHOD_DEFAULTS``).
    ``terms`` switches the intra-sample alignment or inter-sample contrast off (the intra-vs-inter ablation);
    ``inter_positive=False`` drops the positive pair from the inter term's log-sum-exp (the paper's Σ_{j≠i}).
    """

    temperature: float = 1.0
    weight: float = 100.0
    anchor: str = "teacher"
    negatives: str = "teacher_student"
    terms: tuple[str, ...] = ("intra", "inter")
    ce_weight: float = 1.0
    inter_positive: bool = True
    # Options added after runs were stored: left out of the stored options (and the run id) at their default.
    ADDED_LATER: ClassVar[dict[str, Any]] = {"inter_positive": True}

    def validate(self, method: str) -> None:
        _positive(method, temperature=self.temperature)
        _non_negative(method, weight=self.weight, ce_weight=self.ce_weight)
        _check(isinstance(self.inter_positive, bool), method, "inter_positive",
               f"must be true or false, got {self.inter_positive!r}")
        _check(self.anchor in ("teacher", "student", "both"), method, "anchor",
               f"unknown anchor {self.anchor!r}; valid: teacher, student, both")
        _check(self.negatives in ("teacher_student", "student_student"), method, "negatives",
               f"unknown negatives {self.negatives!r}; valid: teacher_student, student_student")
        _check(len(self.terms) > 0 and set(self.terms) <= {"intra", "inter"} and len(set(self.terms)) == len(self.terms),
               method, "terms", f"must be a non-empty subset of ('intra', 'inter'), got {self.terms!r}")


@register_method
class CKD(Method):
    name = "ckd"
    Options = CKDOptions

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        parts = losses.ckd_loss(student_out.logits, teacher_out.logits, temperature=o.temperature,
                                anchor=o.anchor, negatives=o.negatives, terms=tuple(o.terms),
                                inter_positive=o.inter_positive)
        terms = {"ce": o.ce_weight * F.cross_entropy(student_out.logits.float(), labels)}
        for term in o.terms:  # a switched-off term is not part of the objective
            terms[f"ckd_{term}"] = o.weight * getattr(parts, term)
        return terms


# ---------------------------------------------------------------------------------------------------------
# MCLD (methods.md §3) -- a reimplementation: no public code exists
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MCLDOptions:
    """MCLD (methods.md §3; our reimplementation, no public code exists): ``CE + λ_ins·L_ins + λ_sam·L_sam + w(epoch)·λ_cat·L_cat``.

    Defaults (ours, used throughout the study): τ=1, L2-normalised logits, no target mask, sample-wise term in
    the ``reverse`` direction, λ = 50 for each term, a 20-epoch linear warm-up of the category-wise term.
    ``components`` selects the terms (the component-grid ablation).
    """

    temperature: float = 1.0
    normalize: str = "l2"
    target_mask: str = "none"
    sample_mode: str = "reverse"
    lambda_instance: float = 50.0
    lambda_sample: float = 50.0
    lambda_category: float = 50.0
    warmup: float = 20.0
    components: tuple[str, ...] = ("instance", "sample", "category")
    ce_weight: float = 1.0

    def validate(self, method: str) -> None:
        _positive(method, temperature=self.temperature)
        _non_negative(method, lambda_instance=self.lambda_instance, lambda_sample=self.lambda_sample,
                      lambda_category=self.lambda_category, warmup=self.warmup, ce_weight=self.ce_weight)
        _check(self.normalize in ("l2", "zscore+l2"), method, "normalize",
               f"unknown normalisation {self.normalize!r}; valid: l2, zscore+l2")
        _check(self.target_mask in ("none", "same_label", "gt_logit"), method, "target_mask",
               f"unknown target mask {self.target_mask!r}; valid: none, same_label, gt_logit")
        _check(self.sample_mode in ("reverse", "label"), method, "sample_mode",
               f"unknown sample mode {self.sample_mode!r}; valid: reverse, label")
        valid = {"instance", "sample", "category"}
        _check(len(self.components) > 0 and set(self.components) <= valid, method, "components",
               f"must be a non-empty subset of {sorted(valid)}, got {self.components!r}")


@register_method
class MCLD(Method):
    name = "mcld"
    Options = MCLDOptions

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        s, t = student_out.logits, teacher_out.logits
        common = dict(labels=labels, temperature=o.temperature, normalize=o.normalize, target_mask=o.target_mask)
        terms = {"ce": o.ce_weight * F.cross_entropy(s.float(), labels)}
        if "instance" in o.components:
            terms["mcld_instance"] = o.lambda_instance * losses.mcld_instance_loss(s, t, **common)
        if "sample" in o.components:
            terms["mcld_sample"] = o.lambda_sample * losses.mcld_sample_loss(s, t, mode=o.sample_mode, **common)
        if "category" in o.components:
            warm = _warmup_factor(epoch, o.warmup)
            terms["mcld_category"] = warm * o.lambda_category * losses.mcld_category_loss(s, t, **common)
        return terms


# ---------------------------------------------------------------------------------------------------------
# DCD (methods.md §4)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCDOptions:
    """DCD: ``CE + L_con + 0.5·L_cons`` on 128-d projections of the pooled features (methods.md §4).

    Defaults: 128-d heads, learnable inverse temperature κ = min(exp(θ), 10), θ initialised to 1, consistency
    weight 0.5, CE weight 1, no KD, and a learnable bias b (which
    provably gets zero gradient; kept for fidelity). ``fixed_temperature=τ`` replaces κ by 1/τ (divides, unlike
    the released code). ``kd_weight`` > 0 adds Hinton KD (τ=``kd_temperature``): that is DCD+KD.
    """

    embed_dim: int = 128
    init_log_inv_temperature: float = 1.0
    max_inv_temperature: float = 10.0
    fixed_temperature: float | None = None
    consistency_weight: float = 0.5
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0

    def validate(self, method: str) -> None:
        _check(isinstance(self.embed_dim, int) and self.embed_dim >= 1, method, "embed_dim",
               f"must be a positive integer, got {self.embed_dim!r}")
        _positive(method, max_inv_temperature=self.max_inv_temperature, kd_temperature=self.kd_temperature)
        if self.fixed_temperature is not None:
            _positive(method, fixed_temperature=self.fixed_temperature)
        _non_negative(method, consistency_weight=self.consistency_weight, ce_weight=self.ce_weight,
                      kd_weight=self.kd_weight)
        _check(math.isfinite(self.init_log_inv_temperature), method, "init_log_inv_temperature", "must be finite")


@register_method
class DCD(Method):
    name = "dcd"
    Options = DCDOptions
    teacher_outputs = frozenset({"pooled", "logits"})  # logits: the optional KD term (kd_weight > 0)

    def __init__(self, student, teacher, options, num_train, train_labels=None):
        super().__init__(student, teacher, options, num_train, train_labels)
        self.head_student = nn.Linear(student.pooled_dim, options.embed_dim)
        self.head_teacher = nn.Linear(teacher.pooled_dim, options.embed_dim)
        self.log_inv_temperature = nn.Parameter(torch.tensor(float(options.init_log_inv_temperature)))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        o = self.options
        parts = losses.dcd_loss(self.head_student(student_out.pooled.float()),
                                self.head_teacher(teacher_out.pooled.detach().float()),
                                self.log_inv_temperature, self.bias, fixed_temperature=o.fixed_temperature,
                                max_inv_temperature=o.max_inv_temperature, consistency_weight=o.consistency_weight)
        terms = {"ce": o.ce_weight * F.cross_entropy(student_out.logits.float(), labels),
                 "dcd_contrastive": parts.contrastive, "dcd_consistency": parts.consistency}
        if o.kd_weight > 0:
            terms["kd"] = o.kd_weight * losses.kd_loss(student_out.logits, teacher_out.logits, o.kd_temperature)
        return terms

    def epoch_metrics(self) -> dict[str, float]:
        """``dcd_kappa``: the inverse temperature the loss uses now, κ = min(exp θ, κ_max), or 1/τ when fixed."""
        o = self.options
        if o.fixed_temperature is not None:
            return {"dcd_kappa": 1.0 / o.fixed_temperature}
        return {"dcd_kappa": min(math.exp(float(self.log_inv_temperature.detach())), o.max_inv_temperature)}


@dataclass(frozen=True)
class DCDKDOptions(DCDOptions):
    """DCD+KD (methods.md §4): ``CE + KD(τ=4) + L_DCD``; defaults as DCD with ``kd_weight`` 1."""

    kd_weight: float = 1.0


@register_method
class DCDKD(DCD):
    name = "dcd_kd"
    Options = DCDKDOptions
    teacher_outputs = frozenset({"pooled", "logits"})
