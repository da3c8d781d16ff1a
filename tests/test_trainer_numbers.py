"""The numbers the trainer produces: accuracy, learning rate per epoch, sample order per epoch, and that a
method option set in a config (or on the command line) reaches the loss the trainer logs.

Accuracy is checked against hand-computed top-1/top-5 on crafted logits; the learning rate against the
schedule's formula written here and ``lr_at``, read from the optimiser during training (``step_hook``) and from
metrics.jsonl; sample order against a fresh ``train_batches`` plan per (seed, epoch). Options are checked end to
end on the smoke preset: one epoch of exactly one step (the batch is the whole training subset), so the logged
epoch-1 term is the first step's term and a pure weight scales it exactly. CPU, seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ckd_study import cli, methods
from ckd_study.config import make_config
from ckd_study.data import BatchIterator, ImageDataset
from ckd_study.models import ModelOutput
from ckd_study.runs import RunStore, dataset_for, run
from ckd_study.train import DeviceSetup, accuracy_metrics, evaluate, lr_at, predict, train_batches


# ---------------------------------------------------------------------------------------------------------
# Accuracy: top-1 / top-5 on crafted logits
# ---------------------------------------------------------------------------------------------------------
# Each row: the classes from best to worst (8 classes, no ties) and the label. Logit of the class at rank r: 10 - r.
RANKED = [
    ([1, 7, 6, 2, 3, 0, 4, 5], 1),  # top-1
    ([1, 7, 6, 2, 3, 0, 4, 5], 7),  # second: top-5 only
    ([4, 0, 2, 6, 5, 3, 1, 7], 5),  # fifth: top-5 only
    ([4, 0, 2, 6, 5, 3, 1, 7], 3),  # sixth: neither
    ([2, 3, 5, 7, 1, 6, 0, 4], 0),  # seventh: neither
    ([6, 5, 4, 3, 2, 1, 0, 7], 6),  # top-1
    ([0, 1, 2, 3, 4, 5, 6, 7], 7),  # last: neither (label index above every top-5 index)
]
EXPECTED_TOP1 = 100.0 * 2 / 7
EXPECTED_TOP5 = 100.0 * 4 / 7


def _crafted_logits() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.zeros(len(RANKED), 8)
    for i, (order, _) in enumerate(RANKED):
        for rank, cls in enumerate(order):
            logits[i, cls] = 10.0 - rank + 0.25 * i  # a per-row shift changes no ranking
    return logits, torch.tensor([label for _, label in RANKED])


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / logits.shape[0]


def test_accuracy_metrics_on_crafted_logits():
    logits, labels = _crafted_logits()
    got = accuracy_metrics(logits, labels)
    assert got["top1"] == pytest.approx(EXPECTED_TOP1)
    assert got["top5"] == pytest.approx(EXPECTED_TOP5)
    assert got["loss"] == pytest.approx(_mean_ce(logits, labels), rel=1e-6)
    # sample by sample: each row alone scores 100 or 0 as the table says
    for i, (order, label) in enumerate(RANKED):
        one = accuracy_metrics(logits[i:i + 1], labels[i:i + 1])
        assert one["top1"] == (100.0 if order[0] == label else 0.0), i
        assert one["top5"] == (100.0 if label in order[:5] else 0.0), i


def test_accuracy_with_fewer_than_five_classes_and_all_wrong():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [2.0, 1.0, 9.0], [1.0, 0.0, -1.0]])
    labels = torch.tensor([2, 1, 0, 0])
    got = accuracy_metrics(logits, labels)
    assert got["top1"] == pytest.approx(50.0)  # rows 1 and 3
    assert got["top5"] == pytest.approx(100.0)  # top-5 of 3 classes holds every class
    wrong = accuracy_metrics(logits, torch.tensor([1, 2, 1, 2]))
    assert wrong["top1"] == 0.0 and wrong["top5"] == 100.0


class _LookupModel(nn.Module):
    """Decodes each test image's index (every pixel of image i is i) and returns row i of a logit table;
    records the mode it was called in."""

    def __init__(self, table: torch.Tensor, mean, std) -> None:
        super().__init__()
        self.table = table
        self.mean0, self.std0 = mean[0], std[0]
        self.weight = nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.modes.append(self.training)
        index = torch.round((x[:, 0, 0, 0] * self.std0 + self.mean0) * 255).long()
        logits = self.table[index] + 0 * self.weight
        return ModelOutput(logits=logits, feats=[], preact_feats=[], pooled=index[:, None].float())


def _lookup_dataset(n: int) -> ImageDataset:
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 4, 4).contiguous()
    labels = torch.tensor([label for _, label in RANKED])
    return ImageDataset("lookup", x_train=x, y_train=labels, x_test=x, y_test=labels,
                        classes=[str(c) for c in range(8)], mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))


@pytest.mark.parametrize("batch_size", [3, 500])
def test_predict_and_evaluate_score_the_right_rows(batch_size):
    logits, labels = _crafted_logits()
    data = _lookup_dataset(len(RANKED))
    model = _LookupModel(logits, data.mean, data.std).train()
    setup = DeviceSetup.for_device("cpu", "fp32")
    out = predict(model, data.x_test, data.mean, data.std, batch_size=batch_size, setup=setup,
                  keep=("logits", "pooled"))
    torch.testing.assert_close(out["logits"], logits)  # in order, every image once
    assert out["pooled"][:, 0].tolist() == list(range(len(RANKED)))
    assert model.modes and not any(model.modes), "predict must run the model in eval mode"
    assert model.training, "predict must restore the training mode"
    got = evaluate(model, data, setup, batch_size=batch_size)
    assert got["top1"] == pytest.approx(EXPECTED_TOP1)
    assert got["top5"] == pytest.approx(EXPECTED_TOP5)
    assert got["loss"] == pytest.approx(_mean_ce(logits, labels), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Shared smoke store: a one-epoch teacher on 8 images per class
# ---------------------------------------------------------------------------------------------------------
PER_CLASS = 8
ONE_STEP = dict(epochs=1, milestones=(1,), train_per_class=PER_CLASS, batch_size=10 * PER_CLASS, precision="fp32")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("results"))


def _config(method: str, options: dict | None = None, **overrides):
    fields = {**ONE_STEP, **overrides}
    return make_config("smoke", method=method, method_options=options or {}, teacher_overrides={"epochs": 1},
                       device="cpu", **fields)


# ---------------------------------------------------------------------------------------------------------
# Learning rate and sample order per epoch
# ---------------------------------------------------------------------------------------------------------
def _expected_lr(schedule: str, epoch: int) -> float:
    """0.05, x0.1 after each milestone (1, 2); cosine over 3 epochs: 0.05 * (1 + cos(pi (e - 1) / 3)) / 2."""
    if schedule == "cosine":
        return 0.05 * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / 3))
    return 0.05 * 0.1 ** sum(1 for m in (1, 2) if epoch > m)


@pytest.fixture(scope="module", params=["step", "cosine"])
def recorded_run(request, store):
    """A 3-epoch CE run (4 steps an epoch) with the lr, the iterator's epoch and every batch recorded."""
    config = _config("ce", epochs=3, milestones=(1, 2), schedule=request.param, batch_size=24)
    lrs: dict[int, set[float]] = {}
    iterator_epochs: dict[int, set[int]] = {}
    seen: dict[int, list[torch.Tensor]] = {}
    yielded: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    current = {"epoch": None}

    def hook(trainer, epoch, step):
        lrs.setdefault(epoch, set()).update(g["lr"] for g in trainer.optimizer.param_groups)
        iterator_epochs.setdefault(epoch, set()).add(trainer.train_batches.epoch)
        current["epoch"] = epoch

    original_loss = methods.CE.loss_terms
    original_iter = BatchIterator.__iter__

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        seen.setdefault(epoch, []).append(indices.clone())
        return original_loss(self, student_out, teacher_out, labels, indices, epoch)

    def iterate(self):
        for batch in original_iter(self):
            yielded.setdefault(self.epoch, []).append((batch.indices.clone(), batch.view_ids.clone()))
            yield batch

    mp = pytest.MonkeyPatch()
    mp.setattr(methods.CE, "loss_terms", loss_terms)
    mp.setattr(BatchIterator, "__iter__", iterate)
    try:
        summary = run(config, store=store, quiet=True, step_hook=hook)
    finally:
        mp.undo()
    return dict(config=config, summary=summary, lrs=lrs, iterator_epochs=iterator_epochs, seen=seen,
                yielded=yielded, metrics=store.metrics(config.run_id))


