"""One builder per notebook (01 teachers … 07 correlation), the notebook registry, the run plan and the
rebuilding of every table and figure from the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import analysis
from ..published import PUBLISHED
from ..config import RECIPES, RunConfig, setting_label
from ..runs import RunStore, atomic_write_json, read_json
from .collect import (ExperimentRuns, StudyResult, _collect, _options_changed, _seeds_text, _spread_table, _store,
                      _top1_columns, analysis_dir_for, budget_description, data_description, describe_run)
from .grids import (ANCHOR_NEGATIVES, BEST, CKD_DEFAULT_CELL, CKD_INTRA_INTER, CKD_TERM_VARIANTS, MCLD_COMPONENTS,
                    MCLD_DEFAULTS, METHOD_LABELS, NOTEBOOKS, TOP1, MissingRunsError,
                    StudyError, StudySpec, _config, anchor_negatives_label,
                    _unique_configs, experiment_configs, pair_label, recipe_lr, study_spec)

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
        published = [PUBLISHED.get((e.labels["teacher"], student), {}).get("teacher")
                     for student in e.labels["students"]] if spec.show_published else []
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
    costs = _main_table_costs(run_set, preset, device, verbose)
    rows = []
    for p in spec.pairs:
        label = pair_label(*p)
        part = agg[agg["pair"] == label]
        published = PUBLISHED.get(p, {}) if spec.show_published else {}
        kd = part.loc[part["method"] == "kd", "last_top1_mean"]
        kd_mean = float(kd.iloc[0]) if len(kd) else float("nan")
        teacher_cfg = _config(preset, "kd", p, 0).teacher
        t = summaries.get(teacher_cfg.run_id)
        teacher_top1 = t["last_top1"] if t is not None else float("nan")
        if t is not None:  # the reference row: the pair's teacher
            rows.append({"T → S": label, "method": f"Teacher ({p[0]})", "seeds": 1,
                         TOP1: analysis.format_mean_std(t["last_top1"]), BEST: analysis.format_mean_std(t["best_top1"]),
                         "published (%)": analysis.format_number(published.get("teacher")),
                         "Δ vs KD (pp)": analysis.MISSING, STUDENT_MINUS_TEACHER: analysis.MISSING,
                         SECONDS_PER_EPOCH: analysis.MISSING, IMAGES_PER_S: analysis.MISSING,
                         ADDED_STATE: analysis.MISSING})
        for _, r in part.iterrows():
            gain = r["last_top1_mean"] - kd_mean if r["method"] != "kd" else float("nan")
            cost = costs.get((label, r["method"])) or {}
            rows.append({"T → S": label, "method": METHOD_LABELS.get(r["method"], r["method"]), "seeds": int(r["n"]),
                         TOP1: analysis.format_mean_std(r["last_top1_mean"], r["last_top1_std"]),
                         BEST: analysis.format_mean_std(r["best_top1_mean"], r["best_top1_std"]),
                         "published (%)": analysis.format_number(published.get(r["method"])),
                         "Δ vs KD (pp)": analysis.format_number(gain, signed=True),
                         STUDENT_MINUS_TEACHER: analysis.format_number(r["last_top1_mean"] - teacher_top1, signed=True),
                         SECONDS_PER_EPOCH: analysis.format_number(cost.get("seconds_per_epoch"), digits=1),
                         IMAGES_PER_S: analysis.format_number(cost.get("images_per_s"), digits=0),
                         ADDED_STATE: _added_state_text(cost)})
    table = pd.DataFrame(rows)
    caption = (f"Main table, preset '{preset}': test top-1 (%) on {data_description(first)}; "
               f"{budget_description(first)}, batch {first.batch_size}; every method under the same budget. "
               f"Headline: {TOP1}, mean ± std over {_seeds_text(spec.seeds)}; {BEST} (max over epochs of the "
               f"test accuracy, optimistic) beside it. Published: methods.md §5 (240-epoch CIFAR-100 benchmark, "
               f"the papers' own protocols)"
               + ("" if spec.show_published else "; none exist for this preset's budget and pair ('–')")
               + ". Δ vs KD: last-epoch mean minus KD's, in percentage points; student − teacher: minus the "
               "teacher's last-epoch top-1 (positive: the student surpasses its teacher). Cost: seconds per "
               "training epoch and images/s with the teacher run live on one device (not the cache the study's "
               "runs use), measured once over timed steps of the seed-0 config"
               + (f" ({_cost_steps(costs)}) on {_cost_machine(costs)}" if costs else "")
               + f". {ADDED_STATE}: trainable values of the method's own modules (heads, a learned temperature) / "
               "values it carries in checkpointed buffers (CRD's memory bank of 2 × N × 128), beside the student's "
               "own. MCLD is our reimplementation "
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


STUDENT_MINUS_TEACHER = "student − teacher (pp)"
SECONDS_PER_EPOCH = "s / epoch, live teacher"
IMAGES_PER_S = "images/s, live teacher"
ADDED_STATE = "added parameters / memory"


def _added_state_text(cost: Mapping[str, Any]) -> str:
    """``Method.added_state`` from a cost record, e.g. ``16,640 / 0``; ``–`` without a record."""
    if "method_parameters" not in cost:
        return analysis.MISSING
    return f"{cost['method_parameters']:,} / {cost['method_buffer_values']:,}"


def _main_table_costs(run_set: ExperimentRuns, preset: str, device: Any,
                      verbose: bool) -> dict[tuple[str, str], dict]:
    """(pair label, method key) -> the cost record of the row's seed-0 config (measured once, then read from
    ``<results>/analysis/<preset>/cost/``); rows whose teacher checkpoint is missing get none (a note says so)."""
    from ..cost import training_cost
    from ..runs import RunError

    folder = analysis_dir_for(run_set.store, preset) / "cost"
    costs, missing = {}, []
    for entry in run_set.entries:
        if entry.labels["seed"] != run_set.spec.seeds[0]:
            continue
        try:
            costs[(entry.labels["pair"], entry.labels["method"])] = training_cost(
                entry.config, run_set.store, folder, device=device)
        except (RunError, OSError) as exc:
            missing.append(f"{entry.config.run_id}: {str(exc).splitlines()[0]}")
    if missing and verbose:
        print("training cost not measured for " + "; ".join(missing))
    return costs


def _cost_steps(costs: Mapping[Any, dict]) -> str:
    steps = sorted({(c["steps_timed"], c["warmup_steps"]) for c in costs.values()})
    return "; ".join(f"{n} timed steps after {w} untimed" for n, w in steps)


def _cost_machine(costs: Mapping[Any, dict]) -> str:
    def machine(c: dict) -> str:
        if c["device"] == "cpu":
            return f"{c['cpu']} ({c['threads']} threads, {c['precision']})"
        return f"{c['device']} ({c['precision']})"

    return "; ".join(sorted({machine(c) for c in costs.values()}))


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
    agg = analysis.mean_std_table(runs, by=["method", "method_label", "series", "setting", "temperature",
                                            "learnable"])
    table = pd.DataFrame({"method": agg["method_label"], "series": agg["series"], "temperature": agg["setting"],
                          "seeds": agg["n"], **_top1_columns(agg)})
    control = (" Control series: λ_CL·τ held constant at the pair's default (λ = λ₀·τ₀/τ), as methods.md §2 words it."
               if spec.temperature_control else "")
    if spec.temperature_gradient_control:
        control += (" Gradient-matched series: λ_CL/τ held constant (λ = λ₀·τ/τ₀). The contrastive term's gradient "
                    "is (λ_CL/τ)(softmax − one-hot): with λ fixed its prefactor changes by τ₀/τ, with λ·τ fixed by "
                    "(τ₀/τ)², and only with λ/τ fixed is it the default's at every τ, so this series alone "
                    "separates the temperature from the loss weight.")
    caption = (f"Temperature ablation, preset '{preset}', {pair_label(*spec.pair)}, {data_description(first)}, "
               f"{budget_description(first)}: {TOP1} mean ± std over {_seeds_text(spec.ablation_seeds)}. "
               f"CKD with τ ∈ {list(spec.temperatures)} (other options at their defaults); DCD with its learnable "
               f"inverse temperature and with fixed τ ∈ {list(spec.dcd_fixed_temperatures)}.{control}")
    ckd = agg[agg["method"] == "ckd"]
    dcd = agg[agg["method"] == "dcd"]
    spread_rows = [(f"{series}, τ ∈ {list(spec.temperatures)}", part)
                   for series, part in ckd.groupby("series", sort=False)]
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
    panels = [dict(data=ckd, x="temperature", y="last_top1_mean", yerr="last_top1_std",
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
    kappa = _dcd_kappa_curves(run_set)
    if kappa is not None:
        analysis.write_csv(kappa, out / "dcd_kappa_curves.csv")
        figures["dcd_kappa"] = analysis.plot_lines(
            kappa, x="epoch", y="kappa", hue="curve", path_stem=out / "dcd_kappa", xlabel="epoch",
            ylabel="DCD inverse temperature κ (end of epoch)",
            title=f"DCD's κ over training, learnable vs fixed: {pair_label(*spec.pair)}, preset {preset}")
    elif verbose and len(dcd):
        print("dcd_kappa: not drawn; the stored DCD runs predate the per-epoch κ record (retrain them with "
              "--retrain to log it)")
    return StudyResult("04_ablation_temperature", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg, "spread": spread, "dcd_kappa": kappa})


def _dcd_kappa_curves(run_set: ExperimentRuns):
    """DCD's κ per epoch (``dcd_kappa`` in metrics.jsonl), one curve per run of the temperature grid; None when
    a DCD run did not log it (runs stored before it was recorded)."""
    rows = _per_epoch_rows(run_set, lambda entry: entry.config.method == "dcd", ("setting", "seed"),
                           {"kappa": "dcd_kappa"}, required=True)
    if rows is None or rows.empty:
        return None
    rows.insert(0, "curve", [f"{setting}, seed {seed}" for setting, seed in zip(rows["setting"], rows["seed"])])
    return rows


def _per_epoch_rows(run_set: ExperimentRuns, keep: Callable[[Any], bool], labels: Sequence[str],
                    values: Mapping[str, str], *, required: bool = False):
    """One row per logged epoch of every run ``keep(entry)`` selects: the entry's ``labels``, its run id, the
    epoch, and ``values`` (output column -> metrics.jsonl key). A key a run did not log is NaN (a term the run
    switched off), or, when ``required``, makes the result None (runs stored before the key was recorded, which
    a curve must not silently skip)."""
    import pandas as pd

    rows = []
    for entry in run_set.entries:
        if not keep(entry):
            continue
        metrics = run_set.store.metrics(entry.config.run_id)
        if required and (not metrics or any(key not in m for m in metrics for key in values.values())):
            return None
        rows += [{**{label: entry.labels[label] for label in labels}, "run_id": entry.config.run_id,
                  "epoch": m["epoch"], **{column: m.get(key, float("nan")) for column, key in values.items()}}
                 for m in metrics]
    return pd.DataFrame(rows, columns=[*labels, "run_id", "epoch", *values])


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
    full = {CKD_INTRA_INTER: grid.loc[(grid["ablation"] == CKD_INTRA_INTER)
                                      & (grid["variant"] == CKD_TERM_VARIANTS[("intra", "inter")]), "last_top1_mean"],
            ANCHOR_NEGATIVES: grid.loc[(grid["ablation"] == ANCHOR_NEGATIVES)
                                       & (grid["variant"] == anchor_negatives_label(*CKD_DEFAULT_CELL)),
                                       "last_top1_mean"],
            MCLD_COMPONENTS: grid.loc[(grid["ablation"] == MCLD_COMPONENTS) & (grid["change"] == MCLD_DEFAULTS),
                                      "last_top1_mean"]}
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
               f"Δ: against the full method." + (
                   f" Inter without the positive: the log-sum-exp over the negatives only (Σ_{{j≠i}}, the "
                   f"paper's wording), beside the released Σ_j." if spec.ckd_extra_variants else "") + (
                   f" Anchor × negatives: which side's rows anchor the InfoNCE, and whether the negatives are "
                   f"teacher–student pairs (released) or student–student pairs; Δ against the released cell."
                   if spec.ckd_anchor_negatives else "") + f" References: {ref_text}.")
    tables = {"ablation_intra_inter": analysis.save_table(table, out / "ablation_intra_inter", caption=caption)}
    analysis.write_csv(runs, out / "ablation_intra_inter_runs.csv")
    reference = {r["variant"]: float(r["last_top1_mean"]) for _, r in refs.iterrows()}
    figures = {"ablation_intra_inter": analysis.plot_bars(
        grid, label="variant", value="last_top1_mean", err="last_top1_std", group="ablation", reference=reference,
        path_stem=out / "ablation_intra_inter", xlabel=f"{TOP1}, mean ± std",
        title=f"CKD intra/inter and MCLD components: {pair_label(*spec.pair)}, {data_description(first)}, "
              f"preset {preset}, {_seeds_text(spec.ablation_seeds)}")}
    curves = _intra_inter_curves(run_set)
    analysis.write_csv(curves, out / "ablation_intra_inter_curves.csv")
    means = curves.groupby(["variant", "epoch"], sort=False).mean(numeric_only=True).reset_index()
    panels = [dict(data=means.dropna(subset=[column]), x="epoch", y=column, hue="variant", xlabel="epoch",
                   ylabel=ylabel) for column, ylabel in _INTRA_INTER_CURVE_PANELS
              if means[column].notna().any()]
    figures["ablation_intra_inter_curves"] = analysis.plot_line_panels(
        panels, out / "ablation_intra_inter_curves", max_cols=2,
        title=f"CKD intra/inter arms per epoch (mean over {_seeds_text(spec.ablation_seeds)}): test top-1 and the "
              f"training loss terms the loop summed (CKD terms weighted by λ_CL), preset {preset}")
    return StudyResult("05_ablation_intra_inter", preset, table, caption, runs, tables, figures,
                       extra={"aggregate": agg, "curves": curves})


# The per-epoch record of the CKD intra/inter arms: what shows why an arm learns slowly or not at all.
_INTRA_INTER_CURVE_PANELS = (("test_top1", "test top-1 (%)"), ("train_ce", "training CE"),
                             ("train_ckd_intra", "λ_CL · intra (training)"),
                             ("train_ckd_inter", "λ_CL · inter (training)"))


def _intra_inter_curves(run_set: ExperimentRuns):
    """One row per epoch of every run of the CKD intra/inter arms: test top-1 and the training CE and CKD
    terms from the run's metrics.jsonl (a term the arm switched off is empty)."""
    return _per_epoch_rows(run_set, lambda entry: entry.labels.get("ablation") == CKD_INTRA_INTER,
                           ("variant", "seed"), {c: c for c, _ in _INTRA_INTER_CURVE_PANELS})


