"""Every registered method's total loss against the spec, on fixed logits and features (CPU, milliseconds).

The references below are written from ``shared/docs/methods.md`` with plain float64 torch ops and loops; they
never call ``ckd_study.losses``. Each method is built as the trainer builds it (``create_method(name, student,
teacher, num_train=..., train_labels=..., **options)``) and called on hand-made ``ModelOutput`` objects, so
what is checked is the number the trainer back-propagates: the sum of the terms a method returns, with its
weights, α/β, temperatures, standardisation, warm-ups and options applied. The spec's defaults are written
here too (``SPEC_DEFAULTS``), so a changed default shows up as well.

CRD and DCD own trainable heads (and CRD its memory): the references read those modules' current weights and
memory, but the maths (NCE over the memory, the contrastive cross-entropy and consistency KL) is written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from ckd_study.config import make_config
from ckd_study.methods import available_methods, create_method, resolve_options
from ckd_study.models import ModelOutput, create_model

B, C = 6, 10
LABELS = torch.tensor([0, 3, 3, 7, 0, 9])
RTOL = 1e-5

# The spec's defaults (methods.md §1-4 and the option tables of the README), written independently of the code.
SPEC_DEFAULTS = {
    "ce": {},
    "kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "kd_ls": {"temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0, "unbiased_std": True},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20.0, "ce_weight": 1.0},
    "dkd_ls": {"alpha": 1.0, "beta": 8.0, "temperature": 2.0, "warmup": 20.0, "ce_weight": 1.0, "kd_weight": 9.0,
               "unbiased_std": True},
    "crd": {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "weight": 0.8, "ce_weight": 1.0,
            "negatives": "exact"},
    "ckd": {"temperature": 1.0, "weight": 100.0, "anchor": "teacher", "negatives": "teacher_student",
            "terms": ["intra", "inter"], "ce_weight": 1.0},
    "mcld": {"temperature": 1.0, "normalize": "l2", "target_mask": "none", "sample_mode": "reverse",
             "lambda_instance": 50.0, "lambda_sample": 50.0, "lambda_category": 50.0, "warmup": 20.0,
             "components": ["instance", "sample", "category"], "ce_weight": 1.0},
    "dcd": {"embed_dim": 128, "init_log_inv_temperature": 1.0, "max_inv_temperature": 10.0,
            "fixed_temperature": None, "consistency_weight": 0.5, "ce_weight": 1.0, "kd_weight": 0.0,
            "kd_temperature": 4.0},
    "dcd_kd": {"embed_dim": 128, "init_log_inv_temperature": 1.0, "max_inv_temperature": 10.0,
               "fixed_temperature": None, "consistency_weight": 0.5, "ce_weight": 1.0, "kd_weight": 1.0,
               "kd_temperature": 4.0},
}


# ---------------------------------------------------------------------------------------------------------
# Fixed inputs
# ---------------------------------------------------------------------------------------------------------
def _models():
    torch.manual_seed(0)
    # distinct pooled widths (64 vs 128), so a swapped head would not even run
    return create_model("resnet8", C), create_model("wrn_16_2", C)


STUDENT, TEACHER = _models()


def _outputs(seed: int = 5, scale_s: float = 3.0, scale_t: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    s = scale_s * torch.randn(B, C, generator=g) + 0.5
    t = scale_t * torch.randn(B, C, generator=g) - 1.0
    fs = torch.rand(B, STUDENT.pooled_dim, generator=g) * 2.0  # pooled features are post-ReLU averages
    ft = torch.rand(B, TEACHER.pooled_dim, generator=g) * 2.0
    return (ModelOutput(logits=s, feats=[], preact_feats=[], pooled=fs),
            ModelOutput(logits=t, feats=[], preact_feats=[], pooled=ft))


def _build(name: str, num_train: int = 64, train_labels=None, **options):
    teacher = TEACHER if name != "ce" else None
    labels = train_labels if train_labels is not None else torch.arange(num_train) % C
    return create_method(name, STUDENT, teacher, num_train=num_train, train_labels=labels, **options)


def _f(value: torch.Tensor) -> float:
    return value.detach().item()


def _total(terms: dict) -> float:
    return float(sum(v.detach().double() for v in terms.values()))


# ---------------------------------------------------------------------------------------------------------
# Reference maths (float64, plain ops)
# ---------------------------------------------------------------------------------------------------------
def _d(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double()


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    m = z.max()
    return z - m - torch.log(torch.exp(z - m).sum())


def _softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_softmax(z))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p ‖ q) of two probability vectors."""
    return float(sum(float(p[k]) * (math.log(float(p[k])) - math.log(float(q[k]))) for k in range(len(p))
                     if float(p[k]) > 0))


