"""Reading and producing the runs of an experiment: the store, run rows, the shared collection step of
every builder, and :class:`StudyResult`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import analysis
from ..config import RunConfig
from ..runs import REPO_ROOT, RunStore
from .grids import (BEST, DATASET_LABELS, TOP1, Entry, MissingRunsError, StudySpec, _unique_configs,
                    experiment_configs, study_spec)

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
    from ..methods import resolve_options

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
    return (f"Produce them with `make reproduce PRESET={preset}` (or `python -m ckd_study reproduce --preset "
            f"{preset}`), or call the builder with train=True; `python -m ckd_study plan --preset {preset}` "
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
    from ..runs import run

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
        rows.append({**{k: v for k, v in e.labels.items() if k not in ("pairs", "students")}, "run_id": c.run_id,
                     "last_top1": s["last_top1"], "best_top1": s["best_top1"], "best_epoch": s["best_epoch"],
                     "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.base_lr,
                     "teacher_top1": s.get("teacher_top1"), "wall_time_s": round(float(s["wall_time_s"]), 1)})
    return pd.DataFrame(rows)


@dataclass
class ExperimentRuns:
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
             device: Any) -> ExperimentRuns:
    spec = spec or study_spec(preset)
    store = _store(store)
    entries = experiment_configs(preset, experiment, spec)
    summaries = ensure_runs(entries, preset=preset, what=what, store=store, train=train, verbose=verbose,
                            device=device)
    return ExperimentRuns(spec, store, figures_dir_for(preset, figures_dir), entries, summaries,
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