# ---------------------------------------------------------------------------------------------------------
# 06 t-SNE and 07 correlation: derived files from checkpoints, figures from the derived files
# ---------------------------------------------------------------------------------------------------------
def _analysis_teacher(preset: str, spec: StudySpec) -> RunConfig:
    """The teacher whose outputs notebooks 06 and 07 analyse beside the students: the pair's, at the analysis seed."""
    return _config(preset, "kd", spec.pair, spec.analysis_seed).teacher


def _analysed_runs(run_set: ExperimentRuns, preset: str):
    """The analysed teacher and students as ``(panel name, config, summary)``: ``(teacher, [students])``."""
    teacher = _analysis_teacher(preset, run_set.spec)
    students = [(METHOD_LABELS.get(e.labels["method"], e.labels["method"]), e.config,
                 run_set.summaries[e.config.run_id]) for e in run_set.entries]
    return (f"Teacher ({teacher.student})", teacher, run_set.summaries[teacher.run_id]), students


def _derived_file_stem(config: RunConfig, summary: Mapping[str, Any]) -> str:
    """A derived file's name stem: the run id and its final weights' sha256 prefix, so that a retrained run
    never reuses the analysis of the weights it replaced."""
    return f"{config.run_id}_{summary['final_sha256'][:8]}"


