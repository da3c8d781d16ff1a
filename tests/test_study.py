"""The study layer end to end on the smoke preset: every notebook executed with papermill, every table and figure
produced, ``figures`` rebuilding them from the store without training or checkpoints, clear failures on an empty
store, and clean committed notebooks.

One smoke results store is shared by the whole module (each run trains once): on 2 CPU cores the module takes a
few minutes, almost all of it the ~18 two-epoch digits runs of the smoke grids.
"""

from __future__ import annotations

import ast
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import nbformat
import numpy as np
import pandas as pd
import pytest

from ckd_study import study
from ckd_study.config import PRESETS
from ckd_study.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
PRESET = "smoke"

# every file the notebooks must write under <figures>/<preset>/
TABLES = {"teachers": ("csv", "md"), "main_table": ("csv", "md", "tex"),
          "ablation_batch_size": ("csv", "md"), "ablation_batch_size_spread": ("csv", "md"),
          "ablation_temperature": ("csv", "md"), "ablation_temperature_spread": ("csv", "md"),
          "ablation_intra_inter": ("csv", "md"), "tsne_separation": ("csv", "md"),
          "correlation_metrics": ("csv", "md")}
FIGURES = ("teachers", "main_table", "ablation_batch_size", "ablation_temperature", "dcd_kappa",
           "ablation_intra_inter", "ablation_intra_inter_curves", "tsne", "correlation_heatmaps",
           "correlation_heatmaps_zscore")
RUN_TABLES = ("main_table_runs", "ablation_batch_size_runs", "ablation_temperature_runs", "ablation_intra_inter_runs",
              "ablation_intra_inter_curves", "dcd_kappa_curves")


def expected_files(folder: Path) -> list[Path]:
    files = [folder / f"{stem}.{ext}" for stem, exts in TABLES.items() for ext in exts]
    files += [folder / f"{stem}.{ext}" for stem in FIGURES for ext in ("png", "pdf")]
    return files + [folder / f"{stem}.csv" for stem in RUN_TABLES]


# ---------------------------------------------------------------------------------------------------------
# Fast checks: the grids, the committed notebooks
# ---------------------------------------------------------------------------------------------------------
def test_grids_are_data_for_every_preset(reproduction_plan):
    assert set(study.STUDY) == set(PRESETS)
    for preset, spec in study.STUDY.items():
        for experiment in study.EXPERIMENTS:
            entries = study.experiment_configs(preset, experiment)
            assert entries, (preset, experiment)
            # the teachers notebook lists the teacher runs, trained under the preset's teacher preset
            home = PRESETS[preset].get("teacher_preset", preset) if experiment == "teachers" else preset
            assert all(e.config.preset == home for e in entries), (preset, experiment)
    quick = study.STUDY["quick"]
    assert quick.pairs == ((PRESETS["quick"]["teacher_student"], PRESETS["quick"]["student"]),)
    assert len(quick.seeds) == 2
    paper = study.STUDY["paper"]
    assert len(paper.pairs) == 11 and len(paper.seeds) == 3 and paper.show_published
    # medium: full data, resnet56 -> resnet20, the paper recipe's teacher run (no second teacher), 2 seeds
    from ckd_study.launch import launch_plan

    medium = launch_plan("medium")
    teachers = {c.teacher.run_id for c in medium if c.teacher is not None}
    # the teacher the CPU reproduction trains: its frozen plan's first run (fp32 on every machine)
    assert teachers == {reproduction_plan["run_ids"][0]}
    students = [c for c in medium if c.teacher is not None]
    assert all((c.dataset, c.train_per_class, c.student, c.schedule) == ("cifar100", None, "resnet20", "cosine")
               for c in students)
    assert study.STUDY["medium"].seeds == study.STUDY["medium"].ablation_seeds == (0, 1)
    assert paper.pair == ("resnet32x4", "resnet8x4")
    assert study.PUBLISHED[("resnet32x4", "resnet8x4")]["kd"] == 73.33
    assert study.PUBLISHED[("resnet32x4", "ShuffleV1")].get("kd_ls") is None


