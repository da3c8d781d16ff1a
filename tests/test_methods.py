"""Registered methods: forward/backward on two small model pairs, owned parameters reach the optimiser."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ckd_study.config import make_config
from ckd_study.data import load_dataset
from ckd_study.methods import MethodError, available_methods, build_options, create_method, method_class
from ckd_study.models import ModelOutput, create_model
from ckd_study.train import DeviceSetup, LiveTeacher, Trainer

PAIRS = [("resnet14", "resnet8"), ("wrn_16_2", "wrn_16_1")]
NUM_CLASSES = 10
EXPECTED_TERMS = {
    "ce": {"ce"},
    "kd": {"ce", "kd"},
    "kd_ls": {"ce", "kd"},
    "dkd": {"ce", "dkd_tckd", "dkd_nckd"},
    "dkd_ls": {"ce", "dkd_tckd", "dkd_nckd"},
    "crd": {"ce", "crd"},
    "ckd": {"ce", "ckd_intra", "ckd_inter"},
    "mcld": {"ce", "mcld_instance", "mcld_sample", "mcld_category"},
    "dcd": {"ce", "dcd_contrastive", "dcd_consistency"},
    "dcd_kd": {"ce", "dcd_contrastive", "dcd_consistency", "kd"},
}
SMALL_OPTIONS = {"crd": {"nce_k": 16}}


def test_registry_is_complete():
    assert set(available_methods()) == set(EXPECTED_TERMS)
    with pytest.raises(MethodError, match="valid methods"):
        method_class("fitnet")


def _pair(teacher_name: str, student_name: str):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, NUM_CLASSES).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = create_model(student_name, NUM_CLASSES)
    return teacher, student


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_method_forward_backward(name, pair):
    teacher, student = _pair(*pair)
    cls = method_class(name)
    method = create_method(name, student, teacher if cls.needs_teacher else None, num_train=64,
                           train_labels=torch.arange(64) % NUM_CLASSES, **SMALL_OPTIONS.get(name, {}))
    x = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % NUM_CLASSES
    indices = torch.arange(8) * 3
    with torch.no_grad():
        teacher_out = teacher(x) if cls.needs_teacher else None
    terms = method(student(x), teacher_out, labels, indices, epoch=1)
    assert set(terms) == EXPECTED_TERMS[name]
    for term, value in terms.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value), term
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    for pname, p in method.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        if pname != "bias":  # DCD's bias provably gets zero gradient (methods.md §4)
            assert p.grad.abs().sum() > 0, f"{name}.{pname} got a zero gradient"


@pytest.mark.parametrize("name", ["crd", "dcd", "dcd_kd"])
def test_extra_modules_are_sized_from_the_models_and_reach_the_optimiser(name):
    teacher, student = _pair("wrn_16_2", "resnet8")
    data = load_dataset("digits").subset(8, 2)
    config = make_config("smoke", method=name, student="resnet8", teacher="wrn_16_2")
    method = create_method(name, student, teacher, num_train=len(data.x_train), train_labels=data.y_train,
                           **config.method_options)
    heads = [m for m in method.modules() if isinstance(m, torch.nn.Linear)]
    assert {h.in_features for h in heads} == {student.pooled_dim, teacher.pooled_dim} == {64, 128}
    setup = DeviceSetup.for_device("cpu")
    trainer = Trainer(config, data, student, method, LiveTeacher(teacher, setup), setup, quiet=True)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    owned = list(method.parameters())
    assert owned and all(id(p) in optimised for p in owned)
    assert all(id(p) in optimised for p in student.parameters())
    assert not any(id(p) in optimised for p in teacher.parameters())


def test_ckd_terms_switch_off_and_options_reach_the_loss():
    teacher, student = _pair("resnet14", "resnet8")
    x = torch.randn(6, 3, 32, 32)
    labels = torch.arange(6)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    both = create_method("ckd", student, teacher)(s, t, labels, None, 1)
    intra = create_method("ckd", student, teacher, terms=("intra",))(s, t, labels, None, 1)
    inter = create_method("ckd", student, teacher, terms=["inter"])(s, t, labels, None, 1)
    assert set(intra) == {"ce", "ckd_intra"} and set(inter) == {"ce", "ckd_inter"}
    assert torch.allclose(both["ckd_intra"], intra["ckd_intra"]) and torch.allclose(both["ckd_inter"], inter["ckd_inter"])
    hot = create_method("ckd", student, teacher, temperature=0.5)(s, t, labels, None, 1)
    assert not torch.allclose(hot["ckd_inter"], both["ckd_inter"])
    from ckd_study.losses import ckd_loss

    expected = ckd_loss(s.logits, t.logits, temperature=1.0)
    assert torch.allclose(both["ckd_intra"] + both["ckd_inter"], 100.0 * expected.total)


def test_warmups_follow_the_epoch():
    teacher, student = _pair("resnet14", "resnet8")
    x = torch.randn(6, 3, 32, 32)
    labels = torch.arange(6)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    dkd = create_method("dkd", student, teacher, warmup=20)
    early, late = dkd(s, t, labels, None, 5), dkd(s, t, labels, None, 40)
    assert torch.allclose(early["dkd_nckd"] * 4, late["dkd_nckd"])
    mcld = create_method("mcld", student, teacher, warmup=10)
    early, late = mcld(s, t, labels, None, 2), mcld(s, t, labels, None, 10)
    assert torch.allclose(early["mcld_category"] * 5, late["mcld_category"])
    assert torch.allclose(early["mcld_instance"], late["mcld_instance"])


# ----------------------------------------------------------------------------------- logit standardisation
# The released code (sunshangquan/logit-standardization-KD): normalize(z) = (z - mean) / (1e-7 + std) with
# torch's default, unbiased (C - 1) std; KD+LS: 0.1·CE + 9·KD(τ=2); DKD+LS: tools/train.py multiplies DKD's
# α and β by --kd-weight 9 and sets τ to --base-temp 2. The formulas below are written out independently.


def _zscore(z: torch.Tensor, ddof: int) -> torch.Tensor:
    z = z.double()
    centred = z - z.sum(1, keepdim=True) / z.shape[1]
    std = (centred.pow(2).sum(1, keepdim=True) / (z.shape[1] - ddof)).sqrt()
    return centred / (1e-7 + std)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p ‖ q) from probabilities."""
    return (p * (p.log() - q.log())).sum(1)