class StoredModelOutputs:
    """Test-set outputs of stored models, computed at most once per builder call."""

    def __init__(self, store: RunStore, device: Any, data_root: str | Path | None = None) -> None:
        from ..train import default_device

        self.store = store
        self.device = device if device is not None else default_device()
        self.data_root = data_root
        self.cache: dict[str, dict] = {}

    def data(self, config: RunConfig):
        import torch

        from ..runs import dataset_for

        return dataset_for(config, torch.device("cpu"), self.data_root)

    def __call__(self, config: RunConfig, indices=None) -> dict:
        key = config.run_id
        if key not in self.cache:
            from ..train import predict

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


def _ensure_derived(store: RunStore, paths: Iterable[Path], sources: Sequence[RunConfig],
                    derive: Callable[[], None]) -> tuple[list[Path], str | None]:
    """Make sure the derived files ``paths`` exist: when one is missing, compute them with ``derive`` from the
    checkpoints of ``sources``. Returns ``(written, problem)``: the files ``derive`` wrote (none when all were
    there), and why the files are absent and cannot be computed (a missing checkpoint), else None."""
    paths = list(paths)
    if all(p.exists() for p in paths):
        return [], None
    problem = next((p for p in (_checkpoint_problem(store, c) for c in sources) if p), None)
    if problem:
        return [], problem
    derive()
    return paths, None


