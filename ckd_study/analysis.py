"""Pure analysis functions and plotting helpers of the study (methods.md §6), unit-tested in tests/test_analysis.py.

Numbers in, numbers out: nothing here reads the results store or trains (that is :mod:`ckd_study.study`).
Arrays may be numpy arrays or torch tensors; results are numpy / Python floats.

- measurable quantities: :func:`class_mean_logits`, :func:`class_mean_difference`, :func:`correlation_difference`
  (the DKD/CRD "correlation" heatmap), :func:`teacher_agreement`, :func:`kl_teacher_student`, :func:`linear_cka`
- t-SNE: :func:`tsne_subset` (a fixed, seeded test subset), :func:`tsne_embedding`, :func:`silhouette`
- tables: :func:`mean_std_table`, :func:`format_mean_std`, :func:`save_table` (CSV + Markdown (+ LaTeX))
- figures (saved as PNG + PDF): :func:`plot_heatmaps`, :func:`plot_tsne_grid`, :func:`plot_lines`,
  :func:`plot_bars`, :func:`plot_curves`

Figures are drawn on :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no global state and no
GUI backend is touched, so the helpers behave the same in scripts, tests (Agg) and notebooks.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# The colour-scale clip of the correlation heatmaps (methods.md §6).
HEATMAP_VMAX = 3.0
MISSING = "–"
# Curves with more points than this are drawn without markers: on a 240-epoch curve they hide the other lines.
CURVE_MARKER_MAX_POINTS = 40


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    """A numpy copy of a numpy array / torch tensor / sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Measurable quantities (methods.md §6)
# ---------------------------------------------------------------------------------------------------------
def zscore_logits(logits: Any, eps: float = 1e-7) -> np.ndarray:
    """Z-score every logit vector over the classes (population std), as logit standardisation does."""
    x = _np(logits)
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return (x - mean) / (std + eps)


def class_mean_logits(logits: Any, labels: Any, num_classes: int) -> np.ndarray:
    """``M[c]`` = the mean logit vector over the samples of class ``c``: a (num_classes × K) matrix.

    A class without samples gets a row of NaN (and so shows up instead of silently reading as zero).
    """
    x = _np(logits)
    y = _np(labels, dtype=np.int64)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"logits must be (N, K) and labels (N,), got {x.shape} and {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def class_mean_difference(student_means: Any, teacher_means: Any,
                          clip: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """``|M_student − M_teacher|`` with the diagonal zeroed, and its statistics.

    ``stats["mean"]`` is the mean over the off-diagonal entries, ``stats["max"]`` their maximum; both are computed
    before clipping. ``clip`` (e.g. :data:`HEATMAP_VMAX`) clips the returned matrix for display only.
    """
    ms, mt = _np(student_means), _np(teacher_means)
    if ms.shape != mt.shape or ms.ndim != 2 or ms.shape[0] != ms.shape[1]:
        raise ValueError(f"class-mean matrices must be square and of one shape, got {ms.shape} and {mt.shape}")
    diff = np.abs(ms - mt)
    np.fill_diagonal(diff, 0.0)
    off = ~np.eye(len(diff), dtype=bool)
    stats = {"mean": float(np.nanmean(diff[off])) if off.any() else 0.0,
             "max": float(np.nanmax(diff[off])) if off.any() else 0.0}
    if clip is not None:
        diff = np.minimum(diff, clip)
    return diff, stats


