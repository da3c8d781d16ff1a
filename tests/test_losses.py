"""Tests of ckd_study.losses against naive references written with explicit Python loops (math.exp/log).

The references below share no code with the implementation: every loss is recomputed sample by sample and
class by class on Python floats, from the equations of /work/shared/docs/methods.md. Inputs are float64 so the
tolerances can be tight.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ckd_study.losses import (
    CKDLoss,
    CRDMemory,
    DCDLoss,
    DKDLoss,
    MCLDLoss,
    ckd_loss,
    crd_loss,
    crd_nce_loss,
    dcd_loss,
    dkd_loss,
    kd_loss,
    linear_warmup,
    mcld_category_loss,
    mcld_instance_loss,
    mcld_loss,
    mcld_sample_loss,
    standardize_logits,
)

SHAPES = [(2, 3), (5, 7), (8, 100)]
ANCHORS = ["teacher", "student", "both"]
NEGATIVES = ["teacher_student", "student_student"]
NORMALIZE = ["l2", "zscore+l2"]
MASKS = ["none", "same_label", "gt_logit"]
TOL = dict(rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------


def make_logits(b, c, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed + 1000 * b + c)
    s = torch.randn(b, c, generator=g, dtype=dtype) * scale
    t = torch.randn(b, c, generator=g, dtype=dtype) * scale + 0.5
    return s, t


def make_labels(b, c, seed=0):
    """Labels drawn from a few classes so that same-label pairs exist (B >= 3), and gt classes vary."""
    g = torch.Generator().manual_seed(seed + 7 + 1000 * b + c)
    k = max(1, min(c, (b + 1) // 2))
    classes = torch.randperm(c, generator=g)[:k]
    return classes[torch.randint(0, k, (b,), generator=g)]


# ----------------------------------------------------------------------------------------------------------------
# naive references (pure Python floats)
# ----------------------------------------------------------------------------------------------------------------


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    z = sum(e)
    return [x / z for x in e]


def _logsumexp(v):
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _l2(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n > 0 else [0.0 for _ in v]


def _zscore(v, eps=0.0, ddof=0):
    """(x - mean) / (std + eps) with std = sqrt(sum (x - mean)^2 / (n - ddof)): ddof=1 is torch's default std."""
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - ddof))
    if sd + eps == 0:
        return [0.0 for _ in v]
    return [(x - m) / (sd + eps) for x in v]


def _nv(v, normalize):
    """methods.md §3 normalisation, literally: z-score (population std) then L2, or L2 only."""
    return _l2(_zscore(v)) if normalize == "zscore+l2" else _l2(v)


def ref_kd(S, T, tau):
    total = 0.0
    for s, t in zip(S, T):
        p = _softmax([x / tau for x in t])
        q = _softmax([x / tau for x in s])
        total += _kl(p, q)
    return total / len(S) * tau**2


def ref_dkd(S, T, y, alpha, beta, tau):
    betas = beta if isinstance(beta, list) else [beta] * len(S)
    tckd = nckd = 0.0
    for i, (s, t) in enumerate(zip(S, T)):
        p = _softmax([x / tau for x in t])
        q = _softmax([x / tau for x in s])
        yi = y[i]
        p_rest = sum(p[c] for c in range(len(p)) if c != yi)
        q_rest = sum(q[c] for c in range(len(q)) if c != yi)
        tckd += _kl([p[yi], p_rest], [q[yi], q_rest])
        p_nt = [p[c] / p_rest for c in range(len(p)) if c != yi]
        q_nt = [q[c] / q_rest for c in range(len(q)) if c != yi]
        nckd += betas[i] * _kl(p_nt, q_nt)
    b = len(S)
    return alpha * tckd / b * tau**2, nckd / b * tau**2


def ref_ckd(S, T, tau, anchor, negatives, terms):
    b = len(S)
    sn = [_l2(v) for v in S]
    tn = [_l2(v) for v in T]
    P = [[_dot(tn[i], sn[j]) for j in range(b)] for i in range(b)]
    intra = sum(-P[i][i] / tau for i in range(b)) / b
    if negatives == "teacher_student":
        inter_t = sum(math.log(sum(math.exp(P[i][j] / tau) for j in range(b))) for i in range(b)) / b
        inter_s = sum(math.log(sum(math.exp(P[j][i] / tau) for j in range(b))) for i in range(b)) / b
        # the InfoNCE written directly (not via the decomposition), for the identity test
        nce_t = sum(-math.log(math.exp(P[i][i] / tau) / sum(math.exp(P[i][j] / tau) for j in range(b)))
                    for i in range(b)) / b
        nce_s = sum(-math.log(math.exp(P[i][i] / tau) / sum(math.exp(P[j][i] / tau) for j in range(b)))
                    for i in range(b)) / b
        inter = {"teacher": inter_t, "student": inter_s, "both": 0.5 * (inter_t + inter_s)}[anchor]
        nce = {"teacher": nce_t, "student": nce_s, "both": 0.5 * (nce_t + nce_s)}[anchor]
    else:
        SS = [[_dot(sn[i], sn[j]) for j in range(b)] for i in range(b)]
        inter = 0.0
        nce = 0.0
        for i in range(b):
            den = math.exp(P[i][i] / tau) + sum(math.exp(SS[i][j] / tau) for j in range(b) if j != i)
            inter += math.log(den) / b
            nce += -math.log(math.exp(P[i][i] / tau) / den) / b
    total = (intra if "intra" in terms else 0.0) + (inter if "inter" in terms else 0.0)
    return total, intra, inter, nce