def ref_ce(s, y) -> float:
    s = _d(s)
    return sum(-float(_log_softmax(s[i])[int(y[i])]) for i in range(len(y))) / len(y)


def ref_kd(s, t, tau: float) -> float:
    s, t = _d(s), _d(t)
    return tau**2 * sum(_kl(_softmax(t[i] / tau), _softmax(s[i] / tau)) for i in range(len(s))) / len(s)


def ref_zscore(z) -> torch.Tensor:
    """(z - mean) / (1e-7 + std), std with the unbiased C - 1 denominator, per row."""
    z = _d(z)
    rows = []
    for row in z:
        mu = sum(float(v) for v in row) / len(row)
        sd = math.sqrt(sum((float(v) - mu) ** 2 for v in row) / (len(row) - 1))
        rows.append((row - mu) / (1e-7 + sd))
    return torch.stack(rows)


def ref_tckd_nckd(s, t, y, tau: float) -> tuple[float, float]:
    """Unweighted batch means of TCKD and NCKD, times τ² (DKD, methods.md §1)."""
    s, t = _d(s), _d(t)
    tckd = nckd = 0.0
    for i in range(len(y)):
        target = int(y[i])
        ps, pt = _softmax(s[i] / tau), _softmax(t[i] / tau)
        bs = torch.stack([ps[target], 1 - ps[target]])
        bt = torch.stack([pt[target], 1 - pt[target]])
        tckd += _kl(bt, bs)
        rest = [k for k in range(len(ps)) if k != target]
        ns, nt = _softmax(s[i][rest] / tau), _softmax(t[i][rest] / tau)
        nckd += _kl(nt, ns)
    n = len(y)
    return tau**2 * tckd / n, tau**2 * nckd / n


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


def _cos(a, b) -> float:
    return float((_unit(a) * _unit(b)).sum())


