"""The study layer: every experiment of the study as data, one builder per notebook, and batch execution.

The notebooks in ``notebooks/`` are thin: a ``parameters`` cell (``preset``, ``train``, ``results_dir``,
``figures_dir``) and a call to one builder of this module. Everything they show is produced here, so it can
also be rebuilt without Jupyter::

    python -m ckd_study.study reproduce --preset quick   # run every notebook (papermill), training what is missing
    python -m ckd_study.study figures --preset quick     # rebuild every table and figure from the store, no training
    python -m ckd_study.study plan --preset quick        # the runs of every notebook and whether they are stored
    python -m ckd_study.study strip notebooks/*.ipynb    # remove outputs from notebooks before committing

Grids are data: :data:`STUDY` maps each preset to a :class:`StudySpec` (pairs, seeds, methods, batch sizes,
temperatures, the MCLD component grid, the t-SNE subset...). :func:`experiment_configs` turns a spec into
``(labels, RunConfig)`` entries via :func:`ckd_study.config.make_config`, so the same experiment always maps to the
same run ids, and runs shared between notebooks (the CKD run at its default temperature, the main-table runs used
by t-SNE and the correlation figure...) are trained once.

Builders (``build_teachers``, ``build_main_table``, ``build_batch_size_ablation``, ``build_temperature_ablation``,
``build_intra_inter_ablation``, ``build_tsne``, ``build_correlation``) take ``train``: with ``train=True`` they call
:func:`ckd_study.runs.run` for each config (trains, resumes, or returns the stored summary); with ``train=False``
they only read the store and raise :class:`MissingRunsError` naming every missing run. They write their tables
(CSV + Markdown, + LaTeX for the main table) and figures (PNG + PDF) to ``<figures>/<preset>/`` and return a
:class:`StudyResult`.

t-SNE and the correlation figure need model weights, which are not committed. Their builders derive small files
from the checkpoints once (t-SNE coordinates, class-mean logit matrices, metrics) under
``<results>/analysis/<preset>/``, with the checkpoint's sha256 prefix in the file name; figures are always drawn
from those files, so with them present no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import analysis
from .campaign import CAMPAIGN_METHODS
from .published import PUBLISHED
from .config import (LOW_LR_STUDENTS, PRECISIONS, PRESETS, RECIPES, ConfigError, RunConfig, available_presets,
                     make_config, setting_label)
from .methods import MethodError
from .runs import REPO_ROOT, RunError, RunStore, atomic_write_json, read_json

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
    ),
    # One pair on the CIFAR-100 subset; sized for a ~40-minute CPU budget (counts are data: tune them here).
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
    ),
}


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
            else:
                seen[teacher.run_id] = Entry({"teacher": p[0], "method": "ce", "seed": teacher.seed,
                                              "pairs": [pair_label(*p)]}, teacher)
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
                                              learnable=False), cfg))
        for t in (None, *spec.dcd_fixed_temperatures):
            for s in spec.ablation_seeds:
                cfg = _config(preset, "dcd", pair, s, method_options={"fixed_temperature": t})
                setting = "learnable τ (κ = min(exp θ, 10))" if t is None else f"fixed τ = {t:g}"
                out.append(Entry(_base_labels(pair, "dcd", s, setting=setting,
                                              temperature=float("nan") if t is None else t,
                                              learnable=t is None), cfg))
    elif experiment == "intra_inter":
        names = {("intra",): "intra only (alignment)", ("inter",): "inter only (contrast)",
                 ("intra", "inter"): "intra + inter (full CKD)"}
        for terms in spec.ckd_terms:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "ckd", pair, s, method_options={"terms": list(terms)})
                out.append(Entry(_base_labels(pair, "ckd", s, ablation="CKD: intra vs inter",
                                              variant=names.get(tuple(terms), "+".join(terms)),
                                              change=f"terms={list(terms)}"), cfg))
        for label, options in spec.mcld_grid:
            for s in spec.ablation_seeds:
                cfg = _config(preset, "mcld", pair, s, method_options=dict(options))
                change = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
                out.append(Entry(_base_labels(pair, "mcld", s, ablation="MCLD components (our reimpl.)",
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


def _unique_configs(entries: Sequence[Entry]) -> list[RunConfig]:
    """The distinct configs of ``entries`` plus their teachers (teachers first), in order."""
    seen: dict[str, RunConfig] = {}
    for e in entries:
        if e.config.teacher is not None:
            seen.setdefault(e.config.teacher.run_id, e.config.teacher)
    for e in entries:
        seen.setdefault(e.config.run_id, e.config)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------------------
# Reading and producing runs
# ---------------------------------------------------------------------------------------------------------
def _store(store: RunStore | str | Path | None) -> RunStore:
    return store if isinstance(store, RunStore) else RunStore(store)


def figures_dir_for(preset: str, figures_dir: str | Path | None = None) -> Path:
    """``<base>/<preset>``; base = ``figures_dir``, else ``$CKD_FIGURES_DIR``, else ``<repo>/figures``."""
    base = figures_dir or os.environ.get("CKD_FIGURES_DIR") or REPO_ROOT / "figures"
    return Path(base) / preset


def analysis_dir_for(store: RunStore, preset: str) -> Path:
    """Where derived analysis files (t-SNE coordinates, class-mean logits, metrics) live: results/analysis/<preset>."""
    return store.root / "analysis" / preset


def _options_changed(config: RunConfig) -> dict[str, Any]:
    from .methods import resolve_options

    defaults = resolve_options(config.method, {})
    return {k: v for k, v in config.method_options.items() if defaults.get(k) != v}


def describe_run(config: RunConfig) -> str:
    """``method=kd teacher=resnet32 student=resnet8 seed=0 batch=64 lr=0.05 options={...}`` (non-default options)."""
    parts = [f"method={config.method}"]
    if config.teacher is not None:
        parts.append(f"teacher={config.teacher.student}")
    parts += [f"student={config.student}", f"seed={config.seed}", f"epochs={config.epochs}",
              f"batch={config.batch_size}", f"lr={config.base_lr:g}"]
    changed = _options_changed(config)
    if changed:
        parts.append(f"options={json.dumps(changed, sort_keys=True)}")
    return " ".join(parts)


def _how_to_produce(preset: str) -> str:
    return (f"Produce them with `make reproduce PRESET={preset}` (or `python -m ckd_study.study reproduce --preset "
            f"{preset}`), or call the builder with train=True; `python -m ckd_study.study plan --preset {preset}` "
            f"lists every run of the study and its status.")


def ensure_runs(entries: Sequence[Entry], *, preset: str, what: str, store: RunStore, train: bool,
                verbose: bool = True, device: Any = None) -> dict[str, dict]:
    """The summaries of every config of ``entries`` (and their teachers), by run id.

    ``train=True`` trains (or resumes) what is missing via :func:`ckd_study.runs.run`; ``train=False`` raises
    :class:`MissingRunsError` listing every missing run with its method and options.
    """
    configs = _unique_configs(entries)
    summaries: dict[str, dict] = {}
    missing = [c for c in configs if store.summary(c.run_id) is None]
    if missing and not train:
        lines = [f"  - {c.run_id}  ({describe_run(c)}; status: {store.status(c.run_id)})" for c in missing]
        raise MissingRunsError(
            f"{what} (preset {preset!r}) needs {len(missing)} of its {len(configs)} runs that have not finished in "
            f"the results store {store.root}:\n" + "\n".join(lines) + "\n" + _how_to_produce(preset),
            [c.run_id for c in missing])
    from .runs import run

    for i, config in enumerate(configs, start=1):
        stored = store.summary(config.run_id)
        if stored is None:
            if verbose:
                print(f"[{what}] training {i}/{len(configs)}: {config.run_id} ({describe_run(config)})", flush=True)
            started = time.perf_counter()
            stored = run(config, store=store, quiet=True, device=device)
            if verbose:
                print(f"    finished in {time.perf_counter() - started:.0f} s: last-epoch top-1 "
                      f"{stored['last_top1']:.2f}%", flush=True)
        summaries[config.run_id] = stored
    if verbose:
        trained = len(missing)
        print(f"[{what}] {len(configs)} runs ({trained} trained now, {len(configs) - trained} read from {store.root})",
              flush=True)
    return summaries


def _run_rows(entries: Sequence[Entry], summaries: Mapping[str, dict]):
    import pandas as pd

    rows = []
    for e in entries:
        c, s = e.config, summaries[e.config.run_id]
        rows.append({**{k: v for k, v in e.labels.items() if k != "pairs"}, "run_id": c.run_id,
                     "last_top1": s["last_top1"], "best_top1": s["best_top1"], "best_epoch": s["best_epoch"],
                     "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.base_lr,
                     "teacher_top1": s.get("teacher_top1"), "wall_time_s": round(float(s["wall_time_s"]), 1)})
    return pd.DataFrame(rows)


@dataclass
class _RunSet:
    """What every builder starts from: the spec, store and output folder, the experiment's entries, their
    summaries (trained or read) and one row per run."""

    spec: StudySpec
    store: RunStore
    out: Path
    entries: list[Entry]
    summaries: dict[str, dict]
    runs: Any

    @property
    def first(self) -> RunConfig:
        return self.entries[0].config


def _collect(preset: str, experiment: str, what: str, *, store, figures_dir, spec, train: bool, verbose: bool,
             device: Any) -> _RunSet:
    spec = spec or study_spec(preset)
    store = _store(store)
    entries = experiment_configs(preset, experiment, spec)
    summaries = ensure_runs(entries, preset=preset, what=what, store=store, train=train, verbose=verbose,
                            device=device)
    return _RunSet(spec, store, figures_dir_for(preset, figures_dir), entries, summaries,
                      _run_rows(entries, summaries))


def _top1_columns(agg) -> dict[str, list[str]]:
    """The last- and best-epoch top-1 columns, mean ± std, of an aggregate from ``analysis.mean_std_table``."""
    return {column: [analysis.format_mean_std(m, s) for m, s in zip(agg[f"{key}_mean"], agg[f"{key}_std"])]
            for column, key in ((TOP1, "last_top1"), (BEST, "best_top1"))}


def _spread_table(named_parts, label: str):
    """One row per ``(name, aggregate part)``: how far the mean last-epoch top-1 moves across its settings."""
    import pandas as pd

    rows = []
    for name, part in named_parts:
        if not len(part):
            continue
        values = part["last_top1_mean"].astype(float)
        rows.append({label: name, "settings": len(part),
                     "min (%)": analysis.format_number(values.min()), "max (%)": analysis.format_number(values.max()),
                     "spread max − min (pp)": analysis.format_number(values.max() - values.min())})
    return pd.DataFrame(rows)


def data_description(config: RunConfig) -> str:
    name = DATASET_LABELS.get(config.dataset, config.dataset)
    if config.train_per_class is None and config.test_per_class is None:
        return name
    train = "all" if config.train_per_class is None else str(config.train_per_class)
    test = "all" if config.test_per_class is None else str(config.test_per_class)
    return f"{name}, {train} train / {test} test images per class"


def budget_description(config: RunConfig) -> str:
    return f"{config.epochs} epochs, {config.schedule} lr schedule"


def _seeds_text(seeds: Sequence[int]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(str(s) for s in seeds)})"


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """What a builder produced: the headline ``table`` (as displayed and saved), its caption, the per-run rows,
    and the paths of every table (``{name: {"csv":…, "md":…[, "tex":…]}}``) and figure (``{"png":…, "pdf":…}``)."""

    name: str
    preset: str
    table: Any
    caption: str
    runs: Any
    tables: dict[str, dict[str, Path]] = field(default_factory=dict)
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [p for group in (*self.tables.values(), *self.figures.values()) for p in group.values()]

    def show(self) -> None:
        """Display every table (Markdown, with its caption) and figure in a notebook; print the file paths."""
        from IPython.display import Image, Markdown, display

        for paths in self.tables.values():
            display(Markdown(Path(paths["md"]).read_text()))
        for paths in self.figures.values():
            display(Image(filename=str(paths["png"])))
        print("files written:\n" + "\n".join(f"  {p}" for p in self.files))


# ---------------------------------------------------------------------------------------------------------
# 01 teachers
# ---------------------------------------------------------------------------------------------------------
def build_teachers(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
                   figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
                   device: Any = None) -> StudyResult:
    """Notebook 01: train (or load) the teachers of the preset's pairs; table of their test accuracy and a
    figure of their test top-1 per epoch."""
    import pandas as pd

    run_set = _collect(preset, "teachers", "01_teachers", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, store, out, summaries = run_set.spec, run_set.store, run_set.out, run_set.summaries
    first = run_set.first
    rows, curves = [], {}
    for e in run_set.entries:
        cfg, s = e.config, summaries[e.config.run_id]
        published = [PUBLISHED.get((e.labels["teacher"], p.split(" → ")[1]), {}).get("teacher")
                     for p in e.labels["pairs"]] if spec.show_published else []
        published = next((v for v in published if v is not None), None)
        rows.append({"teacher": cfg.student, "used by (T → S)": ", ".join(e.labels["pairs"]), "seed": cfg.seed,
                     "epochs": cfg.epochs, TOP1: analysis.format_number(s["last_top1"]),
                     BEST: f"{analysis.format_number(s['best_top1'])} (epoch {s['best_epoch']})",
                     "published (%)": analysis.format_number(published), "run id": cfg.run_id})
        history = [r for r in store.metrics(cfg.run_id) if "test_top1" in r]
        curves[cfg.student] = ([r["epoch"] for r in history], [r["test_top1"] for r in history])
    table = pd.DataFrame(rows)
    caption = (f"Teachers, preset '{preset}': test top-1 (%) on {data_description(first)}; "
               f"{budget_description(first)}, batch {first.batch_size}, lr {first.base_lr:g}, one seed. "
               f"Last epoch is the headline; best epoch (max over epochs of the test accuracy) is optimistic."
               + (" Published: methods.md §5." if spec.show_published else
                  " Published numbers (methods.md §5) exist only for the full 240-epoch benchmark: '–'."))
    tables = {"teachers": analysis.save_table(table, out / "teachers", caption=caption)}
    figures = {"teachers": analysis.plot_curves(
        curves, out / "teachers", title=f"Teachers: test top-1 per epoch — {data_description(first)}, "
                                        f"preset {preset}, seed {first.seed}",
        xlabel="epoch", ylabel="test top-1 (%)")}
    return StudyResult("01_teachers", preset, table, caption, run_set.runs, tables, figures)


# ---------------------------------------------------------------------------------------------------------
# 02 main table
# ---------------------------------------------------------------------------------------------------------
def build_main_table(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
                     figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
                     device: Any = None) -> StudyResult:
    """Notebook 02: methods × pairs × seeds. Last-epoch top-1 mean ± std (headline), best-epoch beside it,
    the published number of methods.md §5 where one exists, and the gain over KD. CSV + Markdown + LaTeX."""
    import pandas as pd

    run_set = _collect(preset, "main", "02_main_table", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, out, summaries, runs, first = run_set.spec, run_set.out, run_set.summaries, run_set.runs, run_set.first
    agg = analysis.mean_std_table(runs, by=["pair", "teacher", "student", "method"])
    rows = []
    for p in spec.pairs:
        label = pair_label(*p)
        part = agg[agg["pair"] == label]
        published = PUBLISHED.get(p, {}) if spec.show_published else {}
        kd = part.loc[part["method"] == "kd", "last_top1_mean"]
        kd_mean = float(kd.iloc[0]) if len(kd) else float("nan")
        teacher_cfg = _config(preset, "kd", p, 0).teacher
        t = summaries.get(teacher_cfg.run_id)
        if t is not None:  # the reference row: the pair's teacher
            rows.append({"T → S": label, "method": f"Teacher ({p[0]})", "seeds": 1,
                         TOP1: analysis.format_mean_std(t["last_top1"]), BEST: analysis.format_mean_std(t["best_top1"]),
                         "published (%)": analysis.format_number(published.get("teacher")),
                         "Δ vs KD (pp)": analysis.MISSING})
        for _, r in part.iterrows():
            gain = r["last_top1_mean"] - kd_mean if r["method"] != "kd" else float("nan")
            rows.append({"T → S": label, "method": METHOD_LABELS.get(r["method"], r["method"]), "seeds": int(r["n"]),
                         TOP1: analysis.format_mean_std(r["last_top1_mean"], r["last_top1_std"]),
                         BEST: analysis.format_mean_std(r["best_top1_mean"], r["best_top1_std"]),
                         "published (%)": analysis.format_number(published.get(r["method"])),
                         "Δ vs KD (pp)": analysis.format_number(gain, signed=True)})
    table = pd.DataFrame(rows)
    caption = (f"Main table, preset '{preset}': test top-1 (%) on {data_description(first)}; "
               f"{budget_description(first)}, batch {first.batch_size}; every method under the same budget. "
               f"Headline: {TOP1}, mean ± std over {_seeds_text(spec.seeds)}; {BEST} (max over epochs of the "
               f"test accuracy, optimistic) beside it. Published: methods.md §5 (240-epoch CIFAR-100 benchmark, "
               f"the papers' own protocols)"
               + ("" if spec.show_published else "; none exist for this preset's budget and pair ('–')")
               + ". Δ vs KD: last-epoch mean minus KD's, in percentage points. MCLD is our reimplementation "
               "(no public code); CKD and MCLD have no citable published numbers."
               + "".join(f" {METHOD_LABELS.get(f'{m}@{r}', f'{m}@{r}')}: {RECIPES[r]['label']} "
                         f"({_config(preset, m, spec.pairs[0], 0, recipe=r).epochs} epochs here), not the common "
                         f"budget." for m, r in spec.recipe_rows))
    tables = {"main_table": analysis.save_table(table, out / "main_table", latex=True, caption=caption,
                                                label=f"tab:main-{preset}")}
    analysis.write_csv(runs, out / "main_table_runs.csv")
    plot = agg.assign(method_label=[METHOD_LABELS.get(m, m) for m in agg["method"]])
    reference = {pair_label(*p): {"KD": float(agg.loc[(agg["pair"] == pair_label(*p)) & (agg["method"] == "kd"),
                                                     "last_top1_mean"].mean())}
                 for p in spec.pairs}
    figures = {"main_table": analysis.plot_bars(
        plot, label="method_label", value="last_top1_mean", err="last_top1_std", group="pair",
        reference=reference, path_stem=out / "main_table", xlabel=f"{TOP1}, mean ± std",
        title=f"{data_description(first)}, preset {preset}: {TOP1}, mean ± std over {_seeds_text(spec.seeds)}")}
    return StudyResult("02_main_table", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg})


# ---------------------------------------------------------------------------------------------------------
# 03 batch size, 04 temperature, 05 intra/inter + MCLD grid
# ---------------------------------------------------------------------------------------------------------
def build_batch_size_ablation(preset: str = "quick", *, train: bool = True,
                              store: RunStore | str | Path | None = None, figures_dir: str | Path | None = None,
                              spec: StudySpec | None = None, verbose: bool = True, device: Any = None) -> StudyResult:
    """Notebook 03: CKD (and KD, DCD for contrast) across batch sizes, lr scaled linearly with the batch size."""
    import pandas as pd

    run_set = _collect(preset, "batch_size", "03_ablation_batch_size", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, out, runs, first = run_set.spec, run_set.out, run_set.runs, run_set.first
    agg = analysis.mean_std_table(runs, by=["method", "method_label", "batch_size", "lr"])
    table = pd.DataFrame({"method": agg["method_label"], "batch size": agg["batch_size"],
                          "lr": [f"{v:g}" for v in agg["lr"]], "seeds": agg["n"], **_top1_columns(agg)})
    rule = (f"lr = {recipe_lr(spec.pair[1]):g} × batch size / {spec.reference_batch_size} (linear scaling rule, "
            f"{recipe_lr(spec.pair[1]):g} at batch {spec.reference_batch_size})")
    caption = (f"Batch-size ablation, preset '{preset}', {pair_label(*spec.pair)}, {data_description(first)}, "
               f"{budget_description(first)}: {TOP1} mean ± std over {_seeds_text(spec.ablation_seeds)}. "
               f"Learning rate: {rule}. CKD claims independence from the batch size; KD and DCD for contrast.")
    spread = _spread_table(agg.groupby("method_label", sort=False), "method")
    spread_caption = (f"Spread of the mean {TOP1} across batch sizes {list(spec.batch_sizes)} "
                      f"({pair_label(*spec.pair)}, preset '{preset}'; {rule}).")
    tables = {"ablation_batch_size": analysis.save_table(table, out / "ablation_batch_size", caption=caption),
              "ablation_batch_size_spread": analysis.save_table(spread, out / "ablation_batch_size_spread",
                                                                caption=spread_caption)}
    analysis.write_csv(runs, out / "ablation_batch_size_runs.csv")
    figures = {"ablation_batch_size": analysis.plot_lines(
        agg, x="batch_size", y="last_top1_mean", yerr="last_top1_std", hue="method_label", logx=True,
        path_stem=out / "ablation_batch_size", xlabel=f"batch size (lr scaled linearly: {recipe_lr(spec.pair[1]):g} "
                                                      f"at {spec.reference_batch_size})",
        ylabel=f"{TOP1}", title=f"Batch-size ablation: {pair_label(*spec.pair)}, {data_description(first)}, "
                                f"preset {preset}, {_seeds_text(spec.ablation_seeds)}")}
    return StudyResult("03_ablation_batch_size", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg, "spread": spread})


def build_temperature_ablation(preset: str = "quick", *, train: bool = True,
                               store: RunStore | str | Path | None = None, figures_dir: str | Path | None = None,
                               spec: StudySpec | None = None, verbose: bool = True, device: Any = None
                               ) -> StudyResult:
    """Notebook 04: CKD across temperatures; DCD learnable vs fixed temperature; the spread max − min."""
    import pandas as pd

    run_set = _collect(preset, "temperature", "04_ablation_temperature", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, out, runs, first = run_set.spec, run_set.out, run_set.runs, run_set.first
    agg = analysis.mean_std_table(runs, by=["method", "method_label", "setting", "temperature", "learnable"])
    table = pd.DataFrame({"method": agg["method_label"], "temperature": agg["setting"], "seeds": agg["n"],
                          **_top1_columns(agg)})
    caption = (f"Temperature ablation, preset '{preset}', {pair_label(*spec.pair)}, {data_description(first)}, "
               f"{budget_description(first)}: {TOP1} mean ± std over {_seeds_text(spec.ablation_seeds)}. "
               f"CKD with τ ∈ {list(spec.temperatures)} (other options at their defaults); DCD with its learnable "
               f"inverse temperature and with fixed τ ∈ {list(spec.dcd_fixed_temperatures)}.")
    ckd = agg[agg["method"] == "ckd"]
    dcd = agg[agg["method"] == "dcd"]
    spread_rows = [("CKD, τ ∈ " + str(list(spec.temperatures)), ckd)]
    if len(dcd):
        spread_rows += [("DCD, learnable and fixed τ", dcd), ("DCD, fixed τ only", dcd[~dcd["learnable"]])]
    spread = _spread_table(spread_rows, "setting")
    spread_caption = (f"Does the method depend on the temperature? Spread (max − min) of the mean {TOP1} across "
                      f"temperatures, {pair_label(*spec.pair)}, preset '{preset}'. For scale: run-to-run spread on "
                      f"CIFAR-100 is typically 0.2–0.3 pp (methods.md §5).")
    tables = {"ablation_temperature": analysis.save_table(table, out / "ablation_temperature", caption=caption),
              "ablation_temperature_spread": analysis.save_table(spread, out / "ablation_temperature_spread",
                                                                 caption=spread_caption)}
    analysis.write_csv(runs, out / "ablation_temperature_runs.csv")
    learn = dcd[dcd["learnable"]]
    panels = [dict(data=ckd.assign(series="CKD"), x="temperature", y="last_top1_mean", yerr="last_top1_std",
                   hue="series", logx=True, xlabel="CKD temperature τ", ylabel=TOP1, title="CKD")]
    if len(dcd):
        fixed = dcd[~dcd["learnable"]].assign(series="DCD, fixed τ")
        hlines = {"DCD, learnable τ": (float(learn["last_top1_mean"].iloc[0]),
                                       float(learn["last_top1_std"].fillna(0).iloc[0]))} if len(learn) else {}
        panels.append(dict(data=fixed, x="temperature", y="last_top1_mean", yerr="last_top1_std", hue="series",
                           logx=True, xlabel="DCD fixed temperature τ", ylabel=TOP1, title="DCD", hlines=hlines))
    figures = {"ablation_temperature": analysis.plot_line_panels(
        panels, out / "ablation_temperature",
        title=f"Temperature ablation: {pair_label(*spec.pair)}, {data_description(first)}, preset {preset}, "
              f"{_seeds_text(spec.ablation_seeds)}")}
    return StudyResult("04_ablation_temperature", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg, "spread": spread})


def build_intra_inter_ablation(preset: str = "quick", *, train: bool = True,
                               store: RunStore | str | Path | None = None, figures_dir: str | Path | None = None,
                               spec: StudySpec | None = None, verbose: bool = True, device: Any = None
                               ) -> StudyResult:
    """Notebook 05: CKD with intra only / inter only / both; MCLD's component grid (one factor at a time)."""
    import pandas as pd

    run_set = _collect(preset, "intra_inter", "05_ablation_intra_inter", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, out, runs, first = run_set.spec, run_set.out, run_set.runs, run_set.first
    agg = analysis.mean_std_table(runs, by=["ablation", "variant", "change", "method"])
    refs = agg[agg["ablation"] == "reference"]
    grid = agg[agg["ablation"] != "reference"].copy()
    full = {"CKD: intra vs inter": grid.loc[grid["variant"] == "intra + inter (full CKD)", "last_top1_mean"],
            "MCLD components (our reimpl.)": grid.loc[grid["change"] == "defaults", "last_top1_mean"]}
    gains = []
    for _, r in grid.iterrows():
        ref = full.get(r["ablation"])
        gains.append(r["last_top1_mean"] - float(ref.iloc[0]) if ref is not None and len(ref) else float("nan"))
    table = pd.DataFrame({"ablation": grid["ablation"], "variant": grid["variant"], "options changed": grid["change"],
                          "seeds": grid["n"], **_top1_columns(grid),
                          "Δ vs full (pp)": [analysis.format_number(g, signed=True) for g in gains]})
    ref_text = "; ".join(f"{r['variant']} {analysis.format_mean_std(r['last_top1_mean'], r['last_top1_std'])}"
                         for _, r in refs.iterrows())
    caption = (f"Intra/inter and MCLD component ablation, preset '{preset}', {pair_label(*spec.pair)}, "
               f"{data_description(first)}, {budget_description(first)}: {TOP1} mean ± std over "
               f"{_seeds_text(spec.ablation_seeds)}. CKD = intra-sample alignment + inter-sample contrast "
               f"(methods.md §2); MCLD (our reimplementation) changes one option at a time from its defaults. "
               f"Δ: against the full method. References: {ref_text}.")
    tables = {"ablation_intra_inter": analysis.save_table(table, out / "ablation_intra_inter", caption=caption)}
    analysis.write_csv(runs, out / "ablation_intra_inter_runs.csv")
    reference = {r["variant"]: float(r["last_top1_mean"]) for _, r in refs.iterrows()}
    figures = {"ablation_intra_inter": analysis.plot_bars(
        grid, label="variant", value="last_top1_mean", err="last_top1_std", group="ablation", reference=reference,
        path_stem=out / "ablation_intra_inter", xlabel=f"{TOP1}, mean ± std",
        title=f"CKD intra/inter and MCLD components: {pair_label(*spec.pair)}, {data_description(first)}, "
              f"preset {preset}, {_seeds_text(spec.ablation_seeds)}")}
    return StudyResult("05_ablation_intra_inter", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg})


