"""The series that isolate the papers' claims (issue: ablations that test what the papers claim): CKD's λ·τ
control series, inter without the positive, the anchor × negatives grid, DCD's κ per epoch, the measured cost with
a live teacher. Grids are checked as data; κ and cost against independent values on tiny smoke runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ckd_study import runs, study
from ckd_study.config import make_config
from ckd_study.cost import measure_training_cost, training_cost
from ckd_study.runs import RunStore
from ckd_study.models import create_model

PRESET = "smoke"


def _entries(experiment: str):
    return study.experiment_configs(PRESET, experiment)


def test_temperature_control_series_holds_weight_times_tau_constant():
    spec = study.STUDY[PRESET]
    default = make_config(PRESET, method="ckd", teacher=spec.pair[0], student=spec.pair[1]).method_options
    product = default["weight"] * default["temperature"]
    fixed = {e.labels["temperature"]: e.config for e in _entries("temperature")
             if e.labels["series"] == study.FIXED_WEIGHT}
    control = {e.labels["temperature"]: e.config for e in _entries("temperature")
               if e.labels["series"] == study.CONSTANT_PRODUCT}
    assert sorted(control) == sorted(fixed) == sorted(spec.temperatures)
    for tau, config in control.items():
        options = config.method_options
        assert options["temperature"] == tau
        assert options["weight"] * options["temperature"] == pytest.approx(product)
        assert fixed[tau].method_options["weight"] == default["weight"]
        # at the default temperature the two series are one run (trained once)
        assert (config.run_id == fixed[tau].run_id) == math.isclose(tau, default["temperature"])
    assert any(not math.isclose(t, default["temperature"]) for t in control), "a control series of one point"


@pytest.mark.parametrize("preset", [PRESET, "medium"])
def test_gradient_matched_series_holds_weight_over_tau_constant(preset):
    """λ/τ constant: the contrastive gradient's prefactor (λ/τ)(softmax − one-hot) is the default's at every τ."""
    spec = study.STUDY[preset]
    default = make_config(preset, method="ckd", teacher=spec.pair[0], student=spec.pair[1]).method_options
    ratio = default["weight"] / default["temperature"]
    entries = study.experiment_configs(preset, "temperature")
    matched = [e for e in entries if e.labels["series"] == study.CONSTANT_RATIO]
    product = {(e.labels["temperature"], e.labels["seed"]): e.config.run_id for e in entries
               if e.labels["series"] == study.CONSTANT_PRODUCT}
    assert sorted({e.labels["temperature"] for e in matched}) == sorted(spec.temperatures)
    assert len(matched) == len(spec.temperatures) * len(spec.ablation_seeds)
    for e in matched:
        options, tau = e.config.method_options, e.labels["temperature"]
        assert options["temperature"] == tau
        assert options["weight"] / options["temperature"] == pytest.approx(ratio)
        # the two controls meet only at the default temperature, where both are the default run
        same = e.config.run_id == product[(tau, e.labels["seed"])]
        assert same == math.isclose(tau, default["temperature"])


def test_intra_inter_grid_has_inter_without_positive_and_the_anchor_negatives_cells():
    entries = [e for e in _entries("intra_inter") if e.config.method == "ckd"]
    by_variant = {e.labels["variant"]: e.config for e in entries}
    without = by_variant[study.INTER_WITHOUT_POSITIVE].method_options
    assert without["terms"] == ["inter"] and without["inter_positive"] is False
    with_positive = by_variant["inter only (contrast)"].method_options
    assert "inter_positive" not in with_positive  # the default: left out of the stored options and the run id
    cells = [e for e in entries if e.labels["ablation"] == study.ANCHOR_NEGATIVES]
    seen = {(e.config.method_options["anchor"], e.config.method_options["negatives"]) for e in cells}
    assert seen == {("teacher", "teacher_student"), ("student", "teacher_student"), ("both", "teacher_student"),
                    ("teacher", "student_student")}
    released = next(e for e in cells if e.labels["variant"].endswith("(released)"))
    assert released.config.run_id == by_variant["intra + inter (full CKD)"].run_id
    assert len({e.config.run_id for e in cells}) == 4


def test_quick_keeps_its_stored_grid():
    """The quick preset's committed outputs were trained before these series: none of them enters its grid."""
    spec = study.STUDY["quick"]
    assert not spec.temperature_control and not spec.ckd_anchor_negatives and not spec.ckd_extra_variants
    assert not spec.temperature_gradient_control