def test_batch_size_grid_scales_the_learning_rate_linearly():
    for preset, spec in study.STUDY.items():
        entries = study.experiment_configs(preset, "batch_size")
        assert {e.config.batch_size for e in entries} == set(spec.batch_sizes)
        for e in entries:
            expected = study.recipe_lr(spec.pair[1]) * e.config.batch_size / spec.reference_batch_size
            assert e.config.base_lr == pytest.approx(expected)
            # lr is explicit, except where the recipe's own lr is exactly the rule's (then the run is shared)
            assert e.config.lr is not None or e.config.batch_size == PRESETS[preset].get("batch_size", 64)
    quick = study.experiment_configs("quick", "batch_size")
    assert sorted({e.config.base_lr for e in quick}) == [0.025, 0.05, 0.1]


def test_shared_runs_are_trained_once():
    for preset in study.STUDY:
        main = {e.config.run_id for e in study.experiment_configs(preset, "main")}
        temperature = study.experiment_configs(preset, "temperature")
        default_tau = [e for e in temperature if e.labels["method"] == "ckd"
                       and e.config.method_options["temperature"] == study._config(preset, "ckd", study.STUDY[
                           preset].pair, 0).method_options["temperature"]]
        learnable = [e for e in temperature if e.labels["method"] == "dcd" and e.labels["learnable"]]
        assert learnable and all(e.config.run_id in main for e in learnable)
        assert all(e.config.run_id in main for e in default_tau)
        full = [e for e in study.experiment_configs(preset, "intra_inter")
                if e.labels.get("variant") == "intra + inter (full CKD)"]
        assert full and all(e.config.run_id in main for e in full)
        assert {e.config.run_id for e in study.experiment_configs(preset, "tsne")} <= main
    options = [e.config.method_options for e in study.experiment_configs("quick", "intra_inter")
               if e.labels["method"] == "ckd"]
    assert [o["terms"] for o in options] == [["intra"], ["inter"], ["intra", "inter"]]


def _code_cells(path: Path):
    return [c for c in nbformat.read(str(path), as_version=4).cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", study.NOTEBOOKS)
def test_committed_notebook_is_clean_and_parameterised(name):
    path = REPO / "notebooks" / f"{name}.ipynb"
    assert path.exists()
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(path)
    for cell in cells:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: committed with outputs"
        tree = ast.parse(cell.source)  # thin: no logic defined in the notebook
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.For, ast.While))]
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = study.notebook_parameters(path)
    assert params[0] == "preset" and {"train", "results_dir", "figures_dir"} <= set(params)
    builder = study.BUILDERS[name][1].__name__
    assert any(f"study.{builder}(" in c.source for c in cells)
    assert "papermill" not in nb.metadata


# ---------------------------------------------------------------------------------------------------------
# The smoke study, executed once for the module
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = SimpleNamespace(results=root / "results", figures=root / "figures", reports=root / "reports")
    started = time.perf_counter()
    rc = study.main(["reproduce", "--preset", PRESET, "--results-dir", str(paths.results), "--figures-dir",
                     str(paths.figures), "--reports-dir", str(paths.reports)])
    paths.seconds = time.perf_counter() - started
    print(f"\nsmoke reproduce (7 notebooks, papermill): {paths.seconds:.0f} s")
    assert rc == 0
    paths.out = paths.figures / PRESET
    return paths



@pytest.mark.slow
def test_reproduce_executes_every_notebook(smoke):
    for name in study.NOTEBOOKS:
        report = smoke.reports / PRESET / f"{name}.ipynb"
        nb = nbformat.read(str(report), as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and 'preset = "smoke"' in injected[0].source
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.get("output_type") == "error"], name
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
            f"{name}: the report shows no figure"