# ---------------------------------------------------------------------------------------------------------
# 06 t-SNE and 07 correlation: derived files from checkpoints, figures from the derived files
# ---------------------------------------------------------------------------------------------------------
def _analysed_runs(run_set: _RunSet, preset: str):
    """The analysed teacher and students as ``(panel name, config, summary)``: ``(teacher, [students])``."""
    teacher = _config(preset, "kd", run_set.spec.pair, run_set.spec.analysis_seed).teacher
    students = [(METHOD_LABELS.get(e.labels["method"], e.labels["method"]), e.config,
                 run_set.summaries[e.config.run_id]) for e in run_set.entries]
    return (f"Teacher ({teacher.student})", teacher, run_set.summaries[teacher.run_id]), students


def _tag(config: RunConfig, summary: Mapping[str, Any]) -> str:
    return f"{config.run_id}_{summary['final_sha256'][:8]}"


class _Outputs:
    """Test-set outputs of stored models, computed at most once per builder call."""

    def __init__(self, store: RunStore, device: Any) -> None:
        from .train import default_device

        self.store = store
        self.device = device if device is not None else default_device()
        self.cache: dict[str, dict] = {}

    def data(self, config: RunConfig):
        import torch

        from .runs import dataset_for

        return dataset_for(config, torch.device("cpu"))

    def __call__(self, config: RunConfig, indices=None) -> dict:
        key = config.run_id
        if key not in self.cache:
            from .train import predict

            data = self.data(config)
            model = self.store.load_model(config.run_id, device=self.device)
            outputs = predict(model, data.x_test, data.mean, data.std, keep=("logits", "pooled"))
            self.cache[key] = {"logits": outputs["logits"].numpy(), "pooled": outputs["pooled"].numpy(),
                               "labels": data.y_test.numpy()}
        out = self.cache[key]
        if indices is None:
            return out
        return {k: v[indices] for k, v in out.items()}


