"""ckd_study.analysis against naive references and hand-made examples (CPU, seconds)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from ckd_study import analysis


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------
# class means and the correlation difference
# ---------------------------------------------------------------------------------------------------------
def test_class_mean_logits_matches_a_loop():
    rng = _rng()
    logits, labels = rng.normal(size=(60, 5)), rng.integers(0, 5, size=60)
    labels[:5] = np.arange(5)  # every class present
    expected = np.zeros((5, 5))
    for c in range(5):
        rows = [logits[i] for i in range(len(labels)) if labels[i] == c]
        expected[c] = sum(rows) / len(rows)
    got = analysis.class_mean_logits(logits, labels, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # torch input gives the same numbers
    np.testing.assert_allclose(analysis.class_mean_logits(torch.tensor(logits), torch.tensor(labels), 5), expected)


def test_class_mean_logits_marks_an_empty_class_and_rejects_bad_labels():
    got = analysis.class_mean_logits(np.ones((3, 4)), np.array([0, 0, 2]), 4)
    assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
    np.testing.assert_allclose(got[0], 1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        analysis.class_mean_logits(np.ones((2, 4)), np.array([0, 4]), 4)


def test_correlation_difference_on_a_hand_made_example():
    # 3 classes, 2 images each. Teacher logits are fixed; the student differs by known amounts.
    labels = np.array([0, 0, 1, 1, 2, 2])
    teacher = np.array([[3, 0, 0], [1, 0, 0], [0, 2, 0], [0, 2, 0], [0, 0, 1], [0, 0, 1]], dtype=float)
    student = teacher.copy()
    student[0:2, 1] += 5.0    # class 0 images: logit 1 off by 5 (mean diff 5)
    student[2:4, 0] -= 1.0    # class 1 images: logit 0 off by 1
    student[4, 2] += 10.0     # class 2: the diagonal (own-class logit) off by 5 on average: zeroed
    matrix, stats = analysis.correlation_difference(student, teacher, labels, 3)
    expected = np.zeros((3, 3))
    expected[0, 1] = 5.0
    expected[1, 0] = 1.0
    np.testing.assert_allclose(matrix, expected)
    assert np.all(np.diag(matrix) == 0)
    assert stats["max"] == pytest.approx(5.0)
    assert stats["mean"] == pytest.approx(6.0 / 6)  # mean over the 6 off-diagonal entries
    clipped, clipped_stats = analysis.correlation_difference(student, teacher, labels, 3, clip=3.0)
    assert clipped[0, 1] == 3.0 and clipped[1, 0] == 1.0 and clipped.max() == 3.0
    assert clipped_stats == stats  # statistics are computed before clipping
    assert analysis.HEATMAP_VMAX == 3.0


def test_correlation_difference_zscore_ignores_logit_scale_and_shift():
    rng = _rng(1)
    teacher = rng.normal(size=(40, 4))
    labels = np.arange(40) % 4
    student = 7.0 * teacher + 3.0  # same ranking, different scale/offset
    raw, raw_stats = analysis.correlation_difference(student, teacher, labels, 4)
    z, z_stats = analysis.correlation_difference(student, teacher, labels, 4, zscore=True)
    assert raw_stats["max"] > 1.0
    assert z_stats["max"] < 1e-5 and np.all(np.diag(z) == 0)
    z_ref = analysis.zscore_logits(teacher)
    np.testing.assert_allclose(z_ref.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(z_ref.std(axis=1), 1, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# agreement, KL, CKA
# ---------------------------------------------------------------------------------------------------------
def test_teacher_agreement():
    teacher = np.array([[2, 1, 0], [0, 2, 1], [0, 1, 2], [3, 0, 0]], dtype=float)
    student = np.array([[5, 1, 0], [2, 0, 1], [0, 1, 2], [0, 0, 1]], dtype=float)
    assert analysis.teacher_agreement(teacher, student) == pytest.approx(50.0)
    assert analysis.teacher_agreement(teacher, teacher) == 100.0


def test_kl_teacher_student_zero_for_identical_and_matches_a_naive_sum():
    rng = _rng(2)
    t, s = rng.normal(size=(10, 6)), rng.normal(size=(10, 6))
    assert analysis.kl_teacher_student(t, t) == pytest.approx(0.0, abs=1e-12)
    assert analysis.kl_teacher_student(t, t + 4.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant softmax
    naive = 0.0
    for i in range(10):
        pt = np.exp(t[i]) / np.exp(t[i]).sum()
        ps = np.exp(s[i]) / np.exp(s[i]).sum()
        naive += sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(6))
    assert analysis.kl_teacher_student(t, s) == pytest.approx(naive / 10, rel=1e-10)
    # agrees with torch's KL(teacher ‖ student)
    ref = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(s), 1), torch.log_softmax(torch.tensor(t), 1),
                                     log_target=True, reduction="batchmean")
    assert analysis.kl_teacher_student(t, s) == pytest.approx(float(ref), rel=1e-10)


def _naive_cka(x, y):
    """Centred-Gram linear CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XXᵀ, L = YYᵀ."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.sum(k * l) / math.sqrt(np.sum(k * k) * np.sum(l * l))