def _missing_derived(preset: str, what: str, problems: Sequence[tuple[RunConfig, str, Path]]) -> MissingRunsError:
    lines = [f"  - {c.run_id} ({describe_run(c)}): {p}; no derived file {f}" for c, p, f in problems]
    return MissingRunsError(
        f"{what} (preset {preset!r}) needs derived analysis files that are absent and cannot be computed:\n"
        + "\n".join(lines) + "\nRetrain those runs (move their folders away, then `make reproduce PRESET="
        f"{preset}`), or restore the checkpoints or the analysis files.", [c.run_id for c, _, _ in problems])


def _tsne_paths(store: RunStore, preset: str, spec: StudySpec, config: RunConfig, summary: Mapping[str, Any],
                features: str) -> tuple[Path, Path]:
    """The t-SNE coordinates (csv) and their metadata (json) of one analysed run."""
    subset = f"{features}_c{spec.tsne_classes or 'all'}_n{spec.tsne_per_class or 'all'}_s{spec.analysis_seed}"
    path = analysis_dir_for(store, preset) / "tsne" / f"{_derived_file_stem(config, summary)}_{subset}.csv"
    return path, path.with_suffix(".json")


def _derive_tsne(outputs: StoredModelOutputs, spec: StudySpec, config: RunConfig, summary: Mapping[str, Any],
                 features: str, path: Path, meta_path: Path, verbose: bool) -> None:
    """Compute one run's t-SNE coordinates on the seeded test subset from its checkpoint and store them."""
    import numpy as np
    import pandas as pd

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