def _lse(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ref_ckd(s, t, tau, anchor, negatives, terms, inter_positive=True) -> float:
    """CKD (methods.md §2): P_ij = cos(t_i, s_j); intra = mean_i -P_ii/τ; inter per the anchor/negatives, over
    every j, or over j != i only (``inter_positive=False``)."""
    s, t = _d(s), _d(t)
    n = len(s)
    P = [[_cos(t[i], s[j]) / tau for j in range(n)] for i in range(n)]
    intra = sum(-P[i][i] for i in range(n)) / n
    keep = (lambda i, j: True) if inter_positive else (lambda i, j: i != j)
    if negatives == "student_student":
        S = [[_cos(s[i], s[j]) / tau for j in range(n)] for i in range(n)]
        positive = [[P[i][i]] if inter_positive else [] for i in range(n)]
        inter = sum(_lse(positive[i] + [S[i][j] for j in range(n) if j != i]) for i in range(n)) / n
    else:
        rows = sum(_lse([P[i][j] for j in range(n) if keep(i, j)]) for i in range(n)) / n          # teacher: rows
        cols = sum(_lse([P[i][j] for i in range(n) if keep(i, j)]) for j in range(n)) / n          # student: cols
        inter = {"teacher": rows, "student": cols, "both": 0.5 * (rows + cols)}[anchor]
    return (intra if "intra" in terms else 0.0) + (inter if "inter" in terms else 0.0)


def _mnorm(v: torch.Tensor, normalize: str) -> torch.Tensor:
    """MCLD normalisation of one vector: L2, or z-score (over its entries) then L2."""
    if normalize == "zscore+l2":
        mu = float(v.mean())
        sd = math.sqrt(float(((v - mu) ** 2).sum()) / (len(v) - 1))
        v = (v - mu) / sd
    return _unit(v)


def _pair_logit(a, b, drop: int | None, normalize, tau) -> float:
    """n(a) . n(b) / τ, with class ``drop`` removed from both vectors first (the gt_logit mask)."""
    keep = [k for k in range(len(a)) if k != drop]
    return float((_mnorm(a[keep], normalize) * _mnorm(b[keep], normalize)).sum()) / tau


def _row_ce(rows, excluded) -> float:
    """mean_i [-log softmax_j(A_ij)[i]], the pairs (i, j) in ``excluded`` left out of the denominator."""
    n = len(rows)
    return sum(_lse([rows[i][j] for j in range(n) if (i, j) not in excluded]) - rows[i][i] for i in range(n)) / n


def ref_mcld_pair(anchors, candidates, y, tau, normalize, mask) -> float:
    """Instance-wise (anchors = student rows) or reverse sample-wise (anchors = teacher rows) term."""
    n = len(y)
    rows = [[_pair_logit(anchors[i], candidates[j], int(y[i]) if mask == "gt_logit" else None, normalize, tau)
             for j in range(n)] for i in range(n)]
    excluded = {(i, j) for i in range(n) for j in range(n)
                if mask == "same_label" and j != i and int(y[i]) == int(y[j])}
    return _row_ce(rows, excluded)


def ref_mcld_label(s, t, y, tau, normalize, mask) -> float:
    """Supervised-contrastive sample-wise term: anchor s_i, candidates t_j, positives the same-label j."""
    n = len(y)
    total = 0.0
    for i in range(n):
        row = [_pair_logit(s[i], t[j], int(y[i]) if mask == "gt_logit" else None, normalize, tau) for j in range(n)]
        lse = _lse(row)
        positives = [j for j in range(n) if int(y[j]) == int(y[i])]
        total += -sum(row[p] - lse for p in positives) / len(positives)
    return total / n


def ref_mcld_category(s, t, y, tau, normalize, mask) -> float:
    """Columns as items: anchor S[:, c], positive T[:, c]; gt_logit drops entry (i, y_i) of every column."""
    n, classes = s.shape

    def column(z, c):
        keep = [i for i in range(n) if not (mask == "gt_logit" and int(y[i]) == c)]
        out = torch.zeros(n, dtype=torch.float64)
        out[keep] = _mnorm(z[keep, c], normalize)
        return out

    sc = [column(s, c) for c in range(classes)]
    tc = [column(t, c) for c in range(classes)]
    rows = [[float((sc[c] * tc[k]).sum()) / tau for k in range(classes)] for c in range(classes)]
    return _row_ce(rows, set())


def ref_mcld(s, t, y, o, epoch) -> float:
    s, t = _d(s), _d(t)
    tau, norm, mask = o["temperature"], o["normalize"], o["target_mask"]
    total = o["ce_weight"] * ref_ce(s, y)
    if "instance" in o["components"]:
        total += o["lambda_instance"] * ref_mcld_pair(s, t, y, tau, norm, mask)
    if "sample" in o["components"]:
        if o["sample_mode"] == "reverse":
            sample = ref_mcld_pair(t, s, y, tau, norm, mask)
        else:
            sample = ref_mcld_label(s, t, y, tau, norm, mask)
        total += o["lambda_sample"] * sample
    if "category" in o["components"]:
        total += _warm(epoch, o["warmup"]) * o["lambda_category"] * ref_mcld_category(s, t, y, tau, norm, mask)
    return total


def _warm(epoch: int, warmup: float) -> float:
    return 1.0 if warmup == 0 else min(epoch / warmup, 1.0)


def _linear(layer: torch.nn.Linear, x) -> torch.Tensor:
    return _d(x) @ _d(layer.weight).T + _d(layer.bias)


def ref_dcd(method, s_out, t_out, y, o) -> float:
    """DCD (methods.md §4): L = κ u vᵀ + b; CE of rows against the diagonal + w·mean_i KL(Q_i ‖ P_i)."""
    u = [_unit(r) for r in _linear(method.head_student, s_out.pooled)]
    v = [_unit(r) for r in _linear(method.head_teacher, t_out.pooled)]
    if o["fixed_temperature"] is not None:
        kappa = 1.0 / o["fixed_temperature"]
    else:
        kappa = min(math.exp(method.log_inv_temperature.item()), o["max_inv_temperature"])
    b = method.bias.item()
    n = len(u)
    L = [[kappa * float((u[i] * v[j]).sum()) + b for j in range(n)] for i in range(n)]
    contrastive = _row_ce(L, set())
    consistency = 0.0
    for i in range(n):
        p = _softmax(torch.tensor(L[i], dtype=torch.float64))
        q = _softmax(torch.tensor([L[j][i] for j in range(n)], dtype=torch.float64))
        consistency += _kl(q, p)
    total = o["ce_weight"] * ref_ce(s_out.logits, y) + contrastive + o["consistency_weight"] * consistency / n
    if o["kd_weight"] > 0:
        total += o["kd_weight"] * ref_kd(s_out.logits, t_out.logits, o["kd_temperature"])
    return total


def ref_logit_method(name, s, t, y, o, epoch) -> float:
    """Totals of ce, kd, kd_ls, dkd, dkd_ls, ckd, mcld from the spec's formulas."""
    if name == "ce":
        return ref_ce(s, y)
    if name == "kd":
        return o["ce_weight"] * ref_ce(s, y) + o["kd_weight"] * ref_kd(s, t, o["temperature"])
    if name == "kd_ls":
        return o["ce_weight"] * ref_ce(s, y) + o["kd_weight"] * ref_kd(ref_zscore(s), ref_zscore(t), o["temperature"])
    if name in ("dkd", "dkd_ls"):
        ls = name == "dkd_ls"
        zs, zt = (ref_zscore(s), ref_zscore(t)) if ls else (s, t)
        tckd, nckd = ref_tckd_nckd(zs, zt, y, o["temperature"])
        scale = o["kd_weight"] if ls else 1.0  # DKD+LS: the KD weight multiplies α and β (released trainer)
        return (o["ce_weight"] * ref_ce(s, y)
                + _warm(epoch, o["warmup"]) * scale * (o["alpha"] * tckd + o["beta"] * nckd))
    if name == "ckd":
        return o["ce_weight"] * ref_ce(s, y) + o["weight"] * ref_ckd(s, t, o["temperature"], o["anchor"],
                                                                    o["negatives"], o["terms"],
                                                                    o.get("inter_positive", True))
    if name == "mcld":
        return ref_mcld(s, t, y, o, epoch)
    raise AssertionError(name)


def _spec(name: str, **options) -> dict:
    o = dict(SPEC_DEFAULTS[name])
    o.update(options)
    return o


# ---------------------------------------------------------------------------------------------------------
# The registry is covered, and the defaults are the spec's
# ---------------------------------------------------------------------------------------------------------
def test_every_registered_method_has_a_reference_here():
    assert set(available_methods()) == set(SPEC_DEFAULTS)


@pytest.mark.parametrize("name", sorted(SPEC_DEFAULTS))
def test_defaults_are_the_spec_defaults(name):
    assert resolve_options(name) == SPEC_DEFAULTS[name]


# ---------------------------------------------------------------------------------------------------------
# Logit methods: ce, kd, kd_ls, dkd, dkd_ls, ckd, mcld
# ---------------------------------------------------------------------------------------------------------
LOGIT_CASES = [
    ("ce", {}, 1),
    ("kd", {}, 1),
    ("kd", {"temperature": 2.5, "ce_weight": 0.3, "kd_weight": 1.7}, 1),
    ("kd", {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0}, 1),
    ("kd_ls", {}, 1),
    ("kd_ls", {"temperature": 3.0, "ce_weight": 0.25, "kd_weight": 4.0}, 7),
    ("dkd", {}, 3),
    ("dkd", {}, 30),
    ("dkd", {"alpha": 2.0, "beta": 5.0, "temperature": 3.0, "warmup": 4.0, "ce_weight": 0.5}, 1),
    ("dkd", {"alpha": 5.0, "beta": 2.0, "temperature": 3.0, "warmup": 4.0, "ce_weight": 0.5}, 6),
    ("dkd", {"alpha": 0.5, "beta": 3.0, "warmup": 0.0}, 1),
    ("dkd_ls", {}, 3),
    ("dkd_ls", {}, 25),
    ("dkd_ls", {"alpha": 2.0, "beta": 5.0, "kd_weight": 3.0, "temperature": 1.5, "warmup": 10.0}, 4),
    ("dkd_ls", {"kd_weight": 1.0, "beta": 2.0}, 40),
    ("ckd", {}, 1),
    ("ckd", {"temperature": 0.5, "weight": 7.0, "ce_weight": 0.3}, 1),
    ("ckd", {"anchor": "student", "temperature": 2.0}, 1),
    ("ckd", {"inter_positive": False, "anchor": "both", "terms": ["inter"]}, 1),
    ("ckd", {"inter_positive": False, "negatives": "student_student"}, 1),
    ("ckd", {"anchor": "both", "weight": 3.0}, 1),
    ("ckd", {"negatives": "student_student", "temperature": 0.7}, 1),
    ("ckd", {"negatives": "student_student", "anchor": "student", "temperature": 0.7}, 1),
    ("ckd", {"terms": ["intra"], "weight": 2.0}, 1),
    ("ckd", {"terms": ["inter"], "weight": 2.0, "anchor": "student"}, 1),
    ("mcld", {}, 1),
    ("mcld", {}, 30),
    ("mcld", {"temperature": 0.5, "warmup": 4.0, "lambda_instance": 3.0, "lambda_sample": 7.0,
              "lambda_category": 11.0, "ce_weight": 0.2}, 2),
    ("mcld", {"normalize": "zscore+l2", "temperature": 2.0}, 5),
    ("mcld", {"target_mask": "same_label"}, 5),
    ("mcld", {"target_mask": "gt_logit"}, 5),
    ("mcld", {"target_mask": "gt_logit", "normalize": "zscore+l2"}, 5),
    ("mcld", {"sample_mode": "label"}, 5),
    ("mcld", {"sample_mode": "label", "target_mask": "gt_logit", "temperature": 0.8}, 5),
    ("mcld", {"components": ["category"], "warmup": 0.0}, 1),
    ("mcld", {"components": ["instance", "sample"], "lambda_sample": 9.0}, 1),
    ("mcld", {"components": ["sample"], "sample_mode": "label", "target_mask": "same_label"}, 1),
]


@pytest.mark.parametrize("name, options, epoch", LOGIT_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}-e{e}"
                              for n, o, e in LOGIT_CASES])