def test_linear_cka_properties_and_reference():
    rng = _rng(3)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(50, 5))
    assert analysis.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert analysis.linear_cka(x, x @ q) == pytest.approx(1.0)            # orthogonal transform
    assert analysis.linear_cka(x, 3.7 * x) == pytest.approx(1.0)          # isotropic scaling
    assert analysis.linear_cka(x, x + 5.0) == pytest.approx(1.0)          # translation (centred)
    value = analysis.linear_cka(x, y)
    assert value == pytest.approx(_naive_cka(x, y), rel=1e-9)
    assert analysis.linear_cka(x, y @ np.linalg.qr(rng.normal(size=(5, 5)))[0] * 2.0) == pytest.approx(value)
    assert 0.0 < value < 1.0
    unrelated = analysis.linear_cka(x, rng.normal(size=(50, 8)))
    assert unrelated < value
    # not invariant to a non-isotropic scaling
    assert analysis.linear_cka(x, x * np.array([10.0] + [1.0] * 7)) < 0.999
    assert analysis.linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(value)


# ---------------------------------------------------------------------------------------------------------
# t-SNE
# ---------------------------------------------------------------------------------------------------------
def test_tsne_subset_is_fixed_and_balanced():
    labels = np.repeat(np.arange(10), 7)
    a = analysis.tsne_subset(labels, 10, classes=4, per_class=3, seed=5)
    b = analysis.tsne_subset(labels, 10, classes=4, per_class=3, seed=5)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 12 and len(np.unique(labels[a])) == 4
    assert all(np.sum(labels[a] == c) == 3 for c in np.unique(labels[a]))
    assert not np.array_equal(a, analysis.tsne_subset(labels, 10, classes=4, per_class=3, seed=6))
    np.testing.assert_array_equal(analysis.tsne_subset(labels, 10, None, None, 0), np.arange(70))


def test_tsne_embedding_is_deterministic_and_separates_clusters():
    rng = _rng(4)
    centres = np.array([[0.0] * 6, [20.0] * 6])
    feats = np.concatenate([c + rng.normal(size=(20, 6)) for c in centres])
    labels = np.repeat([0, 1], 20)
    a = analysis.tsne_embedding(feats, seed=0)
    b = analysis.tsne_embedding(feats, seed=0)
    assert a.shape == (40, 2)
    np.testing.assert_allclose(a, b)
    assert analysis.silhouette(a, labels, metric="euclidean") > 0.5
    assert analysis.silhouette(feats, labels, metric="euclidean") > 0.5
    assert math.isnan(analysis.silhouette(feats, np.zeros(40, dtype=int)))


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------
def test_mean_std_table_and_formatting():
    runs = pd.DataFrame({"method": ["kd", "kd", "kd", "ckd"], "seed": [0, 1, 2, 0],
                         "last_top1": [70.0, 71.0, 72.0, 73.5], "best_top1": [71.0, 71.5, 72.5, 74.0]})
    agg = analysis.mean_std_table(runs, by=["method"])
    assert list(agg["method"]) == ["kd", "ckd"]  # order of first appearance
    kd = agg[agg["method"] == "kd"].iloc[0]
    assert kd["n"] == 3 and kd["last_top1_mean"] == pytest.approx(71.0)
    assert kd["last_top1_std"] == pytest.approx(np.std([70, 71, 72], ddof=1))
    ckd = agg[agg["method"] == "ckd"].iloc[0]
    assert ckd["n"] == 1 and math.isnan(ckd["last_top1_std"])
    assert analysis.format_mean_std(71.0, 1.0) == "71.00 ± 1.00"
    assert analysis.format_mean_std(73.5, float("nan")) == "73.50"
    assert analysis.format_mean_std(None) == "–"
    assert analysis.format_number(1.234, signed=True) == "+1.23"
    assert analysis.format_number(-0.5, signed=True) == "-0.50"
    assert analysis.format_number(float("nan")) == "–"