def correlation_difference(student_logits: Any, teacher_logits: Any, labels: Any, num_classes: int,
                           zscore: bool = False, clip: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """The correlation-heatmap matrix of methods.md §6 from per-sample logits.

    ``M[c]`` = mean logit vector over the (test) samples of class ``c``, for the student and the teacher;
    returns ``|M_student − M_teacher|`` with a zero diagonal and ``{"mean", "max"}`` over the off-diagonal entries.
    ``zscore=True`` z-scores every logit vector first (the scale-free variant).
    """
    s, t = _np(student_logits), _np(teacher_logits)
    if s.shape != t.shape or s.ndim != 2 or s.shape[1] != num_classes:
        raise ValueError(f"student and teacher logits must both be (N, {num_classes}), got {s.shape} and {t.shape}")
    if zscore:
        s, t = zscore_logits(s), zscore_logits(t)
    return class_mean_difference(class_mean_logits(s, labels, num_classes),
                                 class_mean_logits(t, labels, num_classes), clip=clip)


def teacher_agreement(teacher_logits: Any, student_logits: Any) -> float:
    """Top-1 agreement (%): the share of samples where the student's argmax equals the teacher's."""
    t, s = _np(teacher_logits), _np(student_logits)
    if t.shape != s.shape or t.ndim != 2 or len(t) == 0:
        raise ValueError(f"logits must be two non-empty (N, C) arrays of one shape, got {t.shape} and {s.shape}")
    return float(100.0 * np.mean(t.argmax(axis=1) == s.argmax(axis=1)))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def kl_teacher_student(teacher_logits: Any, student_logits: Any, temperature: float = 1.0) -> float:
    """``mean_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ))`` in nats (τ=1: the plain test-set KL, no τ² factor)."""
    t, s = _np(teacher_logits), _np(student_logits)
    if t.shape != s.shape or t.ndim != 2 or len(t) == 0:
        raise ValueError(f"logits must be two non-empty (N, C) arrays of one shape, got {t.shape} and {s.shape}")
    log_pt, log_ps = _log_softmax(t / temperature), _log_softmax(s / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    return float(max(kl.mean(), 0.0))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA (Kornblith et al., 2019) between two representations of the same n samples.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`` with linear kernels ``K = XXᵀ``, ``L = YYᵀ`` and centred
    Grams, computed in feature space: ``‖Ycᵀ Xc‖_F² / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F)`` with column-centred Xc, Yc.
    The widths of X (n × p) and Y (n × q) may differ. In [0, 1]; 1 for X with itself; invariant to orthogonal
    transforms and isotropic scaling of either side.
    """
    a, b = _np(x), _np(y)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or len(a) < 2:
        raise ValueError(f"x and y must be (n, p) and (n, q) with n >= 2, got {a.shape} and {b.shape}")
    a = a - a.mean(axis=0, keepdims=True)
    b = b - b.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(b.T @ a, "fro") ** 2
    norm = np.linalg.norm(a.T @ a, "fro") * np.linalg.norm(b.T @ b, "fro")
    return float(cross / norm) if norm > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------
# t-SNE
# ---------------------------------------------------------------------------------------------------------
def tsne_subset(labels: Any, num_classes: int, classes: int | None, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of a fixed, seeded test subset: ``classes`` random classes (None: all), ``per_class`` random images
    of each (None: all), sorted. The same arguments always give the same indices."""
    y = _np(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    chosen = np.arange(num_classes)
    if classes is not None and classes < num_classes:
        chosen = np.sort(rng.choice(num_classes, size=classes, replace=False))
    keep = []
    for c in chosen:
        members = np.flatnonzero(y == c)
        if per_class is not None and per_class < len(members):
            members = np.sort(rng.choice(members, size=per_class, replace=False))
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def tsne_embedding(features: Any, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA init, fixed ``seed``) of (n × d) features; perplexity ``min(30, (n−1)/3)``.

    Runs single-threaded: scikit-learn's Barnes-Hut loop oversubscribes OpenMP threads on a busy CPU (measured
    ~25 s instead of 0.3 s for 100 points on 2 shared cores), and one thread also keeps the result reproducible.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    f = _np(features, dtype=np.float32)
    if f.ndim != 2 or len(f) < 4:
        raise ValueError(f"t-SNE needs an (n, d) array with n >= 4, got {f.shape}")
    perplexity = perplexity if perplexity is not None else min(30.0, (len(f) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    with threadpool_limits(limits=1):
        return np.asarray(tsne.fit_transform(f), dtype=np.float64)


def silhouette(features: Any, labels: Any, metric: str = "cosine") -> float:
    """Silhouette score of the classes in a representation (higher: better separated); NaN if undefined."""
    from sklearn.metrics import silhouette_score

    f, y = _np(features), _np(labels, dtype=np.int64)
    if len(np.unique(y)) < 2 or len(np.unique(y)) >= len(y):
        return float("nan")
    return float(silhouette_score(f, y, metric=metric))


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def mean_std_table(runs, by: Sequence[str], values: Sequence[str] = ("last_top1", "best_top1"), sort: bool = False):
    """Aggregate per-run rows: for each group of ``by``, ``n`` (runs) and ``<value>_mean``, ``<value>_std``
    (sample std, ddof=1; NaN for a single run). Group order follows first appearance unless ``sort``."""
    import pandas as pd

    by = list(by)
    if len(runs) == 0:
        return pd.DataFrame(columns=by + ["n"] + [f"{v}_{s}" for v in values for s in ("mean", "std")])
    grouped = runs.groupby(by, sort=sort, dropna=False)
    out = grouped.size().rename("n").to_frame()
    for v in values:
        out[f"{v}_mean"] = grouped[v].mean()
        out[f"{v}_std"] = grouped[v].std(ddof=1)
    return out.reset_index()


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def format_mean_std(mean: Any, std: Any = None, digits: int = 2) -> str:
    """``"73.21 ± 0.30"``; the mean alone when the std is undefined (one run); ``"–"`` when the mean is missing."""
    if _missing(mean):
        return MISSING
    if _missing(std):
        return f"{float(mean):.{digits}f}"
    return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"


def format_number(value: Any, digits: int = 2, signed: bool = False) -> str:
    """A number with ``digits`` decimals (``+`` sign when ``signed``), ``"–"`` when missing."""
    if _missing(value):
        return MISSING
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def to_markdown(df, caption: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (via ``tabulate``), with the caption as a paragraph above it."""
    # a "|" inside a cell or header would split the column: escape it
    df = df.rename(columns=lambda c: str(c).replace("|", "\\|"))
    df = df.apply(lambda col: col.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v))
    body = df.to_markdown(index=False, disable_numparse=True)
    return (f"**Table.** {caption}\n\n{body}\n" if caption else f"{body}\n")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "→": r"$\to$", "–": "--", "Δ": r"$\Delta$", "τ": r"$\tau$", "×": r"$\times$",
                  "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$", "λ": r"$\lambda$", "κ": r"$\kappa$", "‖": r"$\|$",
                  "θ": r"$\theta$", "§": r"\S{}",
                  "·": r"$\cdot$", "≈": r"$\approx$", "∈": r"$\in$"}


def latex_escape(text: Any) -> str:
    out = []
    for ch in str(text):
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or ch)
    return "".join(out)


def to_latex(df, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``); text cells escaped for LaTeX."""
    columns = list(df.columns)
    align = "".join("r" if _numeric_column(df[c]) else "l" for c in columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
              " & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def _numeric_column(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series)


def _write(path: Path, data: bytes) -> Path:
    from .files import atomic_write_bytes

    atomic_write_bytes(path, data)
    return path


def save_table(df, path_stem: str | Path, latex: bool = False, caption: str | None = None,
               label: str | None = None) -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` (and ``<stem>.tex`` with ``latex=True``) atomically.

    The CSV holds the table as it is (no caption); the Markdown and LaTeX versions carry the caption.
    Returns ``{"csv": path, "md": path[, "tex": path]}``.
    """
    stem = Path(path_stem)
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, lineterminator="\n")
    paths = {"csv": _write(stem.with_suffix(".csv"), buffer.getvalue().encode()),
             "md": _write(stem.with_suffix(".md"), to_markdown(df, caption).encode())}
    if latex:
        paths["tex"] = _write(stem.with_suffix(".tex"), to_latex(df, caption, label).encode())
    return paths


def write_csv(df, path: str | Path) -> Path:
    """One CSV file, atomically (derived data and per-run tables)."""
    buffer = io.StringIO()
    df.to_csv(buffer, index=False, lineterminator="\n")
    return _write(Path(path), buffer.getvalue().encode())


# ---------------------------------------------------------------------------------------------------------
# Figures (PNG + PDF)
# ---------------------------------------------------------------------------------------------------------
def new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path_stem: str | Path, dpi: int = 150) -> dict[str, Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` (without timestamps, so re-runs give the same PDF)."""
    stem = Path(path_stem)
    paths = {}
    for fmt, meta in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata=meta)
        paths[fmt] = _write(stem.with_suffix(f".{fmt}"), buffer.getvalue())
    return paths


def _suptitle(fig, title: str, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width (long, self-explaining titles must not be cut off)."""
    import textwrap

    width_in = fig.get_size_inches()[0]
    chars = max(30, int(width_in * 72 / (0.55 * fontsize)))
    lines = [w for part in str(title).split("\n") for w in (textwrap.wrap(part, chars) or [""])]
    fig.suptitle("\n".join(lines), fontsize=fontsize)


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels, at most ``max_cols`` a row, spread evenly (6 panels: 2 x 3, not 2 x 4
    with two empty panels)."""
    rows = int(math.ceil(n / max_cols))
    return rows, int(math.ceil(n / rows))


def plot_heatmaps(matrices: Mapping[str, Any], path_stem: str | Path, *, title: str, vmax: float = HEATMAP_VMAX,
                  class_label: str = "class", colorbar_label: str = "|mean logit difference| (student − teacher)",
                  max_cols: int = 4) -> dict[str, Path]:
    """One ``|M_student − M_teacher|`` heatmap per panel (zero diagonal), colour scale 0..``vmax`` (clipped).
    Lighter = closer to the teacher."""
    n = len(matrices)
    if n == 0:
        raise ValueError("plot_heatmaps: no matrices to plot")
    rows, cols = _grid(n, max_cols)
    fig = new_figure(3.3 * cols + 0.8, 3.4 * rows + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for i, (ax, (name, matrix)) in enumerate(zip(axes, matrices.items())):
        m = _np(matrix)
        image = ax.imshow(np.clip(m, 0, vmax), vmin=0, vmax=vmax, cmap="PuBuGn", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        if i + cols >= n:  # bottom panel of its column
            ax.set_xlabel(f"{class_label} (logit index)", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel(f"{class_label} of the test images", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[:n].tolist(), shrink=0.8, pad=0.02, label=f"{colorbar_label}, clipped at {vmax:g}")
    _suptitle(fig, title)
    return save_figure(fig, path_stem)


def plot_tsne_grid(panels: Mapping[str, tuple[Any, Any]], path_stem: str | Path, *, title: str,
                   class_names: Sequence[str] | None = None, max_cols: int = 4) -> dict[str, Path]:
    """Side-by-side 2-D t-SNE scatter plots ``{panel title: (coords (n×2), labels (n,))}``, coloured by class
    (one colour per class, shared across panels; a legend when there are at most 20 classes)."""
    n = len(panels)
    if n == 0:
        raise ValueError("plot_tsne_grid: no panels to plot")
    import matplotlib

    all_labels = np.unique(np.concatenate([_np(lab, dtype=np.int64) for _, lab in panels.values()]))
    cmap = matplotlib.colormaps["tab20" if len(all_labels) <= 20 else "gist_ncar"]
    colour = {c: cmap(i / max(len(all_labels) - 1, 1)) if len(all_labels) > 20 else cmap(i % 20)
              for i, c in enumerate(all_labels)}
    rows, cols = _grid(n, max_cols)
    fig = new_figure(3.2 * cols + (1.6 if len(all_labels) <= 20 else 0), 3.2 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, (coords, labels)) in zip(axes, panels.items()):
        xy, y = _np(coords), _np(labels, dtype=np.int64)
        for c in all_labels:
            sel = y == c
            if sel.any():
                name_c = class_names[c] if class_names is not None and c < len(class_names) else str(c)
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colour[c], label=name_c, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1", fontsize=8)
        ax.set_ylabel("t-SNE 2", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    if len(all_labels) <= 20:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center", fontsize=7, markerscale=2, title="class",
                   title_fontsize=8)
    _suptitle(fig, title)
    return save_figure(fig, path_stem)


def plot_lines(data, *, x: str, y: str, hue: str, path_stem: str | Path, title: str, xlabel: str, ylabel: str,
               yerr: str | None = None, logx: bool = False) -> dict[str, Path]:
    """One line (with ±``yerr`` error bars) per value of ``hue``: e.g. top-1 vs batch size per method."""
    return plot_line_panels([dict(data=data, x=x, y=y, hue=hue, yerr=yerr, logx=logx, xlabel=xlabel,
                                  ylabel=ylabel)], path_stem, title=title)


def plot_line_panels(panels: Sequence[Mapping[str, Any]], path_stem: str | Path, *, title: str,
                     max_cols: int = 4) -> dict[str, Path]:
    """Several line plots side by side (at most ``max_cols`` a row). Each panel is a dict with ``data, x, y, hue``
    and optionally ``yerr``, ``logx``, ``xlabel``, ``ylabel``, ``title`` and ``hlines`` (``{label: (value, err)}``:
    a horizontal reference line with a ±err band, e.g. DCD's learnable temperature beside its fixed ones)."""
    if not panels:
        raise ValueError("plot_line_panels: no panels")
    rows, cols = _grid(len(panels), max_cols)
    fig = new_figure(5.2 * cols, 3.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        _lines_on(ax, panel["data"], x=panel["x"], y=panel["y"], hue=panel["hue"], yerr=panel.get("yerr"),
                  logx=panel.get("logx", False), xlabel=panel.get("xlabel", panel["x"]),
                  ylabel=panel.get("ylabel", panel["y"]), title=panel.get("title"),
                  hlines=panel.get("hlines"))
    _suptitle(fig, title)
    return save_figure(fig, path_stem)


def _lines_on(ax, data, *, x, y, hue, yerr=None, logx=False, xlabel="", ylabel="", title=None, hlines=None) -> None:
    colours = iter(["#c44e52", "#8172b2", "#937860", "#da8bc3"])
    for name, (value, err) in (hlines or {}).items():
        if _missing(value):
            continue
        colour = next(colours)
        ax.axhline(value, color=colour, linestyle="--", linewidth=1.2, label=str(name))
        if not _missing(err) and err > 0:
            ax.axhspan(value - err, value + err, color=colour, alpha=0.15, linewidth=0)
    for name, group in data.groupby(hue, sort=False):
        group = group.sort_values(x)
        err = group[yerr].fillna(0).to_numpy() if yerr else None
        if err is not None and (err > 0).any():
            ax.errorbar(group[x].to_numpy(), group[y].to_numpy(), yerr=err, marker="o", capsize=3, label=str(name))
        else:  # one seed: no spread to show, so no error-bar markers (in the plot or the legend)
            few = len(group) <= CURVE_MARKER_MAX_POINTS
            ax.plot(group[x].to_numpy(), group[y].to_numpy(), marker="o" if few else None,
                    linewidth=1.5 if few else 1.0, label=str(name))
    if logx:
        ax.set_xscale("log", base=2)
        ticks = sorted(data[x].unique())
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_bars(data, *, label: str, value: str, path_stem: str | Path, title: str, xlabel: str,
              err: str | None = None, group: str | None = None,
              reference: Mapping[str, float] | Mapping[Any, Mapping[str, float]] | None = None,
              max_cols: int = 4) -> dict[str, Path]:
    """Horizontal bars ``value`` (± ``err``) per ``label``; one panel per ``group`` value (if given), at most
    ``max_cols`` panels a row. ``reference`` draws labelled dashed vertical lines, ``{name: x}`` for every panel
    or ``{group value: {name: x}}`` per panel (e.g. each pair's KD baseline)."""
    groups = list(dict.fromkeys(data[group])) if group else [None]
    rows, cols = _grid(len(groups), max_cols)
    most = max(len(data[data[group] == g]) if group else len(data) for g in groups)
    fig = new_figure(4.6 * cols + 0.6, rows * max(2.0, 0.3 * most + 1.1) + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, g in zip(axes, groups):
        part = data if g is None else data[data[group] == g]
        pos = np.arange(len(part))[::-1]
        values = part[value].to_numpy(dtype=float)
        errors = part[err].fillna(0).to_numpy(dtype=float) if err else np.zeros(len(part))
        ax.barh(pos, np.nan_to_num(values), xerr=errors, color="#4c72b0", alpha=0.85, capsize=3)
        ax.set_yticks(pos)
        ax.set_yticklabels([str(v) for v in part[label]], fontsize=8)
        refs = dict(reference.get(g, {}) if reference and g in reference and isinstance(reference[g], Mapping)
                    else (reference or {}))
        refs = {k: v for k, v in refs.items() if not isinstance(v, Mapping) and not _missing(v)}
        finite = np.isfinite(values)
        if finite.any():  # bars start at 0: a bar's length is its value (a cut axis exaggerates differences)
            hi = max([float(np.max(values[finite] + errors[finite]))] + list(refs.values()))
            ax.set_xlim(0.0, min(100.0, 1.12 * hi) if hi <= 100 else 1.12 * hi)
        styles = iter([("#c44e52", "--"), ("#55a868", ":"), ("#8172b2", "-."), ("#937860", "--")])
        for name, ref in refs.items():
            colour, style = next(styles)
            ax.axvline(ref, color=colour, linestyle=style, linewidth=1.2, label=f"{name} ({ref:.2f})")
        if refs:
            ax.legend(fontsize=7, loc="best", framealpha=0.9)
        if g is not None:
            ax.set_title(str(g), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    _suptitle(fig, title)
    return save_figure(fig, path_stem)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path_stem: str | Path, *,
                title: str, xlabel: str, ylabel: str) -> dict[str, Path]:
    """Plain line plots ``{label: (x, y)}`` on one axis (e.g. test top-1 per epoch of each teacher)."""
    fig = new_figure(5.6, 3.8)
    ax = fig.subplots()
    for name, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="." if len(xs) <= CURVE_MARKER_MAX_POINTS else None, label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    _suptitle(fig, title)
    return save_figure(fig, path_stem)
