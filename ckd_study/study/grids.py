"""The study's grids as data: per preset a :class:`StudySpec`, turned into ``(labels, RunConfig)``
entries by :func:`experiment_configs`; labels, published numbers and the study's errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..published import PUBLISHED
from ..config import LOW_LR_STUDENTS, PRESETS, RunConfig, make_config
from ..runs import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = ("01_teachers", "02_main_table", "03_ablation_batch_size", "04_ablation_temperature",
             "05_ablation_intra_inter", "06_tsne", "07_correlation")
EXPERIMENTS = ("teachers", "main", "batch_size", "temperature", "intra_inter", "tsne", "correlation")

METHOD_LABELS = {"ce": "CE (student alone)", "kd": "KD", "dkd": "DKD", "kd_ls": "KD+LS", "dkd_ls": "DKD+LS",
                 "crd": "CRD", "ckd": "CKD", "mcld": "MCLD (our reimpl.)", "dcd": "DCD", "dcd_kd": "DCD+KD",
                 "ckd@ckd_released": "CKD (released recipe)"}
DATASET_LABELS = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10",
                  "digits": "sklearn digits (8×8 upsampled to 32×32)"}
TOP1 = "last-epoch top-1 (%)"
BEST = "best-epoch top-1 (%)"

PAPER_PAIRS: tuple[tuple[str, str], ...] = tuple(PUBLISHED)  # methods.md §0, same family first


class StudyError(RuntimeError):
    """The study cannot build a table or figure; the message says what is missing and how to produce it."""


class MissingRunsError(StudyError):
    """Runs (or derived analysis files) needed by a builder are not in the store; ``run_ids`` lists them."""

    def __init__(self, message: str, run_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.run_ids = list(run_ids)


# ---------------------------------------------------------------------------------------------------------
# The grids, per preset (data)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StudySpec:
    """Every experiment grid of one preset.

    pairs                 (teacher, student) pairs of the main table (and of the teachers notebook)
    seeds                 seeds of the main table
    main_methods          methods of the main table (rows, in order)
    recipe_rows           extra main-table rows (method, recipe of config.RECIPES), keyed ``method@recipe``:
                          a method under its authors' own budget beside the common one
    ablation_seeds        seeds of the ablations (notebooks 03–05)
    batch_sizes           batch-size ablation; lr = recipe lr × batch / ``reference_batch_size`` (linear rule)
    batch_size_methods    methods of the batch-size ablation
    temperatures          CKD temperatures τ of the temperature ablation
    dcd_fixed_temperatures DCD fixed τ, beside DCD's learnable temperature
    ckd_terms             CKD loss terms switched on, per intra/inter-ablation variant
    ckd_extra_variants    further (label, CKD options) rows of the intra/inter ablation (e.g. inter only
                          without the positive pair, the paper's Σ_{j≠i})
    ckd_anchor_negatives  (anchor, negatives) cells of CKD's anchor × negatives grid (empty: no grid); with
                          student–student negatives the anchor does not change the loss, so one cell stands for all
    temperature_control   beside CKD's fixed-λ temperature series, a control series with λ_CL·τ held constant
                          (λ = λ₀·τ₀/τ from the pair's defaults), as methods.md §2 and the ablation issue word it
    temperature_gradient_control  a second control series with λ_CL/τ held constant (λ = λ₀·τ/τ₀): the
                          prefactor of the contrastive term's gradient, (λ/τ)(softmax − one-hot), is then the
                          default's at every τ. The fixed-λ series changes that prefactor by τ₀/τ and the λ·τ
                          series by (τ₀/τ)², so only this one separates the temperature from the loss weight
    mcld_grid             (label, MCLD options) of the MCLD component ablation; ``{}`` is the default MCLD
    analysis_methods      students shown by t-SNE and the correlation figure (runs of ``analysis_seed``)
    tsne_classes, tsne_per_class  the fixed t-SNE test subset (None: all classes / all test images of a class)
    analysis_seed         seed of the analysed runs and of the t-SNE subset and embedding
    show_published        put methods.md §5 numbers beside ours (only meaningful for the full benchmark budget)
    ablation_pair         the one pair of the ablations, t-SNE and correlation (None: the first of ``pairs``)
    """

    pairs: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...]
    main_methods: tuple[str, ...]
    ablation_seeds: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    batch_size_methods: tuple[str, ...]
    temperatures: tuple[float, ...]
    dcd_fixed_temperatures: tuple[float, ...]
    mcld_grid: tuple[tuple[str, Mapping[str, Any]], ...]
    ckd_terms: tuple[tuple[str, ...], ...] = (("intra",), ("inter",), ("intra", "inter"))
    recipe_rows: tuple[tuple[str, str], ...] = (("ckd", "ckd_released"),)
    ckd_extra_variants: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    ckd_anchor_negatives: tuple[tuple[str, str], ...] = ()
    temperature_control: bool = False
    temperature_gradient_control: bool = False
    analysis_methods: tuple[str, ...] = ("ce", "kd", "crd", "ckd", "mcld", "dcd")
    tsne_classes: int | None = 20
    tsne_per_class: int | None = 50
    analysis_seed: int = 0
    reference_batch_size: int = 64
    show_published: bool = False
    ablation_pair: tuple[str, str] | None = None

    @property
    def pair(self) -> tuple[str, str]:
        """The pair of the ablations, t-SNE and the correlation figure (``ablation_pair``, else the first pair)."""
        return self.ablation_pair or self.pairs[0]


def _preset_pair(preset: str) -> tuple[str, str]:
    p = PRESETS[preset]
    return p["teacher_student"], p.get("student", RunConfig.student)


_MAIN_METHODS = ("ce", "kd", "dkd", "kd_ls", "crd", "ckd", "mcld", "dcd", "dcd_kd")
INTER_WITHOUT_POSITIVE = "inter only, without the positive (Σ_{j≠i})"
_CKD_EXTRA_VARIANTS = ((INTER_WITHOUT_POSITIVE, {"terms": ["inter"], "inter_positive": False}),)
_CKD_ANCHOR_NEGATIVES = (("teacher", "teacher_student"), ("student", "teacher_student"), ("both", "teacher_student"),
                         ("teacher", "student_student"))
CKD_DEFAULT_CELL = ("teacher", "teacher_student")  # the released code's choice

STUDY: dict[str, StudySpec] = {
    # Seconds per run on a CPU (digits): the smallest grids that still exercise every table and figure.
    "smoke": StudySpec(
        pairs=(_preset_pair("smoke"),),
        seeds=(0,),
        main_methods=_MAIN_METHODS,
        ablation_seeds=(0,),
        batch_sizes=(16, 32),
        batch_size_methods=("kd", "ckd"),
        reference_batch_size=16,  # smoke only: the rule is anchored at the preset's batch, so batch 16 reuses
                                  # the main-table runs (lr 0.05 × batch / 16); quick and paper use 0.05 at 64
        temperatures=(0.5, 1.0),
        dcd_fixed_temperatures=(0.1,),
        mcld_grid=(("all three terms (default)", {}),
                   ("instance only", {"components": ["instance"]}),
                   ("target mask same_label", {"target_mask": "same_label"})),
        tsne_classes=None,
        tsne_per_class=None,
        ckd_extra_variants=_CKD_EXTRA_VARIANTS,
        ckd_anchor_negatives=_CKD_ANCHOR_NEGATIVES,
        temperature_control=True,
        temperature_gradient_control=True,
    ),
    # One pair on the CIFAR-100 subset; sized for a ~40-minute CPU budget (counts are data: tune them here).
    # The CKD anchor × negatives grid, inter without the positive and the λ·τ control series are off here: at
    # this budget their effects are below the seed spread; they run in smoke (pipeline), medium and paper.
    "quick": StudySpec(
        pairs=(_preset_pair("quick"),),
        seeds=(0, 1),
        main_methods=_MAIN_METHODS,
        ablation_seeds=(0,),
        batch_sizes=(32, 64, 128),
        batch_size_methods=("kd", "ckd", "dcd"),
        temperatures=(0.25, 1.0, 4.0),
        dcd_fixed_temperatures=(0.07, 0.5),
        mcld_grid=(("all three terms (default)", {}),
                   ("instance only", {"components": ["instance"]}),
                   ("no category term", {"components": ["instance", "sample"]}),
                   ("target mask same_label", {"target_mask": "same_label"}),
                   ("target mask gt_logit", {"target_mask": "gt_logit"}),
                   ("no warm-up", {"warmup": 0})),
        tsne_classes=20,
        tsne_per_class=None,
    ),
    # The full benchmark of methods.md §0: every pair, 3 seeds, the full grids.
    "paper": StudySpec(
        pairs=PAPER_PAIRS,
        seeds=(0, 1, 2),
        main_methods=("ce", "kd", "dkd", "kd_ls", "dkd_ls", "crd", "ckd", "mcld", "dcd", "dcd_kd"),
        ablation_seeds=(0, 1, 2),
        batch_sizes=(16, 32, 64, 128, 256),
        batch_size_methods=("kd", "ckd", "dcd"),
        temperatures=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
        dcd_fixed_temperatures=(0.07, 0.1, 0.5),
        mcld_grid=(("all three terms (default)", {}),
                   ("instance only", {"components": ["instance"]}),
                   ("sample only", {"components": ["sample"]}),
                   ("category only", {"components": ["category"]}),
                   ("instance + sample", {"components": ["instance", "sample"]}),
                   ("instance + category", {"components": ["instance", "category"]}),
                   ("sample + category", {"components": ["sample", "category"]}),
                   ("target mask same_label", {"target_mask": "same_label"}),
                   ("target mask gt_logit", {"target_mask": "gt_logit"}),
                   ("sample-wise mode label", {"sample_mode": "label"}),
                   ("normalise zscore+l2", {"normalize": "zscore+l2"}),
                   ("no warm-up", {"warmup": 0})),
        tsne_classes=20,
        tsne_per_class=50,
        show_published=True,
        ablation_pair=_preset_pair("paper"),
        ckd_extra_variants=_CKD_EXTRA_VARIANTS,
        ckd_anchor_negatives=_CKD_ANCHOR_NEGATIVES,
        temperature_control=True,
        temperature_gradient_control=True,
    ),
}


# Full CIFAR-100 at a short budget (PRESETS["medium"]): quick's grids on the pair the CPU reproduction trains (its
# teacher is reused), 2 seeds for the ablations too, the claims' series on, the shortest MCLD grid, no recipe row.
# Sized from the measured speed: README "Presets".
STUDY["medium"] = dataclasses.replace(
    STUDY["quick"],
    pairs=(_preset_pair("medium"),),
    ablation_seeds=(0, 1),
    mcld_grid=STUDY["quick"].mcld_grid[:3],
    recipe_rows=(),
    tsne_per_class=50,
    ckd_extra_variants=_CKD_EXTRA_VARIANTS,
    ckd_anchor_negatives=_CKD_ANCHOR_NEGATIVES,
    temperature_control=True,
    temperature_gradient_control=True,
)


def study_spec(preset: str) -> StudySpec:
    if preset not in STUDY:
        raise StudyError(f"no study grid for preset {preset!r}; valid: {', '.join(STUDY)}")
    return STUDY[preset]


# ---------------------------------------------------------------------------------------------------------
# Experiments -> (labels, RunConfig) entries
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One cell of an experiment grid: display labels plus the config that produces it."""

    labels: dict[str, Any]
    config: RunConfig


def pair_label(teacher: str, student: str) -> str:
    return f"{teacher} → {student}"


def recipe_lr(student: str) -> float:
    """The benchmark recipe's lr at batch 64: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students, else 0.05."""
    return 0.01 if student in LOW_LR_STUDENTS else 0.05


def scaled_lr(student: str, batch_size: int, reference_batch_size: int = 64) -> float:
    """Linear scaling rule: ``recipe lr × batch_size / reference_batch_size`` (0.05 at 64 for most students)."""
    return recipe_lr(student) * batch_size / reference_batch_size


def _config(preset: str, method: str, pair: tuple[str, str], seed: int, **kwargs: Any) -> RunConfig:
    teacher, student = pair
    return make_config(preset, method=method, teacher=teacher if method != "ce" else None, student=student,
                       seed=seed, **kwargs)


def _base_labels(pair: tuple[str, str], method: str, seed: int, **extra: Any) -> dict[str, Any]:
    return {"pair": pair_label(*pair), "teacher": pair[0], "student": pair[1], "method": method,
            "method_label": METHOD_LABELS.get(method, method), "seed": seed, **extra}


def _batch_size_config(preset: str, method: str, pair, seed: int, batch_size: int, spec: StudySpec) -> RunConfig:
    lr = scaled_lr(pair[1], batch_size, spec.reference_batch_size)
    recipe = _config(preset, method, pair, seed, batch_size=batch_size)
    if math.isclose(recipe.base_lr, lr) and recipe.lr is None:
        return recipe  # the recipe config trains with exactly this lr: share its run (e.g. the main table's)
    return _config(preset, method, pair, seed, batch_size=batch_size, lr=lr)


def experiment_configs(preset: str, experiment: str, spec: StudySpec | None = None) -> list[Entry]:
    """The grid of one experiment (one of :data:`EXPERIMENTS`) as ``Entry(labels, config)``, in display order."""
    spec = spec or study_spec(preset)
    pair = spec.pair
    out: list[Entry] = []
    if experiment == "teachers":
        seen: dict[str, Entry] = {}
        for p in spec.pairs:
            teacher = _config(preset, "kd", p, 0).teacher
            if teacher.run_id in seen:
                seen[teacher.run_id].labels["pairs"].append(pair_label(*p))
                seen[teacher.run_id].labels["students"].append(p[1])
            else:  # "pairs" for display, "students" (model names) to look things up by
                seen[teacher.run_id] = Entry({"teacher": p[0], "method": "ce", "seed": teacher.seed,
                                              "pairs": [pair_label(*p)], "students": [p[1]]}, teacher)
        out = list(seen.values())
    elif experiment == "main":
        out = [Entry(_base_labels(p, m, s), _config(preset, m, p, s))
               for p in spec.pairs for m in spec.main_methods for s in spec.seeds]
        out += [Entry(_base_labels(p, f"{m}@{r}", s, recipe=r), _config(preset, m, p, s, recipe=r))
                for p in spec.pairs for m, r in spec.recipe_rows for s in spec.seeds]
    elif experiment == "batch_size":
        for m in spec.batch_size_methods:
            for b in spec.batch_sizes:
                for s in spec.ablation_seeds:
                    cfg = _batch_size_config(preset, m, pair, s, b, spec)
                    out.append(Entry(_base_labels(pair, m, s, batch_size=b, lr=cfg.base_lr), cfg))
    elif experiment == "temperature":
        for t in spec.temperatures:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "ckd", pair, s, method_options={"temperature": t})
                out.append(Entry(_base_labels(pair, "ckd", s, setting=f"τ = {t:g}", temperature=t,
                                              learnable=False, series=FIXED_WEIGHT), cfg))
        defaults = _config(preset, "ckd", pair, 0).method_options
        weight0, tau0 = float(defaults["weight"]), float(defaults["temperature"])
        controls = [(CONSTANT_PRODUCT, lambda t: weight0 * tau0 / t)] if spec.temperature_control else []
        if spec.temperature_gradient_control:
            controls.append((CONSTANT_RATIO, lambda t: weight0 * t / tau0))
        for series, weight_at in controls:
            for t in spec.temperatures:
                weight = weight_at(t)
                for s in spec.ablation_seeds:
                    options = {"temperature": t} if math.isclose(t, tau0) else {"temperature": t, "weight": weight}
                    cfg = _config(preset, "ckd", pair, s, method_options=options)
                    out.append(Entry(_base_labels(pair, "ckd", s, setting=f"τ = {t:g}, λ = {weight:g}",
                                                  temperature=t, learnable=False, series=series), cfg))
        for t in (None, *spec.dcd_fixed_temperatures):
            for s in spec.ablation_seeds:
                cfg = _config(preset, "dcd", pair, s, method_options={"fixed_temperature": t})
                setting = "learnable τ (κ = min(exp θ, 10))" if t is None else f"fixed τ = {t:g}"
                out.append(Entry(_base_labels(pair, "dcd", s, setting=setting,
                                              temperature=float("nan") if t is None else t,
                                              learnable=t is None, series="DCD"), cfg))
    elif experiment == "intra_inter":
        for terms in spec.ckd_terms:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "ckd", pair, s, method_options={"terms": list(terms)})
                out.append(Entry(_base_labels(pair, "ckd", s, ablation=CKD_INTRA_INTER,
                                              variant=CKD_TERM_VARIANTS.get(tuple(terms), "+".join(terms)),
                                              change=f"terms={list(terms)}"), cfg))
        for label, options in spec.ckd_extra_variants:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "ckd", pair, s, method_options=dict(options))
                out.append(Entry(_base_labels(pair, "ckd", s, ablation=CKD_INTRA_INTER, variant=label,
                                              change=", ".join(f"{k}={v}" for k, v in options.items())), cfg))
        for anchor, negatives in spec.ckd_anchor_negatives:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "ckd", pair, s, method_options={"anchor": anchor, "negatives": negatives})
                out.append(Entry(_base_labels(pair, "ckd", s, ablation=ANCHOR_NEGATIVES,
                                              variant=anchor_negatives_label(anchor, negatives),
                                              change=f"anchor={anchor}, negatives={negatives}"), cfg))
        for label, options in spec.mcld_grid:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "mcld", pair, s, method_options=dict(options))
                change = ", ".join(f"{k}={v}" for k, v in options.items()) or MCLD_DEFAULTS
                out.append(Entry(_base_labels(pair, "mcld", s, ablation=MCLD_COMPONENTS,
                                              variant=label, change=change), cfg))
        for m in ("ce", "kd"):  # references drawn on the figure (shared with the main table)
            for s in spec.ablation_seeds:
                out.append(Entry(_base_labels(pair, m, s, ablation="reference", variant=METHOD_LABELS[m],
                                              change=""), _config(preset, m, pair, s)))
    elif experiment in ("tsne", "correlation"):
        out = [Entry(_base_labels(pair, m, spec.analysis_seed), _config(preset, m, pair, spec.analysis_seed))
               for m in spec.analysis_methods]
    else:
        raise StudyError(f"unknown experiment {experiment!r}; valid: {', '.join(EXPERIMENTS)}")
    return out