def build_tsne(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
               figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
               device: Any = None, features: str = "pooled") -> StudyResult:
    """Notebook 06: t-SNE of the students' pooled features (``features="logits"``: logits) on a fixed, seeded test
    subset, side by side for CE, KD and the contrastive methods (and the teacher), coloured by class; plus a
    table of the class separation (silhouette, cosine, in the full feature space)."""
    import pandas as pd

    if features not in ("pooled", "logits"):
        raise StudyError(f"features must be 'pooled' or 'logits', got {features!r}")
    run_set = _collect(preset, "tsne", "06_tsne", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, store, out = run_set.spec, run_set.store, run_set.out
    teacher, students = _analysed_runs(run_set, preset)
    outputs = StoredModelOutputs(store, device)
    panels, rows, problems = {}, [], []
    for name, config, summary in [teacher, *students]:
        path, meta_path = _tsne_paths(store, preset, spec, config, summary, features)
        _, problem = _ensure_derived(store, (path, meta_path), [config], lambda: _derive_tsne(
            outputs, spec, config, summary, features, path, meta_path, verbose))
        if problem:
            problems.append((config, problem, path))
            continue
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
    from ..runs import dataset_for
    import torch

    return list(dataset_for(config, torch.device("cpu")).classes)


DATASET_CLASSES: dict[str, Callable[[RunConfig], list[str]] | None] = {"digits": None, "cifar100": _class_names,
                                                                      "cifar10": _class_names}


def _class_mean_paths(folder: Path, config: RunConfig, summary: Mapping[str, Any]) -> dict[str, Path]:
    stem = _derived_file_stem(config, summary)
    return {v: folder / f"classmean_{v}_{stem}.csv" for v in ("raw", "zscore")}


def _derive_class_means(outputs: StoredModelOutputs, config: RunConfig, paths: Mapping[str, Path]) -> None:
    """One run's class-mean logit matrices (raw and z-scored) on the test set, from its checkpoint."""
    import pandas as pd

    got = outputs(config)
    num_classes = got["logits"].shape[1]
    for v, logits in (("raw", got["logits"]), ("zscore", analysis.zscore_logits(got["logits"]))):
        m = analysis.class_mean_logits(logits, got["labels"], num_classes)
        analysis.write_csv(pd.DataFrame(m, columns=[str(i) for i in range(num_classes)]).round(6), paths[v])


def _pair_metrics_path(folder: Path, config: RunConfig, summary: Mapping[str, Any], t_config: RunConfig,
                       t_summary: Mapping[str, Any]) -> Path:
    return folder / f"metrics_{_derived_file_stem(config, summary)}__{_derived_file_stem(t_config, t_summary)}.json"


def _derive_pair_metrics(outputs: StoredModelOutputs, config: RunConfig, t_config: RunConfig, path: Path,
                         verbose: bool) -> None:
    """How close one student is to its teacher on the test set (agreement, KL, linear CKA), from both checkpoints."""
    import numpy as np

    s, t = outputs(config), outputs(t_config)
    atomic_write_json(path, {
        "student_run_id": config.run_id, "teacher_run_id": t_config.run_id, "test_images": len(s["labels"]),
        "agreement": analysis.teacher_agreement(t["logits"], s["logits"]),
        "kl_teacher_student": analysis.kl_teacher_student(t["logits"], s["logits"]),
        "linear_cka_pooled": analysis.linear_cka(t["pooled"], s["pooled"]),
        "student_top1_recomputed": float(100.0 * np.mean(s["logits"].argmax(1) == s["labels"]))})
    if verbose:
        print(f"[07_correlation] computed {path.name}", flush=True)


def build_correlation(preset: str = "quick", *, train: bool = True, store: RunStore | str | Path | None = None,
                      figures_dir: str | Path | None = None, spec: StudySpec | None = None, verbose: bool = True,
                      device: Any = None, zscore: bool = True, vmax: float = analysis.HEATMAP_VMAX) -> StudyResult:
    """Notebook 07: class-mean logit difference heatmaps ``|M_student − M_teacher|`` (zero diagonal, colour scale
    clipped at ``vmax`` = 3) on the test set, and the measurable quantities: mean/max difference, top-1 agreement
    with the teacher, KL(teacher ‖ student), linear CKA of the pooled features. ``zscore=True`` also draws the
    z-scored-logit variant."""
    import pandas as pd

    run_set = _collect(preset, "correlation", "07_correlation", store=store, figures_dir=figures_dir,
                       spec=spec, train=train, verbose=verbose, device=device)
    spec, store, out = run_set.spec, run_set.store, run_set.out
    teacher, students = _analysed_runs(run_set, preset)
    folder = analysis_dir_for(store, preset) / "correlation"
    outputs = StoredModelOutputs(store, device)
    t_name, t_config, t_summary = teacher
    problems = []

    def class_means(config, summary) -> dict[str, Path]:
        paths = _class_mean_paths(folder, config, summary)
        _, problem = _ensure_derived(store, paths.values(), [config],
                                     lambda: _derive_class_means(outputs, config, paths))
        if problem:
            problems.append((config, problem, paths["raw"]))
        return paths

    teacher_means = class_means(t_config, t_summary)
    rows, matrices, matrices_z = [], {}, {}
    for name, config, summary in students:
        means = class_means(config, summary)
        metrics_path = _pair_metrics_path(folder, config, summary, t_config, t_summary)
        _, problem = _ensure_derived(store, [metrics_path], [config, t_config], lambda: _derive_pair_metrics(
            outputs, config, t_config, metrics_path, verbose))
        if problem:
            problems.append((config, problem, metrics_path))
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


def derive_analysis(preset: str, *, store: RunStore | str | Path | None = None, spec: StudySpec | None = None,
                    device: Any = None, data_root: str | Path | None = None, verbose: bool = True) -> list[Path]:
    """Compute the derived files of notebooks 06 and 07 (t-SNE coordinates of the pooled features, class-mean
    logits, student–teacher metrics) for every analysed run that has finished and still has its checkpoint; runs
    not finished yet are skipped. Returns the files written.

    Checkpoints are not committed and a machine may be replaced between sessions: a study campaign calls this
    after each run it finishes, so that what t-SNE and the heatmaps need is in committable files long before the
    last run of the study ends."""
    spec = spec or study_spec(preset)
    store = _store(store)
    teacher = _analysis_teacher(preset, spec)
    analysed = _unique_configs([*experiment_configs(preset, "tsne", spec),
                                *experiment_configs(preset, "correlation", spec)])
    outputs = StoredModelOutputs(store, device, data_root)
    folder = analysis_dir_for(store, preset) / "correlation"
    t_summary = store.summary(teacher.run_id)
    written: list[Path] = []
    for config in analysed:
        summary = store.summary(config.run_id)
        if summary is None or _checkpoint_problem(store, config):
            continue
        path, meta_path = _tsne_paths(store, preset, spec, config, summary, "pooled")
        written += _ensure_derived(store, (path, meta_path), [config], lambda: _derive_tsne(
            outputs, spec, config, summary, "pooled", path, meta_path, verbose))[0]
        means = _class_mean_paths(folder, config, summary)
        written += _ensure_derived(store, means.values(), [config],
                                   lambda: _derive_class_means(outputs, config, means))[0]
        if config.run_id == teacher.run_id or t_summary is None:
            continue
        # a missing teacher checkpoint only leaves the pair metrics for later
        metrics_path = _pair_metrics_path(folder, config, summary, teacher, t_summary)
        written += _ensure_derived(store, [metrics_path], [config, teacher], lambda: _derive_pair_metrics(
            outputs, config, teacher, metrics_path, verbose))[0]
    return written


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