def test_logit_method_total_matches_the_spec(name, options, epoch):
    s_out, t_out = _outputs()
    method = _build(name, **options)
    terms = method(s_out, t_out if name != "ce" else None, LABELS, torch.arange(B), epoch)
    expected = ref_logit_method(name, s_out.logits, t_out.logits, LABELS, _spec(name, **options), epoch)
    assert _total(terms) == pytest.approx(expected, rel=RTOL)


def test_dkd_alpha_weights_tckd_and_beta_weights_nckd():
    """The two DKD weights are not interchangeable: each term carries its own (a swap fails here)."""
    s_out, t_out = _outputs()
    tckd, nckd = ref_tckd_nckd(s_out.logits, t_out.logits, LABELS, 4.0)
    assert abs(tckd - nckd) > 0.1 * max(tckd, nckd)  # the check below can tell them apart
    terms = _build("dkd", alpha=2.0, beta=5.0, warmup=0.0)(s_out, t_out, LABELS, None, 1)
    assert _f(terms["dkd_tckd"]) == pytest.approx(2.0 * tckd, rel=RTOL)
    assert _f(terms["dkd_nckd"]) == pytest.approx(5.0 * nckd, rel=RTOL)
    zs, zt = ref_zscore(s_out.logits), ref_zscore(t_out.logits)
    tckd_ls, nckd_ls = ref_tckd_nckd(zs, zt, LABELS, 2.0)
    terms = _build("dkd_ls", alpha=2.0, beta=5.0, kd_weight=3.0, warmup=0.0)(s_out, t_out, LABELS, None, 1)
    assert _f(terms["dkd_tckd"]) == pytest.approx(3.0 * 2.0 * tckd_ls, rel=RTOL)
    assert _f(terms["dkd_nckd"]) == pytest.approx(3.0 * 5.0 * nckd_ls, rel=RTOL)


