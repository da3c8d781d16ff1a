"""The study layer: every experiment of the study as data, one builder per notebook, and batch execution.

The notebooks in ``notebooks/`` are thin: a ``parameters`` cell (``preset``, ``train``, ``results_dir``,
``figures_dir``) and a call to one builder of this module. Everything they show is produced here, so it can
also be rebuilt without Jupyter::

    python -m ckd_study reproduce --preset quick   # run every notebook (papermill), training what is missing
    python -m ckd_study figures --preset quick     # rebuild every table and figure from the store, no training
    python -m ckd_study plan --preset quick        # the runs of every notebook and whether they are stored
    python -m ckd_study strip notebooks/*.ipynb    # remove outputs from notebooks before committing

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

Layout: ``grids`` (the experiments as data), ``collect`` (reading and producing an experiment's runs),
``builders`` (one per notebook; the plan; rebuilding figures), ``notebooks`` (papermill execution, stripping),
``cli`` (``python -m ckd_study <command>``). Everything public is re-exported here.
"""

from __future__ import annotations

from .builders import (BUILDERS, DATASET_CLASSES, build_batch_size_ablation, build_correlation, derive_analysis,
                       build_intra_inter_ablation, build_main_table, build_teachers, build_temperature_ablation,
                       build_tsne, plan, rebuild_figures)
from .cli import main
from .collect import (StudyResult, analysis_dir_for, budget_description, data_description, describe_run,
                      ensure_runs, figures_dir_for)
from .grids import (ANCHOR_NEGATIVES, BEST, CKD_INTRA_INTER, CONSTANT_PRODUCT, CONSTANT_RATIO, DATASET_LABELS,
                    EXPERIMENTS, FIXED_WEIGHT, INTER_WITHOUT_POSITIVE, METHOD_LABELS, NOTEBOOK_DIR, NOTEBOOKS,
                    PAPER_PAIRS, PUBLISHED, STUDY, TOP1, Entry, MissingRunsError, StudyError, StudySpec, _config,
                    experiment_configs, pair_label, recipe_lr, scaled_lr, study_spec)
from .notebooks import notebook_parameters, reproduce, strip_notebook

__all__ = [name for name in dir() if not name.startswith("__")]