FIXED_WEIGHT = "CKD, λ_CL fixed"
CONSTANT_PRODUCT = "CKD, λ_CL·τ constant (control)"
CONSTANT_RATIO = "CKD, λ_CL/τ constant (gradient-matched)"
ANCHOR_NEGATIVES = "CKD: anchor × negatives"
# The intra/inter notebook's ablations and the variant each is measured against: one definition, used by the grid
# and by the table, so that renaming a caption cannot silently empty a column.
CKD_INTRA_INTER = "CKD: intra vs inter"
CKD_TERM_VARIANTS = {("intra",): "intra only (alignment)", ("inter",): "inter only (contrast)",
                     ("intra", "inter"): "intra + inter (full CKD)"}
MCLD_COMPONENTS = "MCLD components (our reimpl.)"
MCLD_DEFAULTS = "defaults"


def anchor_negatives_label(anchor: str, negatives: str) -> str:
    """A cell of CKD's anchor × negatives grid, in words (student–student negatives: the anchor is moot)."""
    if negatives == "student_student":
        return "student–student negatives (any anchor)"
    released = " (released)" if (anchor, negatives) == CKD_DEFAULT_CELL else ""
    side = {"teacher": "teacher anchor", "student": "student anchor", "both": "both anchors (mean)"}[anchor]
    return f"{side}, teacher–student negatives{released}"


def _unique_configs(entries: Sequence[Entry]) -> list[RunConfig]:
    """The distinct configs of ``entries`` plus their teachers (teachers first), in order."""
    seen: dict[str, RunConfig] = {}
    for e in entries:
        if e.config.teacher is not None:
            seen.setdefault(e.config.teacher.run_id, e.config.teacher)
    for e in entries:
        seen.setdefault(e.config.run_id, e.config)
    return list(seen.values())
