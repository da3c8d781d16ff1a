"""Batch execution of the notebooks with papermill (``reproduce``) and notebook hygiene (``strip``)."""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..runs import REPO_ROOT
from .grids import NOTEBOOK_DIR, NOTEBOOKS, StudyError

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