def test_save_table_writes_csv_markdown_and_latex(tmp_path):
    df = pd.DataFrame({"T → S": ["a → b"], "method": ["KD+LS_1"], "top-1 (%)": ["71.00 ± 1.00"], "n": [3]})
    paths = analysis.save_table(df, tmp_path / "sub" / "table", latex=True, caption="Top-1 (%) & more")
    assert set(paths) == {"csv", "md", "tex"}
    # the CSV holds exactly the frame: header and row as written by hand, no index column, UTF-8
    assert paths["csv"].read_text(encoding="utf-8") == "T → S,method,top-1 (%),n\na → b,KD+LS_1,71.00 ± 1.00,3\n"
    back = pd.read_csv(paths["csv"])
    pd.testing.assert_frame_equal(back, df)
    assert list(back.columns) == list(df.columns) and back.iloc[0]["top-1 (%)"] == "71.00 ± 1.00"
    md = paths["md"].read_text()
    assert md.startswith("**Table.** Top-1 (%) & more") and "| T → S" in md and "71.00 ± 1.00" in md
    tex = paths["tex"].read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and r"Top-1 (\%) \& more" in tex
    assert r"71.00 $\pm$ 1.00" in tex and r"KD+LS\_1" in tex and r"a $\to$ b" in tex
    assert not list(tmp_path.glob("**/*.tmp"))
    assert "tex" not in analysis.save_table(df, tmp_path / "plain")


# ---------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------
def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _is_pdf(path) -> bool:
    return path.read_bytes()[:5] == b"%PDF-"


def test_plot_helpers_write_png_and_pdf(tmp_path):
    rng = _rng(5)
    heat = analysis.plot_heatmaps({"KD": rng.uniform(0, 5, (6, 6)), "CKD": rng.uniform(0, 2, (6, 6))},
                                  tmp_path / "heat", title="heatmap")
    tsne = analysis.plot_tsne_grid({"A": (rng.normal(size=(30, 2)), np.arange(30) % 3)}, tmp_path / "tsne",
                                   title="t-SNE", class_names=["x", "y", "z"])
    data = pd.DataFrame({"method": ["KD", "KD", "CKD", "CKD"], "batch": [32, 64, 32, 64],
                         "top1": [70.0, 71.0, 72.0, 72.5], "std": [0.2, np.nan, 0.1, 0.3]})
    lines = analysis.plot_lines(data, x="batch", y="top1", yerr="std", hue="method", logx=True,
                                path_stem=tmp_path / "lines", title="t", xlabel="batch", ylabel="top-1 (%)")
    panels = analysis.plot_line_panels([dict(data=data, x="batch", y="top1", hue="method",
                                             hlines={"learnable": (71.5, 0.2)})], tmp_path / "panels", title="p")
    bars = analysis.plot_bars(data.assign(label=["a", "b", "c", "d"]), label="label", value="top1", err="std",
                              group="method", reference={"KD": {"ref": 70.5}}, path_stem=tmp_path / "bars",
                              title="b", xlabel="top-1 (%)")
    curves = analysis.plot_curves({"t": ([1, 2, 3], [10, 20, 25])}, tmp_path / "curves", title="c", xlabel="epoch",
                                  ylabel="top-1 (%)")
    for paths in (heat, tsne, lines, panels, bars, curves):
        assert _is_png(paths["png"]) and _is_pdf(paths["pdf"])
        assert paths["png"].stat().st_size > 1000 and paths["pdf"].stat().st_size > 1000
    # no timestamps: drawing the same figure twice gives the same PDF and PNG bytes
    again = analysis.plot_heatmaps({"KD": np.ones((6, 6)), "CKD": np.zeros((6, 6))}, tmp_path / "h2", title="h")
    again2 = analysis.plot_heatmaps({"KD": np.ones((6, 6)), "CKD": np.zeros((6, 6))}, tmp_path / "h3", title="h")
    assert again["pdf"].read_bytes() == again2["pdf"].read_bytes()
    assert again["png"].read_bytes() == again2["png"].read_bytes()


def test_curves_carry_markers_up_to_the_shared_bound_and_none_beyond(tmp_path, monkeypatch):
    """plot_curves and the line panels decide "markers only on short curves" with one bound."""
    drawn = []
    monkeypatch.setattr(analysis, "save_figure", lambda fig, stem: drawn.append(fig) or {})
    bound = analysis.CURVE_MARKER_MAX_POINTS
    short, long = list(range(bound)), list(range(bound + 1))
    analysis.plot_curves({"short": (short, short), "long": (long, long)}, tmp_path / "c", title="c",
                         xlabel="epoch", ylabel="top-1 (%)")
    data = pd.DataFrame({"epoch": short + long, "top1": [float(v) for v in short + long],
                         "run": ["short"] * len(short) + ["long"] * len(long)})
    analysis.plot_line_panels([dict(data=data, x="epoch", y="top1", hue="run")], tmp_path / "p", title="p")
    for fig in drawn:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert lines["short"].get_marker() not in (None, "None", "")
        assert lines["long"].get_marker() in (None, "None", "")