def test_kd_weights_are_not_swapped():
    s_out, t_out = _outputs()
    terms = _build("kd", ce_weight=0.3, kd_weight=1.7, temperature=2.5)(s_out, t_out, LABELS, None, 1)
    assert _f(terms["ce"]) == pytest.approx(0.3 * ref_ce(s_out.logits, LABELS), rel=RTOL)
    assert _f(terms["kd"]) == pytest.approx(1.7 * ref_kd(s_out.logits, t_out.logits, 2.5), rel=RTOL)


def test_ls_standardises_with_the_unbiased_std_and_is_scale_free():
    """KD+LS sees z-scores: a teacher scaled and shifted gives the same KD term; plain KD does not."""
    s_out, t_out = _outputs()
    scaled = t_out._replace(logits=7.0 * t_out.logits + 3.0)
    ls = _build("kd_ls")
    assert _f(ls(s_out, scaled, LABELS, None, 1)["kd"]) == pytest.approx(
        _f(ls(s_out, t_out, LABELS, None, 1)["kd"]), rel=1e-4)
    kd = _build("kd")
    assert _f(kd(s_out, scaled, LABELS, None, 1)["kd"]) != pytest.approx(
        _f(kd(s_out, t_out, LABELS, None, 1)["kd"]), rel=1e-2)
    # the population std is the option, not the default: the two differ measurably
    population = _build("kd_ls", unbiased_std=False)(s_out, t_out, LABELS, None, 1)["kd"]
    assert _f(population) != pytest.approx(_f(ls(s_out, t_out, LABELS, None, 1)["kd"]), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Per-pair defaults of the released configs, applied by make_config
# ---------------------------------------------------------------------------------------------------------
# (teacher, student, method, options the released configs give that pair, epoch); values from methods.md §1-2.
PAIR_CASES = [
    ("resnet56", "resnet20", "dkd", {"beta": 2.0}, 30),
    ("resnet110", "resnet32", "dkd", {"beta": 2.0}, 30),
    ("vgg13", "vgg8", "dkd", {"beta": 6.0}, 30),
    ("wrn_40_2", "wrn_16_2", "dkd_ls", {"beta": 6.0}, 30),
    ("resnet32x4", "resnet8x4", "dkd", {"beta": 8.0}, 30),
    ("resnet56", "resnet20", "ckd", {"weight": 10.0, "temperature": 1.0}, 1),
    ("wrn_40_2", "wrn_40_1", "ckd", {"weight": 50.0, "temperature": 2.0}, 1),
    ("vgg13", "MobileNetV2", "ckd", {"weight": 50.0, "temperature": 2.0}, 1),
    ("resnet32x4", "ShuffleV2", "ckd", {"weight": 100.0, "temperature": 1.0}, 1),
]


@pytest.mark.parametrize("teacher, student, name, pair_options, epoch", PAIR_CASES,
                         ids=[f"{t}-{s}-{n}" for t, s, n, _, _ in PAIR_CASES])
def test_pair_defaults_reach_the_loss(teacher, student, name, pair_options, epoch):
    config = make_config("paper", method=name, teacher=teacher, student=student, device="cpu")
    for key, value in pair_options.items():
        assert config.method_options[key] == value, key
    s_out, t_out = _outputs()
    method = _build(name, **config.method_options)
    expected = ref_logit_method(name, s_out.logits, t_out.logits, LABELS, _spec(name, **pair_options), epoch)
    assert _total(method(s_out, t_out, LABELS, None, epoch)) == pytest.approx(expected, rel=RTOL)


# ---------------------------------------------------------------------------------------------------------
# DCD and DCD+KD
# ---------------------------------------------------------------------------------------------------------
DCD_CASES = [
    ("dcd", {}, None),
    ("dcd", {"init_log_inv_temperature": 0.3, "consistency_weight": 1.5, "ce_weight": 0.4}, None),
    ("dcd", {"init_log_inv_temperature": 3.0}, None),                  # exp(3) > 10: κ is clamped
    ("dcd", {"init_log_inv_temperature": 3.0, "max_inv_temperature": 15.0}, None),
    ("dcd", {"fixed_temperature": 0.1}, None),                          # κ = 1/0.1: divides
    ("dcd", {"fixed_temperature": 0.5, "consistency_weight": 0.0}, None),
    ("dcd", {}, 0.7),                                                  # the bias shifts nothing
    ("dcd", {"kd_weight": 0.5}, None),                                 # dcd with KD switched on
    ("dcd_kd", {}, None),
    ("dcd_kd", {"kd_temperature": 2.0, "kd_weight": 0.5}, None),
    ("dcd_kd", {"fixed_temperature": 0.2, "kd_weight": 2.0}, None),
]


@pytest.mark.parametrize("name, options, bias", DCD_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}-b{b}"
                              for n, o, b in DCD_CASES])