def test_lr_at_follows_the_schedule_formula():
    for schedule in ("step", "cosine"):
        config = _config("ce", epochs=3, milestones=(1, 2), schedule=schedule)
        assert [lr_at(config, e) for e in (1, 2, 3)] == pytest.approx([_expected_lr(schedule, e) for e in (1, 2, 3)])
    paper = make_config("paper", device="cpu")
    assert lr_at(paper, 150) == pytest.approx(0.05) and lr_at(paper, 151) == pytest.approx(0.005)
    assert lr_at(paper, 211) == pytest.approx(0.05 * 1e-3)


def test_trainer_uses_each_epochs_learning_rate(recorded_run):
    config, lrs = recorded_run["config"], recorded_run["lrs"]
    assert sorted(lrs) == [1, 2, 3]
    for epoch, values in lrs.items():
        assert len(values) == 1, f"epoch {epoch}: the lr changed within the epoch: {values}"
        (value,) = values
        assert value == pytest.approx(lr_at(config, epoch), rel=1e-12), epoch
        assert value == pytest.approx(_expected_lr(config.schedule, epoch), rel=1e-12), epoch
    assert len({lr for values in lrs.values() for lr in values}) == 3  # three different rates
    logged = [m["lr"] for m in recorded_run["metrics"]]
    assert logged == pytest.approx([_expected_lr(config.schedule, e) for e in (1, 2, 3)], rel=1e-12)


