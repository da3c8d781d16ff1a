"""The committed quick-preset reference outputs are exactly what `make figures` rebuilds from the stored runs.

The quick study's run summaries (config, metrics, summary, environment; no checkpoints) and derived analysis
files live in ``results/``; its tables and figures in ``figures/quick/``. Rebuilding from a copy of the store
without any checkpoint must reproduce every committed table byte for byte, and the README's main table must
be the committed one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ckd_study import study
from ckd_study.runs import RunStore

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "figures" / "quick"


# The table each notebook writes: a notebook's outputs are committed when its table is.
NOTEBOOK_TABLES = {"01_teachers": "teachers.csv", "02_main_table": "main_table.csv",
                   "03_ablation_batch_size": "ablation_batch_size.csv",
                   "04_ablation_temperature": "ablation_temperature.csv",
                   "05_ablation_intra_inter": "ablation_intra_inter.csv", "06_tsne": "tsne_separation.csv",
                   "07_correlation": "correlation_metrics.csv"}


def _committed_notebooks() -> list[str]:
    """The quick notebooks whose outputs are committed (a study being regenerated is committed notebook by
    notebook); each must have all its runs finished in the committed store."""
    committed = [nb for nb in study.NOTEBOOKS if (COMMITTED / NOTEBOOK_TABLES[nb]).exists()]
    plan = study.plan("quick", RunStore(REPO / "results"))
    unfinished = plan[plan["notebook"].isin(committed) & (plan["status"] != "finished")]
    assert unfinished.empty, f"committed outputs without their finished runs: {sorted(set(unfinished['run_id']))}"
    return committed


pytestmark = pytest.mark.skipif(not (COMMITTED / "main_table.csv").exists(),
                                reason="no committed quick-preset outputs in figures/quick/")


_DATA_DIR_BEFORE = os.environ.get("CKD_DATA_DIR")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory, cifar_root) -> Path:
    with pytest.MonkeyPatch.context() as mp:  # restored afterwards: later test modules see the caller's value
        mp.setenv("CKD_DATA_DIR", str(cifar_root))  # where plan() finds the dataset
        complete = _committed_notebooks()
        assert complete[:2] == ["01_teachers", "02_main_table"]
        tmp = tmp_path_factory.mktemp("fresh")
        # A fresh clone: the store without checkpoints or teacher caches (they are never committed).
        shutil.copytree(REPO / "results", tmp / "results",
                        ignore=shutil.ignore_patterns("checkpoints", "cache", "*.lock"))
        study.rebuild_figures("quick", store=tmp / "results", figures_dir=tmp / "figures", verbose=False,
                              only=complete)
    return tmp / "figures" / "quick"


def test_every_committed_table_is_rebuilt_identically(rebuilt):
    tables = sorted(p.name for p in COMMITTED.iterdir() if p.suffix in {".csv", ".md", ".tex"})
    assert "main_table.tex" in tables and "teachers.csv" in tables
    for name in tables:  # a committed table of a notebook that cannot be rebuilt is stale: it fails here
        assert (rebuilt / name).exists(), f"{name}: committed, but its notebook's runs are not all stored"
        assert (rebuilt / name).read_bytes() == (COMMITTED / name).read_bytes(), name


def test_every_committed_figure_is_rebuilt(rebuilt):
    figures = sorted(p.name for p in COMMITTED.iterdir() if p.suffix in {".png", ".pdf"})
    assert "main_table.png" in figures and "teachers.pdf" in figures
    for name in figures:
        assert (rebuilt / name).exists() and (rebuilt / name).stat().st_size > 0, name
    rebuilt_names = {p.name for p in rebuilt.iterdir()}
    assert rebuilt_names <= {p.name for p in COMMITTED.iterdir()}, "every rebuilt output is committed"


def test_readme_shows_the_committed_main_table():
    readme = (REPO / "README.md").read_text()
    table_lines = [line for line in (COMMITTED / "main_table.md").read_text().splitlines() if line.startswith("|")]
    assert table_lines and all(line in readme for line in table_lines)


def test_rebuilding_leaves_the_environment_as_it_was(rebuilt):
    assert os.environ.get("CKD_DATA_DIR") == _DATA_DIR_BEFORE