def test_dcd_total_matches_the_spec(name, options, bias):
    s_out, t_out = _outputs()
    torch.manual_seed(1)
    method = _build(name, **options)
    assert method.log_inv_temperature.item() == pytest.approx(options.get("init_log_inv_temperature", 1.0))
    assert method.bias.item() == 0.0
    if bias is not None:
        with torch.no_grad():
            method.bias.fill_(bias)
    terms = method(s_out, t_out, LABELS, torch.arange(B), 1)
    expected = ref_dcd(method, s_out, t_out, LABELS, _spec(name, **options))
    assert _total(terms) == pytest.approx(expected, rel=RTOL)


def test_dcd_kd_uses_kd_at_temperature_4_on_the_logits():
    s_out, t_out = _outputs()
    terms = _build("dcd_kd")(s_out, t_out, LABELS, None, 1)
    assert _f(terms["kd"]) == pytest.approx(ref_kd(s_out.logits, t_out.logits, 4.0), rel=RTOL)
    assert _f(terms["kd"]) != pytest.approx(ref_kd(s_out.logits, t_out.logits, 1.0), rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# CRD: NCE over the momentum memory (RepDistiller's ContrastMemory + ContrastLoss)
# ---------------------------------------------------------------------------------------------------------
# 20 training samples, 4 classes of 5: with K = 15 every anchor's negatives are exactly the other-class samples
# (drawn without replacement from a pool of 15), so the NCE (a sum over negatives) is known without the draw.
CRD_N, CRD_K = 20, 15
CRD_TRAIN_LABELS = torch.arange(CRD_N) % 4
CRD_BATCHES = [torch.tensor([0, 6, 13, 19, 4, 9]), torch.tensor([1, 2, 7, 12, 16, 18])]


def _crd_embed(layer: torch.nn.Linear, pooled) -> torch.Tensor:
    return torch.stack([_unit(r) for r in _linear(layer, pooled)])


def _crd_scores(embed, memory, index):
    """Unnormalised scores exp(m_j . e_i / T) of the positive (column 0) and of every other-class sample."""
    pos, neg = [], []
    for i, anchor in enumerate(index.tolist()):
        others = [j for j in range(CRD_N) if int(CRD_TRAIN_LABELS[j]) != int(CRD_TRAIN_LABELS[anchor])]
        assert len(others) == CRD_K
        pos.append(float((memory[anchor] * embed[i]).sum()))
        neg.append([float((memory[j] * embed[i]).sum()) for j in others])
    return pos, neg


def _nce(pos, neg, z, nce_t, eps=1e-7) -> float:
    """-(1/B) [Σ_i log(x0/(x0 + K/N + ε)) + Σ_{i,k} log((K/N)/(x_k + K/N + ε))], x = exp(score/T)/Z."""
    noise = CRD_K / CRD_N
    total = 0.0
    for p, negs in zip(pos, neg):
        x0 = math.exp(p / nce_t) / z
        total += math.log(x0 / (x0 + noise + eps))
        for q in negs:
            xk = math.exp(q / nce_t) / z
            total += math.log(noise / (xk + noise + eps))
    return -total / len(pos)


def _z(pos, neg, nce_t) -> float:
    """Z = mean of exp(score/T) over the first batch's B x (K+1) scores, times N."""
    values = [math.exp(v / nce_t) for p, negs in zip(pos, neg) for v in [p, *negs]]
    return sum(values) / len(values) * CRD_N


@pytest.mark.parametrize("options", [{}, {"weight": 2.0, "nce_t": 0.2, "nce_m": 0.3, "ce_weight": 0.5}],
                         ids=["defaults", "weight-nce_t-nce_m-ce_weight"])
def test_crd_total_and_memory_follow_the_spec(options):
    o = _spec("crd", nce_k=CRD_K, **options)
    torch.manual_seed(3)
    method = _build("crd", num_train=CRD_N, train_labels=CRD_TRAIN_LABELS, nce_k=CRD_K, **options)
    mem_s = _d(method.memory.memory_student).clone()
    mem_t = _d(method.memory.memory_teacher).clone()
    z_s = z_t = None
    for step, index in enumerate(CRD_BATCHES):
        s_out, t_out = _outputs(seed=20 + step)
        y = CRD_TRAIN_LABELS[index]
        es = _crd_embed(method.embed_student.linear, s_out.pooled)
        et = _crd_embed(method.embed_teacher.linear, t_out.pooled)
        # the student embedding is scored against the teacher memory and vice versa
        pos_s, neg_s = _crd_scores(es, mem_t, index)
        pos_t, neg_t = _crd_scores(et, mem_s, index)
        if step == 0:  # Z is set once, from the first batch
            z_s, z_t = _z(pos_s, neg_s, o["nce_t"]), _z(pos_t, neg_t, o["nce_t"])
        crd = _nce(pos_s, neg_s, z_s, o["nce_t"]) + _nce(pos_t, neg_t, z_t, o["nce_t"])
        terms = method(s_out, t_out, y, index, 1)
        assert _f(terms["crd"]) == pytest.approx(o["weight"] * crd, rel=RTOL)
        assert _total(terms) == pytest.approx(o["ce_weight"] * ref_ce(s_out.logits, y) + o["weight"] * crd,
                                              rel=RTOL)
        assert float(method.memory.z_student) == pytest.approx(z_s, rel=RTOL)
        assert float(method.memory.z_teacher) == pytest.approx(z_t, rel=RTOL)
        # momentum update of the anchors' memory rows only: m[i] = norm(m·m[i] + (1 - m)·e_i)
        m = o["nce_m"]
        for i, anchor in enumerate(index.tolist()):
            mem_s[anchor] = _unit(m * mem_s[anchor] + (1 - m) * es[i])
            mem_t[anchor] = _unit(m * mem_t[anchor] + (1 - m) * et[i])
        torch.testing.assert_close(_d(method.memory.memory_student), mem_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_d(method.memory.memory_teacher), mem_t, rtol=1e-5, atol=1e-6)


def test_crd_weight_scales_the_crd_term_only():
    terms = {}
    for weight in (0.8, 2.0):
        torch.manual_seed(3)  # same heads and memory for both
        method = _build("crd", num_train=CRD_N, train_labels=CRD_TRAIN_LABELS, nce_k=CRD_K, weight=weight)
        s_out, t_out = _outputs()
        terms[weight] = method(s_out, t_out, CRD_TRAIN_LABELS[CRD_BATCHES[0]], CRD_BATCHES[0], 1)
    assert _f(terms[2.0]["crd"]) == pytest.approx(_f(terms[0.8]["crd"]) * 2.0 / 0.8, rel=RTOL)
    assert _f(terms[2.0]["ce"]) == pytest.approx(_f(terms[0.8]["ce"]), rel=RTOL)