def test_trainer_advances_the_epoch_of_the_batch_plan(recorded_run):
    config = recorded_run["config"]
    assert recorded_run["iterator_epochs"] == {1: {1}, 2: {2}, 3: {3}}
    data = dataset_for(config, torch.device("cpu"))
    for epoch in (1, 2, 3):
        plan = train_batches(config, data)
        plan.set_epoch(epoch)
        expected = [(b.indices, b.view_ids) for b in plan]
        got = recorded_run["yielded"][epoch]
        assert len(got) == len(expected) == 4
        for (gi, gv), (ei, ev) in zip(got, expected):
            assert torch.equal(gi, ei) and torch.equal(gv, ev), epoch
        # the loss saw exactly those samples, in that order
        assert all(torch.equal(a, b) for a, b in zip(recorded_run["seen"][epoch], [i for i, _ in expected]))
        assert len(recorded_run["seen"][epoch]) == 4
    # consecutive epochs: other order and other views of the same images
    for a, b in ((1, 2), (2, 3)):
        order_a = torch.cat([i for i, _ in recorded_run["yielded"][a]])
        order_b = torch.cat([i for i, _ in recorded_run["yielded"][b]])
        assert not torch.equal(order_a, order_b)
        assert sorted(order_a.tolist()) == sorted(order_b.tolist()) == list(range(len(data.x_train)))
        views_a = torch.cat([v for _, v in recorded_run["yielded"][a]])[order_a.argsort()]
        views_b = torch.cat([v for _, v in recorded_run["yielded"][b]])[order_b.argsort()]
        assert (views_a != views_b).float().mean() > 0.5


def test_batch_plan_depends_only_on_seed_and_epoch():
    config = _config("ce")
    data = dataset_for(config, torch.device("cpu"))

    def plan(cfg, epoch, replay=None):
        it = replay or train_batches(cfg, data)
        it.set_epoch(epoch)
        return [(b.indices, b.view_ids, b.images) for b in it]

    first = plan(config, 2)
    assert all(torch.equal(x, y) for a, b in zip(first, plan(config, 2)) for x, y in zip(a, b))
    reused = train_batches(config, data)
    plan(config, 5, reused)
    assert all(torch.equal(x, y) for a, b in zip(first, plan(config, 2, reused)) for x, y in zip(a, b))
    other_epoch = plan(config, 3)
    other_seed = plan(config.replace(seed=1), 2)
    for other in (other_epoch, other_seed):
        assert not torch.equal(torch.cat([b[0] for b in first]), torch.cat([b[0] for b in other]))


def test_same_seed_same_batches_in_two_stores(tmp_path, recorded_run):
    """A second run of the same config (another store) sees the same samples in the same order every epoch."""
    seen: dict[int, list[torch.Tensor]] = {}
    original = methods.CE.loss_terms

    def loss_terms(self, student_out, teacher_out, labels, indices, epoch):
        seen.setdefault(epoch, []).append(indices.clone())
        return original(self, student_out, teacher_out, labels, indices, epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods.CE, "loss_terms", loss_terms)
        again = run(recorded_run["config"], store=RunStore(tmp_path / "results"), quiet=True)
    for epoch in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(seen[epoch], recorded_run["seen"][epoch]))
    assert again["final_sha256"] == recorded_run["summary"]["final_sha256"]