def _checkpoint_problem(store: RunStore, config: RunConfig) -> str | None:
    path = store.run_dir(config.run_id) / "checkpoints" / "final.pt"
    return None if path.exists() else f"its checkpoint {path} is missing (checkpoints are not committed)"


def _missing_derived(preset: str, what: str, problems: Sequence[tuple[RunConfig, str, Path]]) -> MissingRunsError:
    lines = [f"  - {c.run_id} ({describe_run(c)}): {p}; no derived file {f}" for c, p, f in problems]
    return MissingRunsError(
        f"{what} (preset {preset!r}) needs derived analysis files that are absent and cannot be computed:\n"
        + "\n".join(lines) + "\nRetrain those runs (move their folders away, then `make reproduce PRESET="
        f"{preset}`), or restore the checkpoints or the analysis files.", [c.run_id for c, _, _ in problems])


def build_tsne(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
               figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
               device: Any = None, features: str = "pooled") -> StudyResult:
    """Notebook 06: t-SNE of the students' pooled features (``features="logits"``: logits) on a fixed, seeded test
    subset, side by side for CE, KD and the contrastive methods (and the teacher), coloured by class; plus a
    table of the class separation (silhouette, cosine, in the full feature space)."""
    import numpy as np
    import pandas as pd

    if features not in ("pooled", "logits"):
        raise StudyError(f"features must be 'pooled' or 'logits', got {features!r}")
    run_set = _collect(preset, "tsne", "06_tsne", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, store, out = run_set.spec, run_set.store, run_set.out
    teacher, students = _analysed_runs(run_set, preset)
    folder = analysis_dir_for(store, preset) / "tsne"
    subset = f"{features}_c{spec.tsne_classes or 'all'}_n{spec.tsne_per_class or 'all'}_s{spec.analysis_seed}"
    outputs = _Outputs(store, device)
    panels, rows, problems = {}, [], []
    for name, config, summary in [teacher, *students]:
        path = folder / f"{_tag(config, summary)}_{subset}.csv"
        meta_path = path.with_suffix(".json")
        if not (path.exists() and meta_path.exists()):
            problem = _checkpoint_problem(store, config)
            if problem:
                problems.append((config, problem, path))
                continue
            data = outputs.data(config)
            idx = analysis.tsne_subset(data.y_test.numpy(), data.num_classes, spec.tsne_classes,
                                       spec.tsne_per_class, spec.analysis_seed)
            got = outputs(config, idx)
            coords = analysis.tsne_embedding(got[features], seed=spec.analysis_seed)
            frame = pd.DataFrame({"test_index": idx, "label": got["labels"], "x": coords[:, 0], "y": coords[:, 1]})
            analysis.write_csv(frame.round(5), path)
            atomic_write_json(meta_path, {"run_id": config.run_id, "final_sha256": summary["final_sha256"],
                                          "features": features, "feature_dim": int(got[features].shape[1]),
                                          "points": len(idx), "classes": int(len(np.unique(got["labels"]))),
                                          "silhouette_cosine": analysis.silhouette(got[features], got["labels"]),
                                          "seed": spec.analysis_seed})
            if verbose:
                print(f"[06_tsne] computed {path.name}", flush=True)
        frame = pd.read_csv(path)
        meta = read_json(meta_path)
        panels[f"{name}\n{analysis.format_number(summary['last_top1'])}% top-1"] = (
            frame[["x", "y"]].to_numpy(), frame["label"].to_numpy())
        rows.append({"model": name, TOP1: analysis.format_number(summary["last_top1"]),
                     "points": meta["points"], "classes": meta["classes"],
                     f"silhouette ({features}, cosine)": analysis.format_number(meta["silhouette_cosine"], 3),
                     "run id": config.run_id})
    if problems:
        raise _missing_derived(preset, "06_tsne", problems)
    table = pd.DataFrame(rows)
    first = students[0][1]
    classes = DATASET_CLASSES.get(first.dataset)
    subset_text = (f"{spec.tsne_classes or 'all'} classes × {spec.tsne_per_class or 'all'} test images per class "
                   f"(fixed subset, seed {spec.analysis_seed})")
    caption = (f"t-SNE inputs and class separation, preset '{preset}', {pair_label(*spec.pair)}, "
               f"{data_description(first)}: {subset_text}. Silhouette score of the classes in the {features} "
               f"feature space (cosine; higher = better separated). Runs of seed {spec.analysis_seed}.")
    tables = {"tsne_separation": analysis.save_table(table, out / "tsne_separation", caption=caption)}
    figures = {"tsne": analysis.plot_tsne_grid(
        panels, out / "tsne", class_names=classes(first) if classes else None,
        title=f"t-SNE of the {'pooled penultimate features' if features == 'pooled' else 'logits'} on "
              f"{data_description(first)} test images, {subset_text}; {pair_label(*spec.pair)}, preset {preset}, "
              f"seed {spec.analysis_seed}")}
    return StudyResult("06_tsne", preset, table, caption, run_set.runs, tables, figures)


def _class_names(config: RunConfig) -> list[str]:
    from .runs import dataset_for
    import torch

    return list(dataset_for(config, torch.device("cpu")).classes)


DATASET_CLASSES: dict[str, Callable[[RunConfig], list[str]] | None] = {"digits": None, "cifar100": _class_names,
                                                                      "cifar10": _class_names}


def build_correlation(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
                      figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
                      device: Any = None, zscore: bool = True, vmax: float = analysis.HEATMAP_VMAX) -> StudyResult:
    """Notebook 07: class-mean logit difference heatmaps ``|M_student − M_teacher|`` (zero diagonal, colour scale
    clipped at ``vmax`` = 3) on the test set, and the measurable quantities: mean/max difference, top-1 agreement
    with the teacher, KL(teacher ‖ student), linear CKA of the pooled features. ``zscore=True`` also draws the
    z-scored-logit variant."""
    import numpy as np
    import pandas as pd

    run_set = _collect(preset, "correlation", "07_correlation", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, store, out = run_set.spec, run_set.store, run_set.out
    teacher, students = _analysed_runs(run_set, preset)
    folder = analysis_dir_for(store, preset) / "correlation"
    outputs = _Outputs(store, device)
    t_name, t_config, t_summary = teacher
    problems = []

    def class_means(config, summary) -> dict[str, Path]:
        paths = {v: folder / f"classmean_{v}_{_tag(config, summary)}.csv" for v in ("raw", "zscore")}
        if not all(p.exists() for p in paths.values()):
            problem = _checkpoint_problem(store, config)
            if problem:
                problems.append((config, problem, paths["raw"]))
                return paths
            got = outputs(config)
            num_classes = got["logits"].shape[1]
            for v, logits in (("raw", got["logits"]), ("zscore", analysis.zscore_logits(got["logits"]))):
                m = analysis.class_mean_logits(logits, got["labels"], num_classes)
                analysis.write_csv(pd.DataFrame(m, columns=[str(i) for i in range(num_classes)]).round(6), paths[v])
        return paths

    teacher_means = class_means(t_config, t_summary)
    rows, matrices, matrices_z = [], {}, {}
    for name, config, summary in students:
        means = class_means(config, summary)
        metrics_path = folder / f"metrics_{_tag(config, summary)}__{_tag(t_config, t_summary)}.json"
        if not metrics_path.exists():
            problem = _checkpoint_problem(store, config) or _checkpoint_problem(store, t_config)
            if problem:
                problems.append((config, problem, metrics_path))
                continue
            s, t = outputs(config), outputs(t_config)
            atomic_write_json(metrics_path, {
                "student_run_id": config.run_id, "teacher_run_id": t_config.run_id, "test_images": len(s["labels"]),
                "agreement": analysis.teacher_agreement(t["logits"], s["logits"]),
                "kl_teacher_student": analysis.kl_teacher_student(t["logits"], s["logits"]),
                "linear_cka_pooled": analysis.linear_cka(t["pooled"], s["pooled"]),
                "student_top1_recomputed": float(100.0 * np.mean(s["logits"].argmax(1) == s["labels"]))})
            if verbose:
                print(f"[07_correlation] computed {metrics_path.name}", flush=True)
        if problems:
            continue
        metrics = read_json(metrics_path)
        ms = {v: pd.read_csv(means[v]).to_numpy() for v in ("raw", "zscore")}
        mt = {v: pd.read_csv(teacher_means[v]).to_numpy() for v in ("raw", "zscore")}
        diff, stats = analysis.class_mean_difference(ms["raw"], mt["raw"])
        diff_z, stats_z = analysis.class_mean_difference(ms["zscore"], mt["zscore"])
        matrices[f"{name}\nmean {stats['mean']:.2f}, max {stats['max']:.2f}"] = diff
        matrices_z[f"{name}\nmean {stats_z['mean']:.2f}, max {stats_z['max']:.2f}"] = diff_z
        rows.append({"student": name, TOP1: analysis.format_number(summary["last_top1"]),
                     "mean ΔM": analysis.format_number(stats["mean"], 3),
                     "max ΔM": analysis.format_number(stats["max"], 3),
                     "mean ΔM (z-scored)": analysis.format_number(stats_z["mean"], 3),
                     "max ΔM (z-scored)": analysis.format_number(stats_z["max"], 3),
                     "agreement with teacher (%)": analysis.format_number(metrics["agreement"]),
                     "KL(teacher ‖ student) (nats)": analysis.format_number(metrics["kl_teacher_student"], 3),
                     "linear CKA (pooled)": analysis.format_number(metrics["linear_cka_pooled"], 3),
                     "run id": config.run_id})
    if problems:
        raise _missing_derived(preset, "07_correlation", problems)
    table = pd.DataFrame(rows)
    first = students[0][1]
    data_text = f"{data_description(first)} test set"
    caption = (f"How close are the students to the teacher? Preset '{preset}', {pair_label(*spec.pair)}, "
               f"{data_text}, runs of seed {spec.analysis_seed}; teacher {t_config.student}: "
               f"{analysis.format_number(t_summary['last_top1'])}% last-epoch top-1. M[c] = mean logit vector over "
               f"the test images of class c; ΔM = |M_student − M_teacher| off the diagonal (mean and max over the "
               f"entries, unclipped), on raw and on z-scored logits. Agreement: share of test images with the "
               f"teacher's top-1 class. "
               f"KL(teacher ‖ student): mean over test images, τ = 1. Linear CKA (Kornblith et al.) of the pooled "
               f"penultimate features.")
    tables = {"correlation_metrics": analysis.save_table(table, out / "correlation_metrics", caption=caption)}
    title = (f"|M_student − M_teacher| of class-mean {{kind}} (diagonal zeroed, colour clipped at {vmax:g}; "
             f"lighter = closer to the teacher)\n{pair_label(*spec.pair)}, {data_text}, preset {preset}, "
             f"seed {spec.analysis_seed}")
    figures = {"correlation_heatmaps": analysis.plot_heatmaps(matrices, out / "correlation_heatmaps", vmax=vmax,
                                                              title=title.format(kind="logits"))}
    if zscore:
        figures["correlation_heatmaps_zscore"] = analysis.plot_heatmaps(
            matrices_z, out / "correlation_heatmaps_zscore", vmax=vmax, title=title.format(kind="z-scored logits"),
            colorbar_label="|mean z-scored logit difference|")
    return StudyResult("07_correlation", preset, table, caption, run_set.runs, tables, figures)


# ---------------------------------------------------------------------------------------------------------
# Notebook registry, plan, figures, reproduce, strip
# ---------------------------------------------------------------------------------------------------------
BUILDERS: dict[str, tuple[str, Callable[..., StudyResult]]] = {
    "01_teachers": ("teachers", build_teachers),
    "02_main_table": ("main", build_main_table),
    "03_ablation_batch_size": ("batch_size", build_batch_size_ablation),
    "04_ablation_temperature": ("temperature", build_temperature_ablation),
    "05_ablation_intra_inter": ("intra_inter", build_intra_inter_ablation),
    "06_tsne": ("tsne", build_tsne),
    "07_correlation": ("correlation", build_correlation),
}


def plan(preset: str, store: RunStore | str | Path | None = None, spec: StudySpec | None = None):
    """Every run of the study, per notebook: one row per distinct config (teachers included), with its status in
    the store and whether an earlier notebook already needs it (``new`` = first needed by this notebook)."""
    import pandas as pd

    store = _store(store)
    rows, seen = [], set()
    for notebook, (experiment, _) in BUILDERS.items():
        for config in _unique_configs(experiment_configs(preset, experiment, spec)):
            rows.append({"notebook": notebook, "run_id": config.run_id, "method": config.method,
                         "student": config.student, "teacher": config.teacher.student if config.teacher else None,
                         "seed": config.seed, "batch_size": config.batch_size, "lr": config.base_lr,
                         "epochs": config.epochs, "options": json.dumps(_options_changed(config), sort_keys=True),
                         "setting": setting_label(config) or "-",
                         "new": config.run_id not in seen, "status": store.status(config.run_id)})
            seen.add(config.run_id)
    return pd.DataFrame(rows)


def rebuild_figures(preset: str, *, store: RunStore | str | Path | None = None,
                    figures_dir: str | Path | None = None, only: Sequence[str] | None = None,
                    verbose: bool = True) -> dict[str, StudyResult]:
    """Call every builder with ``train=False``: rebuild every table and figure from the store, training nothing.
    Raises :class:`MissingRunsError` (after trying every notebook) naming every missing run."""
    results, errors, missing = {}, [], []
    for notebook in only or NOTEBOOKS:
        _, builder = BUILDERS[notebook]
        try:
            results[notebook] = builder(preset, train=False, store=store, figures_dir=figures_dir, verbose=verbose)
        except MissingRunsError as exc:
            errors.append(f"{notebook}: {exc}")
            missing += [r for r in exc.run_ids if r not in missing]
    if errors:
        raise MissingRunsError(f"could not rebuild {len(errors)} of {len(only or NOTEBOOKS)} notebooks' tables and "
                               f"figures for preset {preset!r}:\n\n" + "\n\n".join(errors), missing)
    return results


@contextmanager
def _environ(**changes: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _prepend_path(var: str, *entries: str) -> str:
    return os.pathsep.join([*entries, *filter(None, [os.environ.get(var)])])


def _interpreter_kernel(folder: Path) -> str:
    """Write a throw-away kernelspec into ``folder/kernels/`` that runs *this* interpreter (so the notebooks see the
    environment and package of the command that executes them); ``folder`` must be put first on JUPYTER_PATH."""
    name = "ckd-study-current-python"
    spec_dir = folder / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    return name


def reproduce(preset: str, *, results_dir: str | Path | None = None, figures_dir: str | Path | None = None,
              reports_dir: str | Path | None = None, only: Sequence[str] | None = None, kernel: str | None = None,
              train: bool = True, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Execute the notebooks in order with papermill (parameters ``preset``, ``train``, ``results_dir``,
    ``figures_dir``) into ``<reports_dir>/<preset>/`` (default ``<repo>/reports``). Resumable: finished runs are
    read from the store. The kernel runs the current interpreter (whatever kernels are registered) unless
    ``kernel`` names a registered one, e.g. ``ckd-study`` from ``make setup``."""
    import papermill

    reports = Path(reports_dir) if reports_dir else REPO_ROOT / "reports"
    target = reports / preset
    target.mkdir(parents=True, exist_ok=True)
    params = {"preset": preset, "train": train,
              "results_dir": None if results_dir is None else str(Path(results_dir).resolve()),
              "figures_dir": None if figures_dir is None else str(Path(figures_dir).resolve())}
    written = []
    with tempfile.TemporaryDirectory(prefix="ckd-kernel-") as tmp:
        kernel_name = kernel or _interpreter_kernel(Path(tmp))
        # the kernel imports this very package (installed or not) and finds the throw-away kernelspec first
        env = {"PYTHONPATH": _prepend_path("PYTHONPATH", str(REPO_ROOT)),
               "JUPYTER_PATH": _prepend_path("JUPYTER_PATH", tmp)}
        with _environ(**env):
            for name in only or NOTEBOOKS:
                source = notebook_dir / f"{name}.ipynb"
                if not source.exists():
                    raise StudyError(f"notebook {source} not found")
                output = target / f"{name}.ipynb"
                started = time.perf_counter()
                print(f">> {name} (preset {preset}) -> {output}", flush=True)
                papermill.execute_notebook(str(source), str(output), parameters=params, kernel_name=kernel_name,
                                           cwd=str(notebook_dir), progress_bar=False, stdout_file=sys.stdout,
                                           stderr_file=sys.stderr)
                print(f"<< {name} done in {time.perf_counter() - started:.0f} s", flush=True)
                written.append(output)
    return written


def strip_notebook(path: str | Path) -> bool:
    """Remove outputs, execution counts and execution metadata from a notebook; True if the file changed."""
    import nbformat

    path = Path(path)
    before = path.read_text()
    nb = nbformat.reads(before, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime"):
            cell.metadata.pop(key, None)
    for key in ("papermill", "widgets", "toc"):
        nb.metadata.pop(key, None)
    after = nbformat.writes(nb) + ("" if nbformat.writes(nb).endswith("\n") else "\n")
    if after != before:
        path.write_text(after)
        return True
    return False


def notebook_parameters(path: str | Path) -> list[str]:
    """The names assigned in the notebook's ``parameters``-tagged cell, in order (empty if there is none)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return [t.id for node in ast.parse(cell.source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)]
    return []


def _campaign_command(args: argparse.Namespace) -> int:
    from .campaign import Campaign, CampaignError, format_status, parse_pair, run_campaign

    store = _store(args.results_dir)
    methods = tuple(args.methods.split(",")) if args.methods else CAMPAIGN_METHODS
    try:
        pair = parse_pair(args.pair) if args.pair else None
        campaign = Campaign.open(store, args.preset, pair, methods, args.seed, args.precision, args.device)
        if args.status:
            print(f"campaign {campaign.name} ({campaign.folder})")
            print(format_status(campaign.status_rows(store)))
            return 0
        result = run_campaign(campaign, store, minutes=args.minutes, device=args.device, data_root=args.data_dir)
    except (CampaignError, ConfigError, MethodError, RunError) as exc:
        print(f"campaign: {exc}", file=sys.stderr)
        return 1
    return 0 if result["finished"] or result["paused"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ckd_study.study``: user errors print one message (``--debug``: the traceback), as in
    ``python -m ckd_study``."""
    from .cli import report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    return report_errors(lambda: _main([a for a in argv if a != "--debug"]), debug)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckd_study.study", epilog="--debug: show tracebacks",
                                     description="Run the study's notebooks, rebuild its tables and figures.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", choices=available_presets(), required=True)
        p.add_argument("--results-dir", default=None, help="results store (default: $CKD_RESULTS_DIR or results/)")
        p.add_argument("--figures-dir", default=None,
                       help="base folder of tables/figures (default: $CKD_FIGURES_DIR or figures/); "
                            "files go to <base>/<preset>/")
        p.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None, help="these notebooks only")

    rep = sub.add_parser("reproduce", help="execute every notebook with papermill into reports/<preset>/")
    common(rep)
    rep.add_argument("--reports-dir", default=None, help="default: reports/")
    rep.add_argument("--kernel", default=None, help="Jupyter kernel (default: the current interpreter)")
    fig = sub.add_parser("figures", help="rebuild every table and figure from the store, without training")
    common(fig)
    pl = sub.add_parser("plan", help="list the runs of every notebook and their status")
    pl.add_argument("--preset", choices=available_presets(), required=True)
    pl.add_argument("--results-dir", default=None)
    st = sub.add_parser("strip", help="remove outputs and execution counts from notebooks")
    st.add_argument("notebooks", nargs="+", type=Path)
    cam = sub.add_parser("campaign", help="train a teacher and its students one after another in a time box; "
                                          "rerun to continue (see ckd_study/campaign.py)")
    cam.add_argument("--preset", choices=available_presets(), required=True)
    cam.add_argument("--pair", default=None, metavar="TEACHER-STUDENT",
                     help="e.g. resnet56-resnet20 (default: the preset's pair)")
    cam.add_argument("--minutes", type=float, default=150.0, help="time box; stops after a saved epoch (default 150)")
    cam.add_argument("--methods", default=None,
                     help=f"comma-separated students in order (default: {','.join(CAMPAIGN_METHODS)})")
    cam.add_argument("--seed", type=int, default=0)
    cam.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="of every run, when the campaign is first planned (default auto)")
    cam.add_argument("--device", default=None)
    cam.add_argument("--data-dir", default=None)
    cam.add_argument("--results-dir", default=None)
    cam.add_argument("--status", action="store_true", help="print where the campaign stands and exit")
    args = parser.parse_args(argv)

    if args.command == "campaign":
        return _campaign_command(args)

    if args.command == "strip":
        for path in args.notebooks:
            print(f"{'stripped' if strip_notebook(path) else 'clean   '} {path}")
        return 0
    if args.command == "plan":
        import pandas as pd

        frame = plan(args.preset, args.results_dir)
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
            print(frame[["notebook", "run_id", "setting", "new", "status"]].to_string(index=False))
        counts = frame.groupby("notebook", sort=False).agg(runs=("run_id", "size"), new=("new", "sum"))
        print("\nruns per notebook (new = not needed by an earlier notebook):")
        print(counts.to_string())
        print(f"distinct runs: {frame['run_id'].nunique()}, finished: "
              f"{(frame.drop_duplicates('run_id')['status'] == 'finished').sum()}")
        return 0
    if args.command == "figures":
        try:
            results = rebuild_figures(args.preset, store=args.results_dir, figures_dir=args.figures_dir,
                                      only=args.only)
        except MissingRunsError as exc:
            print(f"figures: {exc}", file=sys.stderr)
            return 1
        for name, result in results.items():
            print(f"{name}: " + ", ".join(str(p) for p in result.files))
        return 0
    reproduce(args.preset, results_dir=args.results_dir, figures_dir=args.figures_dir,
              reports_dir=args.reports_dir, only=args.only, kernel=args.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