@pytest.mark.slow
def test_every_table_and_figure_is_written(smoke):
    for path in expected_files(smoke.out):
        assert path.exists() and path.stat().st_size > 0, path
    for stem in FIGURES:
        assert (smoke.out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (smoke.out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert r"\begin{tabular}" in (smoke.out / "main_table.tex").read_text()


@pytest.mark.slow
def test_main_table_content(smoke):
    spec = study.STUDY[PRESET]
    table = pd.read_csv(smoke.out / "main_table.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["T → S", "method", "seeds", study.TOP1, study.BEST, "published (%)",
                                   "Δ vs KD (pp)", "student − teacher (pp)", "s / epoch, live teacher",
                                   "images/s, live teacher", "added parameters / memory"]
    methods = [study.METHOD_LABELS[m] for m in spec.main_methods]
    recipes = [study.METHOD_LABELS[f"{m}@{r}"] for m, r in spec.recipe_rows]
    assert recipes == ["CKD (released recipe)"]
    assert list(table["method"]) == [f"Teacher ({spec.pair[0]})"] + methods + recipes
    assert set(table["published (%)"]) == {"–"}  # no published numbers for the smoke pair/budget
    kd = table[table["method"] == "KD"].iloc[0]
    assert kd["Δ vs KD (pp)"] == "–"
    for value in table[study.TOP1]:
        assert 0.0 <= float(value.split(" ± ")[0]) <= 100.0
    runs = pd.read_csv(smoke.out / "main_table_runs.csv")
    assert set(runs["run_id"]) == {e.config.run_id for e in study.experiment_configs(PRESET, "main")}
    ckd_gain = table[table["method"] == "CKD"].iloc[0]["Δ vs KD (pp)"]
    expected = (runs[runs.method == "ckd"].last_top1.mean() - runs[runs.method == "kd"].last_top1.mean())
    assert float(ckd_gain) == pytest.approx(expected, abs=0.006)
    teacher = float(table.iloc[0][study.TOP1])
    for method in ("ce", "ckd"):
        row = table[table["method"] == study.METHOD_LABELS[method]].iloc[0]
        assert float(row["student − teacher (pp)"]) == pytest.approx(
            runs[runs.method == method].last_top1.mean() - teacher, abs=0.006)
    # the cost columns come from the stored measurements (live teacher), one per row's seed-0 config
    cost_dir = smoke.results / "analysis" / PRESET / "cost"
    for entry in study.experiment_configs(PRESET, "main"):
        record = json.loads((cost_dir / f"{entry.config.run_id}.json").read_text())
        row = table[table["method"] == study.METHOD_LABELS[entry.labels["method"]]].iloc[0]
        assert float(row["images/s, live teacher"]) == pytest.approx(record["images_per_s"], abs=0.5)
        assert record["images_per_s"] == pytest.approx(record["batch_size"] / record["seconds_per_step"])
        assert record["teacher_source"] == ("live" if entry.config.teacher is not None else None)
        # what the method adds: no head or memory for the logit methods, CRD's bank is 2 × N × 128 (+ 2)
        parameters, memory = (int(v.replace(",", "")) for v in row["added parameters / memory"].split(" / "))
        assert (parameters, memory) == (record["method_parameters"], record["method_buffer_values"])
        if entry.labels["method"] in ("kd", "ckd", "dkd", "ce", "mcld"):
            assert (parameters, memory) == (0, 0)
        elif entry.labels["method"] == "crd":
            n_train = entry.config.train_per_class * 10  # digits: 10 classes
            assert memory == 2 * n_train * 128 + 2 and parameters > 0
    md = (smoke.out / "main_table.md").read_text()
    assert "last-epoch top-1" in md and "preset 'smoke'" in md and "mean ± std" in md


@pytest.mark.slow
def test_ablation_tables_content(smoke):
    spec = study.STUDY[PRESET]
    batch = pd.read_csv(smoke.out / "ablation_batch_size.csv")
    assert sorted(batch["batch size"].unique()) == sorted(spec.batch_sizes)
    for _, row in batch.iterrows():
        assert float(row["lr"]) == pytest.approx(study.scaled_lr(spec.pair[1], row["batch size"],
                                                                 spec.reference_batch_size))
    assert "linear scaling rule" in (smoke.out / "ablation_batch_size.md").read_text()
    spread = pd.read_csv(smoke.out / "ablation_temperature_spread.csv")
    assert spread["setting"].str.startswith("CKD").any() and spread["spread max − min (pp)"].notna().all()
    temperature = pd.read_csv(smoke.out / "ablation_temperature.csv")
    assert spec.temperature_control and spec.temperature_gradient_control
    assert len(temperature) == 3 * len(spec.temperatures) + 1 + len(spec.dcd_fixed_temperatures)
    for series in (study.CONSTANT_PRODUCT, study.CONSTANT_RATIO):
        assert len(temperature[temperature["series"] == series]) == len(spec.temperatures)
    assert len(spread[spread["setting"].str.startswith("CKD")]) == 3  # one spread per CKD series
    kappa = pd.read_csv(smoke.out / "dcd_kappa_curves.csv")
    assert sorted(kappa["epoch"].unique()) == list(range(1, study.experiment_configs(PRESET, "temperature")[0]
                                                         .config.epochs + 1))
    fixed = kappa[kappa["setting"].str.startswith("fixed")]
    assert (fixed["kappa"] == 1 / spec.dcd_fixed_temperatures[0]).all()
    intra = pd.read_csv(smoke.out / "ablation_intra_inter.csv")
    assert {"intra only (alignment)", "inter only (contrast)", "intra + inter (full CKD)",
            study.INTER_WITHOUT_POSITIVE} <= set(intra["variant"])
    grid = intra[intra["ablation"] == "CKD: anchor × negatives"]
    assert len(grid) == len(spec.ckd_anchor_negatives) == 4
    released = grid[grid["variant"].str.endswith("(released)")]
    assert len(released) == 1 and float(released.iloc[0]["Δ vs full (pp)"]) == 0.0
    assert len(intra[intra["ablation"].str.startswith("MCLD")]) == len(spec.mcld_grid)
    # the per-epoch curves of the intra/inter arms are the runs' own metrics.jsonl lines, term by term
    curves = pd.read_csv(smoke.out / "ablation_intra_inter_curves.csv")
    arms = [e for e in study.experiment_configs(PRESET, "intra_inter") if e.labels["ablation"] == study.CKD_INTRA_INTER]
    assert sorted(curves["run_id"].unique()) == sorted(e.config.run_id for e in arms)
    store = RunStore(smoke.results)
    for entry in arms:
        logged = store.metrics(entry.config.run_id)
        rows = curves[curves["run_id"] == entry.config.run_id].sort_values("epoch")
        assert list(rows["epoch"]) == [m["epoch"] for m in logged]
        for term in ("test_top1", "train_ce", "train_ckd_intra", "train_ckd_inter"):
            expected = [m.get(term, float("nan")) for m in logged]
            assert np.allclose(rows[term].to_numpy(), expected, equal_nan=True, atol=1e-6), (entry.labels, term)
        # an arm that switched a term off logs no such term: its column stays empty
        for term in ("intra", "inter"):
            if term not in entry.config.method_options["terms"]:
                assert rows[f"train_ckd_{term}"].isna().all()


@pytest.mark.slow
def test_analysis_files_and_metrics(smoke):
    analysis_dir = smoke.results / "analysis" / PRESET
    tsne_files = list((analysis_dir / "tsne").glob("*.csv"))
    assert len(tsne_files) == len(study.STUDY[PRESET].analysis_methods) + 1  # the students and the teacher
    coords = pd.read_csv(tsne_files[0])
    assert list(coords.columns) == ["test_index", "label", "x", "y"] and len(coords) > 10
    assert len(list((analysis_dir / "correlation").glob("metrics_*.json"))) == len(
        study.STUDY[PRESET].analysis_methods)
    metrics = pd.read_csv(smoke.out / "correlation_metrics.csv")
    assert metrics["agreement with teacher (%)"].between(0, 100).all()
    assert metrics["linear CKA (pooled)"].between(0, 1).all()
    assert (metrics["KL(teacher ‖ student) (nats)"] >= 0).all()
    assert (metrics["max ΔM"] >= metrics["mean ΔM"]).all()


@pytest.mark.slow
def test_figures_rebuilds_identical_tables_without_training_or_checkpoints(smoke, tmp_path, capsys):
    store = RunStore(smoke.results)
    before = store.run_ids()
    summaries = {r: (store.run_dir(r) / "summary.json").read_bytes() for r in before}
    # prove that no checkpoint is needed: hide every final checkpoint while `figures` runs
    hidden = []
    for run_id in before:
        final = store.run_dir(run_id) / "checkpoints" / "final.pt"
        if final.exists():
            final.rename(final.with_suffix(".hidden"))
            hidden.append(final)
    try:
        rc = study.main(["figures", "--preset", PRESET, "--results-dir", str(smoke.results),
                         "--figures-dir", str(tmp_path)])
    finally:
        for final in hidden:
            final.with_suffix(".hidden").rename(final)
    assert rc == 0, capsys.readouterr().err
    assert hidden, "the smoke store should hold checkpoints"
    assert store.run_ids() == before, "figures must not create runs"
    assert {r: (store.run_dir(r) / "summary.json").read_bytes() for r in before} == summaries
    assert "training" not in capsys.readouterr().out
    rebuilt = tmp_path / PRESET
    for path in expected_files(smoke.out):
        twin = rebuilt / path.name
        assert twin.exists() and twin.stat().st_size > 0, twin
        if path.suffix in (".csv", ".md", ".tex"):
            assert twin.read_bytes() == path.read_bytes(), f"{path.name} differs when rebuilt from the store"


@pytest.mark.slow
def test_strip_removes_outputs(smoke, tmp_path):
    executed = tmp_path / "executed.ipynb"
    shutil.copy(smoke.reports / PRESET / "02_main_table.ipynb", executed)
    assert any(c.get("outputs") for c in _code_cells(executed))
    assert study.main(["strip", str(executed)]) == 0
    cells = _code_cells(executed)
    assert all(c.outputs == [] and c.execution_count is None for c in cells)
    assert "papermill" not in nbformat.read(str(executed), as_version=4).metadata
    assert study.strip_notebook(executed) is False  # idempotent


def test_figures_on_an_empty_store_names_the_missing_runs(tmp_path, capsys):
    empty = tmp_path / "empty"
    rc = study.main(["figures", "--preset", PRESET, "--results-dir", str(empty), "--figures-dir",
                     str(tmp_path / "figures")])
    err = capsys.readouterr().err
    assert rc == 1
    main_ids = [e.config.run_id for e in study.experiment_configs(PRESET, "main")]
    teacher_id = study.experiment_configs(PRESET, "teachers")[0].config.run_id
    assert all(run_id in err for run_id in main_ids) and teacher_id in err
    assert "make reproduce PRESET=smoke" in err and "method=ckd" in err
    assert all(name in err for name in study.NOTEBOOKS)
    assert RunStore(empty).run_ids() == []  # nothing was created
    with pytest.raises(study.MissingRunsError) as info:
        study.build_main_table(PRESET, train=False, store=empty, figures_dir=tmp_path / "figures")
    assert set(main_ids) <= set(info.value.run_ids)
    assert not (tmp_path / "figures" / PRESET / "main_table.csv").exists()