def _tckd_nckd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[float, float]:
    """DKD's two terms (batch means, times τ²): binary target-vs-rest KL and the KL of the renormalised
    non-target distributions."""
    ps, pt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    rows = torch.arange(len(y))
    bs = torch.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = torch.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    keep = torch.ones_like(ps, dtype=torch.bool)
    keep[rows, y] = False
    ns = ps[keep].view(len(y), -1)
    nt = pt[keep].view(len(y), -1)
    ns, nt = ns / ns.sum(1, keepdim=True), nt / nt.sum(1, keepdim=True)
    return float(_kl(bt, bs).mean()) * tau**2, float(_kl(nt, ns).mean()) * tau**2


def _logits_pair(b=6, c=NUM_CLASSES):
    teacher, student = _pair("resnet14", "resnet8")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(b, 3, 32, 32, generator=g)
    with torch.no_grad():  # value checks only
        t, s = teacher(x), student(x)
    # make the logits far from standardised, so that the choice of std and the scale matter
    s = s._replace(logits=3.0 * s.logits + torch.randn(b, c, generator=g) * 2.0)
    t = t._replace(logits=5.0 * t.logits + torch.randn(b, c, generator=g) * 4.0 + 1.0)
    return teacher, student, s, t, torch.arange(b) % c


@pytest.mark.parametrize("unbiased", [True, False])
def test_kd_ls_is_the_released_kd_on_standardised_logits(unbiased):
    teacher, student, s, t, y = _logits_pair()
    options = {} if unbiased else {"unbiased_std": False}
    terms = create_method("kd_ls", student, teacher, **options)(s, t, y, None, 1)
    ddof = 1 if unbiased else 0
    zs, zt = _zscore(s.logits, ddof), _zscore(t.logits, ddof)
    kd = float(_kl(torch.softmax(zt / 2, 1), torch.softmax(zs / 2, 1)).mean()) * 4
    assert float(terms["kd"]) == pytest.approx(9 * kd, rel=1e-5)
    ce = float(torch.nn.functional.cross_entropy(s.logits.double(), y))
    assert float(terms["ce"]) == pytest.approx(0.1 * ce, rel=1e-5)


@pytest.mark.parametrize("epoch", [5, 40])
def test_dkd_ls_weights_alpha_and_beta_by_the_released_kd_weight(epoch):
    teacher, student, s, t, y = _logits_pair()
    terms = create_method("dkd_ls", student, teacher)(s, t, y, None, epoch)
    tckd, nckd = _tckd_nckd(_zscore(s.logits, 1), _zscore(t.logits, 1), y, tau=2.0)
    warm = min(epoch / 20, 1.0)
    assert float(terms["dkd_tckd"]) == pytest.approx(warm * 9 * 1.0 * tckd, rel=1e-5)
    assert float(terms["dkd_nckd"]) == pytest.approx(warm * 9 * 8.0 * nckd, rel=1e-5)
    # the per-pair β and kd_weight=1 (plain DKD weights on z-scored logits) go through the same formula
    plain = create_method("dkd_ls", student, teacher, kd_weight=1.0, beta=2.0)(s, t, y, None, epoch)
    assert float(plain["dkd_tckd"]) == pytest.approx(warm * tckd, rel=1e-5)
    assert float(plain["dkd_nckd"]) == pytest.approx(warm * 2.0 * nckd, rel=1e-5)
    # and plain DKD is untouched: α=1, β=8, τ=4 on the raw logits
    dkd = create_method("dkd", student, teacher)(s, t, y, None, epoch)
    raw_tckd, raw_nckd = _tckd_nckd(s.logits.double(), t.logits.double(), y, tau=4.0)
    assert float(dkd["dkd_tckd"]) == pytest.approx(warm * raw_tckd, rel=1e-5)
    assert float(dkd["dkd_nckd"]) == pytest.approx(warm * 8.0 * raw_nckd, rel=1e-5)