def _pair_logit(a, b, drop, normalize, tau):
    if drop is not None:
        a = [x for c, x in enumerate(a) if c != drop]
        b = [x for c, x in enumerate(b) if c != drop]
    return _dot(_nv(a, normalize), _nv(b, normalize)) / tau


def _ref_matrix(anchors, cands, y, tau, normalize, mask):
    n = len(anchors)
    return [[_pair_logit(anchors[i], cands[j], y[i] if mask == "gt_logit" else None, normalize, tau)
             for j in range(n)] for i in range(n)]


def _ref_diag_ce(A, y, mask):
    n = len(A)
    total = 0.0
    for i in range(n):
        cols = [j for j in range(n) if not (mask == "same_label" and j != i and y[j] == y[i])]
        total += -A[i][i] + math.log(sum(math.exp(A[i][j]) for j in cols))
    return total / n


def ref_mcld_instance(S, T, y, tau, normalize, mask):
    return _ref_diag_ce(_ref_matrix(S, T, y, tau, normalize, mask), y, mask)


def ref_mcld_sample(S, T, y, tau, normalize, mask, mode):
    if mode == "reverse":
        return _ref_diag_ce(_ref_matrix(T, S, y, tau, normalize, mask), y, mask)
    A = _ref_matrix(S, T, y, tau, normalize, mask)
    n = len(A)
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(A[i][j]) for j in range(n)))
        pos = [j for j in range(n) if y[j] == y[i]]
        total += -sum(A[i][p] - lse for p in pos) / len(pos)
    return total / n


def ref_mcld_category(S, T, y, tau, normalize, mask):
    b, c = len(S), len(S[0])

    def column(M, k):
        kept = [i for i in range(b) if not (mask == "gt_logit" and y[i] == k)]
        vals = _nv([M[i][k] for i in kept], normalize) if kept else []
        out = [0.0] * b
        for i, v in zip(kept, vals):
            out[i] = v
        return out

    sc = [column(S, k) for k in range(c)]
    tc = [column(T, k) for k in range(c)]
    total = 0.0
    for k in range(c):
        row = [_dot(sc[k], tc[k2]) / tau for k2 in range(c)]
        total += -row[k] + _logsumexp(row)
    return total / c


def ref_dcd(E, F_, theta, bias, fixed_temperature, kmax, wcons):
    b = len(E)
    u = [_l2(v) for v in E]
    v = [_l2(x) for x in F_]
    kappa = 1.0 / fixed_temperature if fixed_temperature is not None else min(math.exp(theta), kmax)
    L = [[kappa * _dot(u[i], v[j]) + bias for j in range(b)] for i in range(b)]
    con = sum(-L[i][i] + _logsumexp(L[i]) for i in range(b)) / b
    cons = 0.0
    for i in range(b):
        P = _softmax(L[i])
        Q = _softmax([L[j][i] for j in range(b)])
        cons += _kl(Q, P)
    cons = wcons * cons / b
    return con + cons, con, cons


def ref_crd_nce(out, n_data, eps=1e-7):
    b, k1 = len(out), len(out[0])
    m = k1 - 1
    pn = 1.0 / n_data
    total = 0.0
    for i in range(b):
        total += math.log(out[i][0] / (out[i][0] + m * pn + eps))
        for k in range(1, k1):
            total += math.log(m * pn / (out[i][k] + m * pn + eps))
    return -total / b


def L(x):
    return x.tolist()


def close(a, b, **kw):
    kw = {**TOL, **kw}
    assert math.isclose(float(a), float(b), rel_tol=kw["rtol"], abs_tol=kw["atol"]), (float(a), float(b))


# ----------------------------------------------------------------------------------------------------------------
# KD / DKD / LS
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_reference(shape, tau):
    s, t = make_logits(*shape)
    close(kd_loss(s, t, tau), ref_kd(L(s), L(t), tau))