@pytest.mark.parametrize("fixed", [None, 0.25])
def test_dcd_logs_kappa_every_epoch(tmp_path, fixed):
    store = RunStore(tmp_path)
    teacher = make_config(PRESET, method="ce", student="resnet14", epochs=1)
    config = make_config(PRESET, method="dcd", teacher=teacher, epochs=3, milestones=(3,),
                         method_options={"fixed_temperature": fixed})
    summary = runs.run(config, store=store, quiet=True)
    metrics = store.metrics(config.run_id)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    # the run records what DCD adds: the values of its checkpointed heads, temperature and bias
    latest = torch.load(store.run_dir(config.run_id) / "checkpoints" / "latest.pt", weights_only=False)
    assert summary["method_parameters"] == sum(v.numel() for v in latest["method"].values())
    assert summary["method_buffer_values"] == 0
    if fixed is not None:
        assert all(m["dcd_kappa"] == 1 / fixed for m in metrics)
        return
    # The last epoch's κ is min(exp θ, 10) of the θ in the final checkpoint; θ moved from its start (1.0).
    theta = float(latest["method"]["log_inv_temperature"])
    assert metrics[-1]["dcd_kappa"] == pytest.approx(min(math.exp(theta), 10.0), rel=1e-6)
    assert len({m["dcd_kappa"] for m in metrics}) == 3 and metrics[0]["dcd_kappa"] != pytest.approx(math.e)


def test_training_cost_is_measured_with_the_live_teacher_and_stored(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "results")
    teacher = make_config(PRESET, method="ce", student="resnet14", epochs=1)
    runs.run(teacher, store=store, quiet=True)
    config = make_config(PRESET, method="kd", teacher=teacher, epochs=1)
    calls = []
    import ckd_study.train as train

    original = train.LiveTeacher.__call__

    def counting(self, batch):
        calls.append(len(batch.labels))
        return original(self, batch)

    monkeypatch.setattr(train.LiveTeacher, "__call__", counting)
    record = training_cost(config, store, tmp_path / "cost", steps=4, warmup=2)
    assert record["teacher_source"] == "live" and record["steps_timed"] == 4
    assert len(calls) >= 2 + 4 and set(calls) == {config.batch_size}  # the teacher ran on every step
    assert record["images_per_s"] == pytest.approx(config.batch_size / record["seconds_per_step"])
    assert record["seconds_per_epoch"] == pytest.approx(record["seconds_per_step"] * record["steps_per_epoch"])
    assert not store.run_dir(config.run_id).exists()  # a measurement is not a run
    stored = json.loads((tmp_path / "cost" / f"{config.run_id}.json").read_text())
    assert stored == record

    def no_measuring(*args, **kwargs):
        raise AssertionError("a stored record must be reused")

    monkeypatch.setattr("ckd_study.cost.measure_training_cost", no_measuring)
    assert training_cost(config, store, tmp_path / "cost") == record
    assert record["method_parameters"] == record["method_buffer_values"] == 0  # KD adds nothing
    # A record stored before it held the method's added state is completed from the modules, not re-timed:
    # DCD's two heads (pooled dim -> 128) plus its inverse temperature and bias.
    dcd = make_config(PRESET, method="dcd", teacher=teacher, epochs=1)
    old = {"run_id": dcd.run_id, "seconds_per_step": 1.5}
    (tmp_path / "cost" / f"{dcd.run_id}.json").write_text(json.dumps(old))
    d_s, d_t = create_model(dcd.student, 10).pooled_dim, create_model(teacher.student, 10).pooled_dim
    completed = {**old, "method_parameters": (d_s + 1) * 128 + (d_t + 1) * 128 + 2, "method_buffer_values": 0}
    assert training_cost(dcd, store, tmp_path / "cost") == completed
    assert json.loads((tmp_path / "cost" / f"{dcd.run_id}.json").read_text()) == completed
    # The sizes need the architectures and the training set, not the teacher's weights: a fresh clone without
    # the teacher's checkpoint still completes a record. CRD: two heads to 128 and the 2 × N × 128 memory bank
    # (plus its two normalisation constants) over the N = 24 × 10 smoke training images.
    crd = make_config(PRESET, method="crd", teacher=teacher, epochs=1)
    old = {"run_id": crd.run_id, "seconds_per_step": 2.5}
    (tmp_path / "cost" / f"{crd.run_id}.json").write_text(json.dumps(old))
    import shutil

    shutil.rmtree(store.run_dir(teacher.run_id) / "checkpoints")
    n_train = crd.train_per_class * 10
    completed = {**old, "method_parameters": (d_s + 1) * 128 + (d_t + 1) * 128,
                 "method_buffer_values": 2 * n_train * 128 + 2}
    assert training_cost(crd, store, tmp_path / "cost") == completed
    assert json.loads((tmp_path / "cost" / f"{crd.run_id}.json").read_text()) == completed
    # without the training set the sizes cannot be had: the stored timings still count, the table shows "–"
    quick = make_config("quick", method="crd", teacher=make_config("quick", method="ce", student="resnet20"))
    old = {"run_id": quick.run_id, "seconds_per_step": 3.5}
    (tmp_path / "cost" / f"{quick.run_id}.json").write_text(json.dumps(old))
    assert training_cost(quick, store, tmp_path / "cost", data_root=tmp_path / "no-data") == old
    with pytest.raises(ValueError, match="steps must be"):
        measure_training_cost(config, store, steps=0)