def test_dcd_fixed_temperature_divides():
    teacher, student = _pair("resnet14", "resnet8")
    method = create_method("dcd", student, teacher, fixed_temperature=0.1)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    from ckd_study.losses import dcd_loss

    u = method.head_student(s.pooled)
    v = method.head_teacher(t.pooled)
    expected = dcd_loss(u, v, None, method.bias, fixed_temperature=0.1)
    got = method(s, t, torch.arange(6), None, 1)
    assert torch.allclose(got["dcd_contrastive"], expected.contrastive)
    # dividing by 0.1 gives logits ten times the cosines: far from the 0.07-multiplied released variant
    logits = torch.nn.functional.normalize(u, dim=1) @ torch.nn.functional.normalize(v, dim=1).T / 0.1
    ce = torch.nn.functional.cross_entropy(logits + method.bias, torch.arange(6))
    assert torch.allclose(got["dcd_contrastive"], ce, atol=1e-6)


@pytest.mark.parametrize("name, options, message", [
    ("ckd", {"temperature": -1.0}, "temperature"),
    ("ckd", {"anchor": "sideways"}, "anchor"),
    ("ckd", {"negatives": "all"}, "negatives"),
    ("ckd", {"terms": ()}, "terms"),
    ("kd", {"temprature": 4.0}, "unknown option"),
    ("mcld", {"target_mask": "everything"}, "target_mask"),
    ("mcld", {"components": ("global",)}, "components"),
    ("dcd", {"fixed_temperature": 0.0}, "fixed_temperature"),
    ("crd", {"nce_m": 1.5}, "nce_m"),
    ("dkd", {"beta": -2.0}, "beta"),
    ("dkd_ls", {"kd_weight": -9.0}, "kd_weight"),
    ("kd_ls", {"unbiased_std": "yes"}, "unbiased_std"),
    ("crd", {"negatives": "random"}, "negatives"),
])
def test_invalid_options_raise_clear_errors(name, options, message):
    teacher, student = _pair("resnet14", "resnet8")
    with pytest.raises(MethodError, match=message):
        create_method(name, student, teacher, **options)


def test_teacherless_and_teacher_requirements():
    teacher, student = _pair("resnet14", "resnet8")
    with pytest.raises(MethodError, match="teacher"):
        create_method("kd", student, None)
    ce = create_method("ce", student)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    out = ModelOutput(logits=logits, feats=[], preact_feats=[], pooled=torch.zeros(2, student.pooled_dim))
    terms = ce(out, None, labels, None, 1)
    # mean of log(sum_c exp(z_c)) - z_y, by hand
    expected = (math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)) - 2.0
                + math.log(math.exp(0.5) + math.exp(1.5) + 1.0) - 0.0) / 2
    assert set(terms) == {"ce"} and float(terms["ce"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_docstrings_state_defaults_and_cite_the_spec(name):
    cls = method_class(name)
    doc = (cls.Options.__doc__ or "") + (cls.__doc__ or "")
    assert "methods.md" in doc, f"{name}: docstring must cite the spec section"
    fields = [f.name for f in dataclasses.fields(build_options(name))]
    if fields:
        assert "default" in doc.lower(), f"{name}: docstring must state the defaults"


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_added_state_counts_heads_temperature_and_memory_bank(name):
    """What a run records as the method's own state, against the sizes the spec gives: two linear heads
    (d_s·e + e and d_t·e + e), DCD's inverse temperature and bias, CRD's memory bank (2 × N × e, plus its two
    normalisation constants); the logit methods (KD, DKD, CKD, MCLD, ...) add nothing."""
    teacher, student = _pair("wrn_16_2", "resnet8")
    n_train = 40
    labels = torch.arange(n_train) % 10
    options = {"nce_k": 8} if name == "crd" else {}
    method = create_method(name, student, None if name == "ce" else teacher, num_train=n_train,
                           train_labels=labels, **options)
    d_s, d_t = student.pooled_dim, teacher.pooled_dim
    heads = {"crd": 128, "dcd": 128, "dcd_kd": 128}.get(name)
    parameters = 0 if heads is None else d_s * heads + heads + d_t * heads + heads
    if name in ("dcd", "dcd_kd"):
        parameters += 2  # log inverse temperature and bias
    buffers = 2 * n_train * 128 + 2 if name == "crd" else 0
    assert method.added_state() == {"method_parameters": parameters, "method_buffer_values": buffers}