def test_kd_default_temperature_is_4():
    s, t = make_logits(5, 7)
    close(kd_loss(s, t), ref_kd(L(s), L(t), 4.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_kd_zero_when_student_equals_teacher(shape):
    s, _ = make_logits(*shape)
    assert float(kd_loss(s, s.clone())) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_reference(shape, alpha, beta, tau):
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    out = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=tau)
    assert isinstance(out, DKDLoss)
    tckd, nckd = ref_dkd(L(s), L(t), L(y), alpha, beta, tau)
    close(out.tckd, tckd)
    close(out.nckd, nckd)
    close(out.total, tckd + nckd)


@pytest.mark.parametrize("shape", SHAPES)
def test_dkd_per_sample_beta_matches_reference(shape):
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    beta = torch.rand(shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    out = dkd_loss(s, t, y, alpha=1.0, beta=beta, temperature=2.0)
    tckd, nckd = ref_dkd(L(s), L(t), L(y), 1.0, L(beta), 2.0)
    close(out.nckd, nckd)
    close(out.tckd, tckd)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dkd_identity_equals_kd(shape, tau):
    """alpha=1 and beta_i = 1 - p_target(teacher at tau): TCKD + beta*NCKD == KD."""
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    p_target = torch.softmax(t / tau, dim=1).gather(1, y[:, None]).squeeze(1)
    out = dkd_loss(s, t, y, alpha=1.0, beta=1.0 - p_target, temperature=tau)
    close(out.total, kd_loss(s, t, tau), rtol=1e-10, atol=1e-12)


def test_dkd_stable_for_extreme_logits():
    s, t = make_logits(4, 6, scale=200.0)
    y = torch.tensor([0, 1, 2, 3])
    out = dkd_loss(s, t, y, temperature=1.0)
    assert torch.isfinite(out.total)
    s32 = s.float().requires_grad_()
    dkd_loss(s32, t.float(), y, temperature=1.0).total.backward()
    assert torch.isfinite(s32.grad).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_standardize_default_is_the_released_sample_std(shape):
    """Default: (x - mean) / (1e-7 + std) with the C - 1 (sample) std, as the released normalize() computes."""
    s, _ = make_logits(*shape)
    z = standardize_logits(s)
    for row_impl, row in zip(z.tolist(), s.tolist()):
        for a, b in zip(row_impl, _zscore(row, eps=1e-7, ddof=1)):
            assert math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12)
    # the standardised rows have sample variance 1, hence population variance (C - 1) / C
    c = shape[1]
    for row in z.tolist():
        assert math.isclose(sum(x * x for x in row) / (c - 1), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_standardize_population_option_matches_reference(shape):
    s, _ = make_logits(*shape)
    z = standardize_logits(s, unbiased=False)
    for row_impl, row in zip(z.tolist(), s.tolist()):
        for a, b in zip(row_impl, _zscore(row, eps=1e-7, ddof=0)):
            assert math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12)
    # a constant factor sqrt(C / (C - 1)) apart (eps aside), as the docstring states
    c = shape[1]
    torch.testing.assert_close(z, standardize_logits(s) * math.sqrt(c / (c - 1)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_standardize_invariant_to_shift_and_scale(shape):
    s, t = make_logits(*shape)
    z = standardize_logits(s)
    torch.testing.assert_close(standardize_logits(s + 17.5), z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(standardize_logits(s * 3.7), z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(standardize_logits(s * 0.25 - 4.0), z, rtol=1e-6, atol=1e-6)
    base = kd_loss(standardize_logits(s), standardize_logits(t), 2.0)
    moved = kd_loss(standardize_logits(5 * s + 3), standardize_logits(0.5 * t - 9), 2.0)
    close(moved, base, rtol=1e-6, atol=1e-8)
    # and the raw KD is *not* invariant (the test above can fail)
    assert abs(float(kd_loss(5 * s + 3, 0.5 * t - 9, 2.0)) - float(kd_loss(s, t, 2.0))) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# CKD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("terms", [("intra", "inter"), ("intra",), ("inter",)])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_ckd_matches_reference(shape, anchor, negatives, terms, tau):
    s, t = make_logits(*shape)
    out = ckd_loss(s, t, temperature=tau, anchor=anchor, negatives=negatives, terms=terms)
    assert isinstance(out, CKDLoss)
    total, intra, inter, _ = ref_ckd(L(s), L(t), tau, anchor, negatives, terms)
    close(out.total, total)
    close(out.intra, intra)
    close(out.inter, inter)


def ref_ckd_inter_without_positive(S, T, tau, anchor, negatives):
    """The inter term over the negatives only (j != i), written with plain loops: Σ_{j≠i} of the cross pairs
    P (rows teacher, columns student; the student anchor reads columns) or of the student pairs S."""
    b = len(S)
    sn = [_l2(v) for v in S]
    tn = [_l2(v) for v in T]
    if negatives == "student_student":
        return sum(math.log(sum(math.exp(_dot(sn[i], sn[j]) / tau) for j in range(b) if j != i))
                   for i in range(b)) / b
    rows = sum(math.log(sum(math.exp(_dot(tn[i], sn[j]) / tau) for j in range(b) if j != i)) for i in range(b)) / b
    cols = sum(math.log(sum(math.exp(_dot(tn[j], sn[i]) / tau) for j in range(b) if j != i)) for i in range(b)) / b
    return {"teacher": rows, "student": cols, "both": 0.5 * (rows + cols)}[anchor]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("negatives", NEGATIVES)
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_ckd_inter_without_positive_matches_reference(shape, anchor, negatives, tau):
    s, t = make_logits(*shape)
    out = ckd_loss(s, t, temperature=tau, anchor=anchor, negatives=negatives, inter_positive=False)
    inter = ref_ckd_inter_without_positive(L(s), L(t), tau, anchor, negatives)
    _, intra, with_positive, _ = ref_ckd(L(s), L(t), tau, anchor, negatives, ("intra", "inter"))
    close(out.inter, inter)
    close(out.intra, intra)
    close(out.total, intra + inter)
    assert float(out.inter) < with_positive - 1e-6  # dropping a positive term lowers the log-sum-exp
    with pytest.raises(ValueError, match="at least 2"):
        ckd_loss(s[:1], t[:1], inter_positive=False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_ckd_intra_plus_inter_is_the_infonce(shape, anchor, negatives):
    s, t = make_logits(*shape)
    out = ckd_loss(s, t, temperature=2.0, anchor=anchor, negatives=negatives)
    close(out.intra + out.inter, out.total)
    close(out.total, ref_ckd(L(s), L(t), 2.0, anchor, negatives, ("intra", "inter"))[3])


@pytest.mark.parametrize("shape", SHAPES)
def test_ckd_both_is_mean_of_teacher_and_student_anchored(shape):
    s, t = make_logits(*shape)
    both = ckd_loss(s, t, anchor="both")
    tea = ckd_loss(s, t, anchor="teacher")
    stu = ckd_loss(s, t, anchor="student")
    close(both.total, 0.5 * (tea.total + stu.total))
    close(both.inter, 0.5 * (tea.inter + stu.inter))
    close(both.intra, tea.intra)
    assert abs(float(tea.total) - float(stu.total)) > 1e-6  # the two directions differ on random inputs


def test_ckd_student_student_ignores_anchor():
    s, t = make_logits(6, 9)
    vals = [float(ckd_loss(s, t, anchor=a, negatives="student_student").total) for a in ANCHORS]
    assert max(vals) - min(vals) < 1e-12


def test_ckd_terms_switch_off():
    s, t = make_logits(5, 7)
    full = ckd_loss(s, t)
    only_intra = ckd_loss(s, t, terms=("intra",))
    only_inter = ckd_loss(s, t, terms="inter")
    close(only_intra.total, full.intra)
    close(only_inter.total, full.inter)
    close(only_intra.inter, full.inter)  # parts are always returned


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_ckd_batch_permutation_invariant(anchor, negatives):
    s, t = make_logits(8, 10)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    a = ckd_loss(s, t, anchor=anchor, negatives=negatives)
    b = ckd_loss(s[perm], t[perm], anchor=anchor, negatives=negatives)
    for x, y in zip(a, b):
        close(x, y, rtol=1e-12, atol=1e-12)
    # a permutation of the student alone breaks the pairing and changes the loss
    assert abs(float(ckd_loss(s[perm], t).total) - float(a.total)) > 1e-6


def test_ckd_default_temperature_is_1():
    s, t = make_logits(5, 7)
    close(ckd_loss(s, t).total, ref_ckd(L(s), L(t), 1.0, "teacher", "teacher_student", ("intra", "inter"))[0])


# ----------------------------------------------------------------------------------------------------------------
# MCLD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
def test_mcld_instance_matches_reference(shape, normalize, mask):
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    got = mcld_instance_loss(s, t, y, temperature=0.7, normalize=normalize, target_mask=mask)
    close(got, ref_mcld_instance(L(s), L(t), L(y), 0.7, normalize, mask), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", ["reverse", "label"])
def test_mcld_sample_matches_reference(shape, normalize, mask, mode):
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    got = mcld_sample_loss(s, t, y, temperature=0.7, normalize=normalize, target_mask=mask, mode=mode)
    close(got, ref_mcld_sample(L(s), L(t), L(y), 0.7, normalize, mask, mode), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
def test_mcld_category_matches_reference(shape, normalize, mask):
    s, t = make_logits(*shape)
    y = make_labels(*shape)
    got = mcld_category_loss(s, t, y, temperature=0.7, normalize=normalize, target_mask=mask)
    close(got, ref_mcld_category(L(s), L(t), L(y), 0.7, normalize, mask), rtol=1e-9, atol=1e-9)


def test_mcld_same_label_has_no_effect_on_category_and_label_mode():
    s, t = make_logits(8, 6)
    y = make_labels(8, 6)
    close(mcld_category_loss(s, t, y, target_mask="same_label"), mcld_category_loss(s, t, y))
    close(mcld_sample_loss(s, t, y, target_mask="same_label", mode="label"),
          mcld_sample_loss(s, t, y, mode="label"))
    # ...but it does change the instance term when same-label pairs exist
    assert (y[:, None] == y[None, :]).sum() > 8
    assert abs(float(mcld_instance_loss(s, t, y, target_mask="same_label"))
               - float(mcld_instance_loss(s, t, y))) > 1e-6


def test_mcld_masks_change_the_loss():
    s, t = make_logits(8, 6)
    y = make_labels(8, 6)
    for fn in (mcld_instance_loss, mcld_category_loss):
        assert abs(float(fn(s, t, y, target_mask="gt_logit")) - float(fn(s, t, y))) > 1e-6
    assert abs(float(mcld_sample_loss(s, t, y, target_mask="gt_logit"))
               - float(mcld_sample_loss(s, t, y))) > 1e-6


def test_mcld_sample_reverse_equals_ckd_default():
    s, t = make_logits(8, 10)
    close(mcld_sample_loss(s, t), ckd_loss(s, t).total)
    close(mcld_sample_loss(s, t, temperature=0.3), ckd_loss(s, t, temperature=0.3).total)


def test_mcld_zscore_l2_equals_l2_of_centred():
    s, t = make_logits(5, 7)
    sc = s - s.mean(1, keepdim=True)
    tc = t - t.mean(1, keepdim=True)
    close(mcld_instance_loss(s, t, normalize="zscore+l2"), mcld_instance_loss(sc, tc, normalize="l2"))


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", ["reverse", "label"])
def test_mcld_loss_weights_and_total(normalize, mask, mode):
    s, t = make_logits(6, 5)
    y = make_labels(6, 5)
    out = mcld_loss(s, t, y, temperature=0.5, normalize=normalize, target_mask=mask, sample_mode=mode,
                    lambda_instance=2.0, lambda_sample=3.0, lambda_category=4.0, category_weight=0.25)
    assert isinstance(out, MCLDLoss)
    kw = (0.5, normalize, mask)
    close(out.instance, 2.0 * ref_mcld_instance(L(s), L(t), L(y), *kw), rtol=1e-9)
    close(out.sample, 3.0 * ref_mcld_sample(L(s), L(t), L(y), *kw, mode), rtol=1e-9)
    close(out.category, 4.0 * 0.25 * ref_mcld_category(L(s), L(t), L(y), *kw), rtol=1e-9)
    close(out.total, out.instance + out.sample + out.category)


def test_mcld_loss_defaults():
    s, t = make_logits(6, 5)
    y = make_labels(6, 5)
    out = mcld_loss(s, t, y)
    kw = (1.0, "l2", "none")
    close(out.instance, 50.0 * ref_mcld_instance(L(s), L(t), L(y), *kw), rtol=1e-9)
    close(out.sample, 50.0 * ref_mcld_sample(L(s), L(t), L(y), *kw, "reverse"), rtol=1e-9)
    close(out.category, 50.0 * ref_mcld_category(L(s), L(t), L(y), *kw), rtol=1e-9)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
def test_mcld_batch_permutation_invariant(normalize, mask):
    s, t = make_logits(8, 10)
    y = make_labels(8, 10)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    kw = dict(normalize=normalize, target_mask=mask, temperature=0.5)
    terms = [
        lambda a, b, c: mcld_instance_loss(a, b, c, **kw),
        lambda a, b, c: mcld_sample_loss(a, b, c, mode="reverse", **kw),
        lambda a, b, c: mcld_sample_loss(a, b, c, mode="label", **kw),
        lambda a, b, c: mcld_category_loss(a, b, c, **kw),
    ]
    for fn in terms:
        close(fn(s[perm], t[perm], y[perm]), fn(s, t, y), rtol=1e-12, atol=1e-12)
    # breaking the pairing (labels permuted alone) changes the label-dependent terms
    if mask != "none":
        assert abs(float(mcld_instance_loss(s, t, y[perm], **kw)) - float(mcld_instance_loss(s, t, y, **kw))) > 1e-9


def test_linear_warmup():
    assert linear_warmup(0, 20) == 0.0
    assert linear_warmup(10, 20) == 0.5
    assert linear_warmup(40, 20) == 1.0
    assert linear_warmup(3, 0) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# DCD
# ----------------------------------------------------------------------------------------------------------------


def make_embeds(b=6, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("b,d", [(2, 3), (6, 8), (16, 128)])
@pytest.mark.parametrize("theta,bias,fixed", [(1.0, 0.0, None), (0.3, 1.5, None), (3.0, -0.7, None),
                                              (1.0, 0.0, 0.07), (1.0, 0.4, 0.5)])
def test_dcd_matches_reference(b, d, theta, bias, fixed):
    e, f = make_embeds(b, d)
    th = torch.tensor(theta, dtype=torch.float64)
    out = dcd_loss(e, f, th, torch.tensor(bias, dtype=torch.float64), fixed_temperature=fixed)
    assert isinstance(out, DCDLoss)
    total, con, cons = ref_dcd(L(e), L(f), theta, bias, fixed, 10.0, 0.5)
    close(out.total, total)
    close(out.contrastive, con)
    close(out.consistency, cons)


def test_dcd_clamps_inverse_temperature_and_divides_by_fixed_temperature():
    e, f = make_embeds(6, 8)
    # theta = 3 -> exp(3) = 20 > 10: kappa is clamped to 10
    close(dcd_loss(e, f, torch.tensor(3.0, dtype=torch.float64), 0.0).total,
          ref_dcd(L(e), L(f), math.log(10.0), 0.0, None, 10.0, 0.5)[0])
    # fixed temperature 0.07 means kappa = 1/0.07 (divide), not 0.07 (the released code's multiply)
    divided = dcd_loss(e, f, None, 0.0, fixed_temperature=0.07).total
    close(divided, ref_dcd(L(e), L(f), 0.0, 0.0, 0.07, 10.0, 0.5)[0])
    multiplied = ref_dcd(L(e), L(f), math.log(0.07), 0.0, None, 10.0, 0.5)[0]
    assert abs(float(divided) - multiplied) > 1e-3


def test_dcd_bias_gets_zero_gradient_theta_does_not():
    e, f = make_embeds(8, 16)
    e.requires_grad_()
    f.requires_grad_()
    theta = torch.tensor(1.0, dtype=torch.float32, requires_grad=True)
    bias = torch.tensor(0.3, dtype=torch.float32, requires_grad=True)
    out = dcd_loss(e.float(), f.float(), theta, bias)
    out.total.backward()
    assert bias.grad is not None and abs(float(bias.grad)) < 1e-6
    assert abs(float(theta.grad)) > 1e-3
    # and the bias cannot change the value either
    close(dcd_loss(e.detach(), f.detach(), theta.detach().double(), 5.0).total,
          dcd_loss(e.detach(), f.detach(), theta.detach().double(), 0.0).total, rtol=1e-12, atol=1e-12)


def test_dcd_teacher_embed_receives_gradient_by_design():
    e, f = make_embeds(6, 8)
    e.requires_grad_()
    f.requires_grad_()
    dcd_loss(e, f, torch.tensor(1.0, dtype=torch.float64), 0.0).total.backward()
    assert f.grad is not None and f.grad.abs().max() > 1e-6
    assert e.grad is not None and e.grad.abs().max() > 1e-6


def test_dcd_batch_permutation_invariant():
    e, f = make_embeds(8, 8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    th = torch.tensor(1.0, dtype=torch.float64)
    close(dcd_loss(e[perm], f[perm], th, 0.0).total, dcd_loss(e, f, th, 0.0).total, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# gradcheck (float64) and the teacher gets no gradient
# ----------------------------------------------------------------------------------------------------------------


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_kd_dkd_standardize():
    s, t = make_logits(4, 5, scale=1.0)
    y = make_labels(4, 5)
    beta = torch.tensor([0.5, 1.0, 2.0, 8.0], dtype=torch.float64)
    s.requires_grad_()
    _gradcheck(lambda x: kd_loss(x, t, 2.0), s)
    _gradcheck(lambda x: dkd_loss(x, t, y, alpha=1.0, beta=beta, temperature=2.0).total, s)
    _gradcheck(lambda x: dkd_loss(x, t, y).total, s)
    _gradcheck(lambda x: kd_loss(standardize_logits(x), standardize_logits(t), 2.0), s)


@pytest.mark.parametrize("anchor", ANCHORS)
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_gradcheck_ckd(anchor, negatives):
    s, t = make_logits(4, 5, scale=1.0)
    s.requires_grad_()
    _gradcheck(lambda x: ckd_loss(x, t, 0.5, anchor=anchor, negatives=negatives).total, s)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("mode", ["reverse", "label"])
def test_gradcheck_mcld(normalize, mask, mode):
    s, t = make_logits(5, 4, scale=1.0)
    y = torch.tensor([0, 1, 0, 2, 1])
    s.requires_grad_()
    kw = dict(temperature=0.5, normalize=normalize, target_mask=mask)
    _gradcheck(lambda x: mcld_loss(x, t, y, sample_mode=mode, lambda_instance=1.0, lambda_sample=1.0,
                                   lambda_category=1.0, **kw).total, s)
    _gradcheck(lambda x: mcld_sample_loss(x, t, y, mode=mode, **kw), s)


@pytest.mark.parametrize("fixed", [None, 0.5])
def test_gradcheck_dcd(fixed):
    e, f = make_embeds(5, 6)
    theta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    e.requires_grad_()
    f.requires_grad_()
    if fixed is None:
        _gradcheck(lambda a, b, th, bb: dcd_loss(a, b, th, bb).total, e, f, theta, bias)
    else:
        _gradcheck(lambda a, b: dcd_loss(a, b, None, 0.0, fixed_temperature=fixed).total, e, f)


# CRDMemory scores by a dense product when the memory is small against K+1, else by gathering memory rows:
# the tests that pin its values run both ways.
CRD_SCORING = {"dense": 10**9, "gather": 0}


@pytest.fixture(params=sorted(CRD_SCORING))
def crd_scoring(request, monkeypatch):
    monkeypatch.setattr(CRDMemory, "FULL_PRODUCT_MAX_RATIO", CRD_SCORING[request.param])
    return request.param


def test_gradcheck_crd(crd_scoring):
    g = torch.Generator().manual_seed(0)
    mem = CRDMemory(6, 20, nce_k=5, nce_t=0.5, generator=g).double()
    mem.z_student.fill_(3.0)
    mem.z_teacher.fill_(4.0)
    idx = torch.tensor([1, 4, 7])
    cidx = torch.randint(0, 20, (3, 6), generator=g)
    cidx[:, 0] = idx
    xs = torch.nn.functional.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    xt = torch.nn.functional.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    xs.requires_grad_()

    def fn(a):
        m = copy.deepcopy(mem)  # the forward updates the memory: start every evaluation from the same state
        return crd_loss(*m(a, xt, idx, cidx), 20)

    _gradcheck(fn, xs)
    out = torch.rand(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    _gradcheck(lambda o: crd_nce_loss(o, 20), out)


def _logit_losses():
    y = make_labels(6, 5)
    return {
        "kd": lambda s, t: kd_loss(s, t),
        "dkd": lambda s, t: dkd_loss(s, t, y).total,
        "ckd": lambda s, t: ckd_loss(s, t, anchor="both").total,
        "ckd_ss": lambda s, t: ckd_loss(s, t, negatives="student_student").total,
        "mcld_rev_gt": lambda s, t: mcld_loss(s, t, y, target_mask="gt_logit", normalize="zscore+l2").total,
        "mcld_label_same": lambda s, t: mcld_loss(s, t, y, target_mask="same_label", sample_mode="label").total,
        "kd_ls": lambda s, t: kd_loss(standardize_logits(s), standardize_logits(t), 2.0),
    }


@pytest.mark.parametrize("name", list(_logit_losses()))
def test_no_gradient_reaches_teacher(name):
    fn = _logit_losses()[name]
    s, t = make_logits(6, 5)
    s.requires_grad_()
    t.requires_grad_()
    fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert t.grad is None or float(t.grad.abs().max()) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# low precision inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_logit_losses()))
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32_loss(name, low):
    fn = _logit_losses()[name]
    s, t = make_logits(6, 5, dtype=torch.float32)
    out_low = fn(s.to(low), t.to(low))
    assert out_low.dtype == torch.float32
    # identical to float32 on the rounded inputs (the computation itself is float32) ...
    ref_rounded = fn(s.to(low).float(), t.to(low).float())
    torch.testing.assert_close(out_low, ref_rounded, rtol=1e-6, atol=1e-6)
    # ... and close to the float32-input loss
    torch.testing.assert_close(out_low, fn(s, t), rtol=3e-2, atol=3e-2)


def test_low_precision_dcd_and_crd():
    e, f = make_embeds(6, 8, dtype=torch.float32)
    th = torch.tensor(1.0)
    out = dcd_loss(e.bfloat16(), f.bfloat16(), th.bfloat16(), torch.tensor(0.0).bfloat16())
    assert out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, dcd_loss(e, f, th, 0.0).total, rtol=3e-2, atol=3e-2)
    mem = CRDMemory(8, 50, nce_k=4, generator=torch.Generator().manual_seed(0), labels=torch.arange(50) % 5)
    os_, ot = mem(torch.nn.functional.normalize(e).bfloat16(), torch.nn.functional.normalize(f).bfloat16(),
                  torch.arange(6))
    assert os_.dtype == torch.float32 and ot.dtype == torch.float32
    assert crd_loss(os_, ot, 50).dtype == torch.float32
    s, t = make_logits(4, 5, dtype=torch.float32)
    assert standardize_logits(s.bfloat16()).dtype == torch.float32


def test_float64_stays_float64():
    s, t = make_logits(4, 5)
    y = make_labels(4, 5)
    assert kd_loss(s, t).dtype == torch.float64
    assert ckd_loss(s, t).total.dtype == torch.float64
    assert mcld_loss(s, t, y).total.dtype == torch.float64
    assert dkd_loss(s, t, y).total.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------
# CRD
# ----------------------------------------------------------------------------------------------------------------


def _crd_setup(b=4, d=5, n=30, k=6, seed=0):
    """A small memory (labels: n samples in 3 classes, so forward can draw its own 'exact' negatives)."""
    g = torch.Generator().manual_seed(seed)
    mem = CRDMemory(d, n, nce_k=k, nce_t=0.2, nce_m=0.3, generator=torch.Generator().manual_seed(seed),
                    labels=torch.arange(n) % 3)
    xs = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    xt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    idx = torch.randperm(n, generator=g)[:b]
    cidx = torch.randint(0, n, (b, k + 1), generator=g)
    cidx[:, 0] = idx
    return mem, xs, xt, idx, cidx


def test_crd_init_and_state_dict():
    mem = CRDMemory(12, 40, nce_k=8, generator=torch.Generator().manual_seed(5))
    stdv = 1.0 / math.sqrt(12 / 3)
    for name in ("memory_student", "memory_teacher"):
        m = getattr(mem, name)
        assert m.shape == (40, 12)
        assert float(m.abs().max()) <= stdv
        assert float(m.abs().max()) > 0.8 * stdv
    sd = mem.state_dict()
    assert {"memory_student", "memory_teacher", "z_student", "z_teacher"} <= set(sd)
    assert float(sd["z_student"]) == -1.0 and float(sd["z_teacher"]) == -1.0
    mem2 = CRDMemory(12, 40, nce_k=8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(mem2.memory_student, mem.memory_student)
    assert not torch.equal(mem.memory_student, mem.memory_teacher)
    mem3 = CRDMemory(12, 40, nce_k=8)
    mem3.load_state_dict(sd)
    torch.testing.assert_close(mem3.memory_teacher, mem.memory_teacher)


def test_crd_forward_scores_z_and_memory_update_match_formula(crd_scoring):
    mem, xs, xt, idx, cidx = _crd_setup()
    ms0 = mem.memory_student.clone().tolist()
    mt0 = mem.memory_teacher.clone().tolist()
    out_s, out_t = mem(xs, xt, idx, cidx)
    b, k1 = cidx.shape
    assert out_s.shape == (b, k1) and out_t.shape == (b, k1)
    raw_s = [[math.exp(_dot(mt0[cidx[i, k]], xs[i].tolist()) / 0.2) for k in range(k1)] for i in range(b)]
    raw_t = [[math.exp(_dot(ms0[cidx[i, k]], xt[i].tolist()) / 0.2) for k in range(k1)] for i in range(b)]
    z_s = sum(sum(r) for r in raw_s) / (b * k1) * 30
    z_t = sum(sum(r) for r in raw_t) / (b * k1) * 30
    close(mem.z_student, z_s, rtol=1e-5)
    close(mem.z_teacher, z_t, rtol=1e-5)
    for i in range(b):
        for k in range(k1):
            close(out_s[i, k], raw_s[i][k] / z_s, rtol=1e-5, atol=1e-9)
            close(out_t[i, k], raw_t[i][k] / z_t, rtol=1e-5, atol=1e-9)
    # momentum update: m[idx] = normalize(nce_m * m[idx] + (1 - nce_m) * embed); other rows untouched
    for memory, before, x in ((mem.memory_student, ms0, xs), (mem.memory_teacher, mt0, xt)):
        for i in range(b):
            expected = _l2([0.3 * a + 0.7 * e for a, e in zip(before[idx[i]], x[i].tolist())])
            for a, e in zip(memory[idx[i]].tolist(), expected):
                assert math.isclose(a, e, rel_tol=1e-5, abs_tol=1e-6)
        untouched = [r for r in range(30) if r not in set(idx.tolist())]
        torch.testing.assert_close(memory[untouched], torch.tensor(before)[untouched])
    # loss against the naive NCE
    close(crd_nce_loss(out_s, 30), ref_crd_nce(out_s.tolist(), 30), rtol=1e-5)
    close(crd_loss(out_s, out_t, 30), ref_crd_nce(out_s.tolist(), 30) + ref_crd_nce(out_t.tolist(), 30), rtol=1e-5)


def test_crd_dense_and_gathered_scoring_agree(monkeypatch):
    """The two ways of scoring (dense product + gather, row gather + bmm) give the same scores and gradients,
    on sizes where the dense path is the default (n_data=500, K=63) and where the gather is (n_data=5000, K=7)."""
    for n, k in ((500, 63), (5000, 7)):
        results = {}
        for name, ratio in CRD_SCORING.items():
            monkeypatch.setattr(CRDMemory, "FULL_PRODUCT_MAX_RATIO", ratio)
            mem, xs, xt, idx, cidx = _crd_setup(b=16, d=32, n=n, k=k, seed=3)
            xs.requires_grad_()
            xt.requires_grad_()
            out_s, out_t = mem(xs, xt, idx, cidx)
            crd_loss(out_s, out_t, n).backward()
            results[name] = (out_s.detach(), out_t.detach(), xs.grad, xt.grad, mem.memory_student.clone())
        for dense, gathered in zip(results["dense"], results["gather"]):
            torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-7)
    monkeypatch.undo()
    assert 500 <= CRDMemory.FULL_PRODUCT_MAX_RATIO * 64 and 5000 > CRDMemory.FULL_PRODUCT_MAX_RATIO * 8


def test_crd_z_is_set_once_then_fixed():
    mem, xs, xt, idx, cidx = _crd_setup()
    mem(xs, xt, idx, cidx)
    z = (float(mem.z_student), float(mem.z_teacher))
    assert z[0] > 0 and z[1] > 0
    mem(xs.flip(0), xt * 0.5, idx, cidx)
    mem(xs, xt, idx)
    assert (float(mem.z_student), float(mem.z_teacher)) == z


def test_crd_random_negatives_and_gradient_to_embeddings_only():
    mem, xs, xt, idx, _ = _crd_setup(k=9)
    torch.manual_seed(0)
    xs.requires_grad_()
    xt.requires_grad_()
    out_s, out_t = mem(xs, xt, idx)
    assert out_s.shape == (4, 10)
    crd_loss(out_s, out_t, 30).backward()
    assert xs.grad.abs().max() > 0 and xt.grad.abs().max() > 0
    assert not mem.memory_student.requires_grad and not mem.memory_teacher.requires_grad


def test_crd_positive_is_column_zero():
    mem, xs, xt, idx, cidx = _crd_setup()
    mem.z_student.fill_(1.0)
    mem.z_teacher.fill_(1.0)
    before = mem.memory_teacher.clone()
    torch.manual_seed(1)
    out_s, _ = mem(xs, xt, idx)  # random negatives
    expected = torch.exp((before[idx] * xs).sum(1) / 0.2)
    torch.testing.assert_close(out_s[:, 0], expected)


@pytest.mark.parametrize("n", [1, 7])
def test_crd_nce_matches_reference(n):
    out = torch.rand(n, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 1e-3
    close(crd_nce_loss(out, 1000), ref_crd_nce(out.tolist(), 1000))


# ----------------------------------------------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------------------------------------------


def _bad_calls():
    s, t = make_logits(4, 5, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 3])
    e, f = make_embeds(4, 6, dtype=torch.float32)
    th = torch.tensor(1.0)
    mem = CRDMemory(6, 10, nce_k=3)
    return [
        (lambda: kd_loss(s, t, -1.0), "-1.0"),
        (lambda: kd_loss(s, t, 0.0), "temperature"),
        (lambda: kd_loss(s, t[:, :3]), "same shape"),
        (lambda: kd_loss(s[0], t[0]), "(B, C)"),
        (lambda: dkd_loss(s, t, y[:3]), "labels"),
        (lambda: dkd_loss(s, t, y.float()), "integer"),
        (lambda: dkd_loss(s, t, torch.tensor([0, 1, 2, 9])), "[0, 5)"),
        (lambda: dkd_loss(s, t, y, temperature=-2.0), "-2.0"),
        (lambda: dkd_loss(s, t, y, beta=torch.ones(3)), "beta"),
        (lambda: ckd_loss(s, t, temperature=-0.5), "-0.5"),
        (lambda: ckd_loss(s, t, anchor="teachr"), "'teachr'"),
        (lambda: ckd_loss(s, t, negatives="all"), "'all'"),
        (lambda: ckd_loss(s, t, terms=()), "terms"),
        (lambda: ckd_loss(s, t, terms=("intra", "extra")), "'extra'"),
        (lambda: mcld_sample_loss(s, t, y, mode="forward"), "'forward'"),
        (lambda: mcld_sample_loss(s, t, None, mode="label"), "labels"),
        (lambda: mcld_instance_loss(s, t, y, normalize="l1"), "'l1'"),
        (lambda: mcld_instance_loss(s, t, y, target_mask="class"), "'class'"),
        (lambda: mcld_instance_loss(s, t, None, target_mask="gt_logit"), "labels"),
        (lambda: mcld_category_loss(s, t, y, temperature=0), "temperature"),
        (lambda: mcld_loss(s, t, y, sample_mode="both"), "'both'"),
        (lambda: mcld_loss(s, t, y, category_weight=-1.0), "category_weight"),
        (lambda: mcld_loss(s, t, y[:2]), "labels"),
        (lambda: dcd_loss(e, f[:, :3], th, 0.0), "same shape"),
        (lambda: dcd_loss(e, f, th, 0.0, fixed_temperature=-0.07), "-0.07"),
        (lambda: dcd_loss(e, f, None, 0.0), "log_inv_temperature"),
        (lambda: dcd_loss(e, f, th, 0.0, max_inv_temperature=0.0), "max_inv_temperature"),
        (lambda: CRDMemory(6, 10, nce_t=-0.07), "-0.07"),
        (lambda: CRDMemory(6, 10, nce_m=1.5), "1.5"),
        (lambda: mem(e, f, torch.arange(3)), "index"),
        (lambda: mem(e, f, torch.arange(4), torch.zeros(4, 2, dtype=torch.long)), "contrast_index"),
        (lambda: crd_nce_loss(torch.rand(4, 1), 10), "out"),
        (lambda: standardize_logits(s, eps=-1.0), "eps"),
        (lambda: standardize_logits(s, unbiased="yes"), "unbiased"),
        (lambda: standardize_logits(s[:, :1]), "2 classes"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error(i):
    call, fragment = _bad_calls()[i]
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)