# ---------------------------------------------------------------------------------------------------------
# A config's method options reach the method the trainer builds and the loss it logs
# ---------------------------------------------------------------------------------------------------------
# (method, option, value, the logged terms it multiplies by value / default, terms it leaves unchanged)
WEIGHT_CASES = [
    ("ckd", "weight", 200.0, ["train_ckd_intra", "train_ckd_inter"], ["train_ce"]),
    ("kd", "kd_weight", 2.7, ["train_kd"], ["train_ce"]),
    ("kd", "ce_weight", 0.4, ["train_ce"], ["train_kd"]),
    ("dkd", "alpha", 3.0, ["train_dkd_tckd"], ["train_ce", "train_dkd_nckd"]),
    ("dkd", "beta", 2.0, ["train_dkd_nckd"], ["train_ce", "train_dkd_tckd"]),
    ("crd", "weight", 2.0, ["train_crd"], ["train_ce"]),
    ("mcld", "lambda_category", 5.0, ["train_mcld_category"], ["train_ce", "train_mcld_instance",
                                                                "train_mcld_sample"]),
    ("dcd", "consistency_weight", 1.5, ["train_dcd_consistency"], ["train_ce", "train_dcd_contrastive"]),
    ("dcd_kd", "kd_weight", 3.0, ["train_kd"], ["train_ce", "train_dcd_contrastive", "train_dcd_consistency"]),
]


def _train_capturing_options(config, store):
    captured = {}

    def hook(trainer, epoch, step):
        captured["options"] = methods.resolve_options(config.method, vars(trainer.method.options))
        captured["class"] = type(trainer.method).name

    run(config, store=store, quiet=True, step_hook=hook)
    return captured, store.metrics(config.run_id)


@pytest.mark.parametrize("name, option, value, scaled, unchanged", WEIGHT_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in WEIGHT_CASES])
def test_option_in_config_scales_the_logged_term(store, name, option, value, scaled, unchanged):
    default_config = _config(name)
    config = _config(name, {option: value})
    default = default_config.method_options[option]
    assert default != value and config.run_id != default_config.run_id
    captured, metrics = _train_capturing_options(config, store)
    _, default_metrics = _train_capturing_options(default_config, store)
    stored = json.loads((store.run_dir(config.run_id) / "config.json").read_text())
    assert stored["config"]["method_options"][option] == value
    assert captured["class"] == name and captured["options"][option] == value
    assert captured["options"] == config.method_options  # the trainer's method has every option of the config
    assert len(metrics) == len(default_metrics) == 1
    (epoch,), (base,) = metrics, default_metrics
    assert set(epoch) >= set(scaled) | set(unchanged)
    for term in scaled:
        assert base[term] != 0
        assert epoch[term] == pytest.approx(base[term] * value / default, rel=1e-5), term
    for term in unchanged:
        assert epoch[term] == pytest.approx(base[term], rel=1e-5), term


def test_option_on_the_command_line_reaches_the_loss(store, capsys):
    """`train --option weight=200` builds the config make_config builds and logs CKD terms twice the default's."""
    default_config = _config("ckd")
    config = _config("ckd", {"weight": 200})
    args = ["train", "--preset", "smoke", "--method", "ckd", "--epochs", "1", "--milestones", "1",
            "--train-per-class", str(PER_CLASS), "--batch-size", str(10 * PER_CLASS), "--teacher-epochs", "1",
            "--precision", "fp32", "--device", "cpu", "--quiet", "--results-dir", str(store.root)]
    assert cli.main(args + ["--dry-run"]) == 0
    assert f"run id: {default_config.run_id}" in capsys.readouterr().out
    assert cli.main(args + ["--option", "weight=200", "--option", "anchor=teacher"]) == 0
    out = capsys.readouterr().out
    assert f"run id: {config.run_id}" in out and "finished" in out
    stored = json.loads((store.run_dir(config.run_id) / "config.json").read_text())
    assert stored["config"]["method_options"]["weight"] == 200.0
    run(default_config, store=store, quiet=True)
    (epoch,), (base,) = store.metrics(config.run_id), store.metrics(default_config.run_id)
    for term in ("train_ckd_intra", "train_ckd_inter"):
        assert epoch[term] == pytest.approx(2.0 * base[term], rel=1e-5), term
    assert epoch["train_ce"] == pytest.approx(base["train_ce"], rel=1e-5)
    # a non-weight option: the temperature changes the inter term (and not by a factor of the weight)
    assert cli.main(args + ["--option", "temperature=0.5"]) == 0
    hot = _config("ckd", {"temperature": 0.5})
    assert f"run id: {hot.run_id}" in capsys.readouterr().out
    (hot_epoch,) = store.metrics(hot.run_id)
    assert hot_epoch["train_ckd_inter"] != pytest.approx(base["train_ckd_inter"], rel=1e-3)
    assert hot_epoch["train_ckd_intra"] == pytest.approx(2.0 * base["train_ckd_intra"], rel=1e-5)  # -P_ii / τ
