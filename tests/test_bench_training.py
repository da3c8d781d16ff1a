"""The training-speed benchmark (benchmarks/bench_training.py): end to end on tiny settings, and a check that its
conventional reference loop optimises the same objective as our engine. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_training as bt  # noqa: E402
from reference_loop import InMemoryCIFAR100, cifar_train_transform, make_train_loader  # noqa: E402

from ckd_study.data import NUM_VIEWS, Batch, augment  # noqa: E402
from ckd_study.train import DeviceSetup  # noqa: E402

TINY = ["--dataset", "synthetic", "--teacher", "resnet14", "--student", "resnet8", "--batch-size", "8",
        "--steps", "2", "--warmup", "1", "--rounds", "1", "--workers", "0", "--threads", "1", "--device", "cpu"]


@pytest.mark.parametrize("in_process", [False, True], ids=["subprocess", "in_process"])
def test_benchmark_runs_end_to_end(tmp_path, capsys, in_process):
    out = tmp_path / "bench.json"
    report = bt.main(TINY + ["--json", str(out)] + (["--in-process"] if in_process else []))
    stored = json.loads(out.read_text())
    assert stored["variants"].keys() == set(bt.default_variants("cpu"))
    for key in ("settings", "flops_per_image", "variants", "ratios", "target", "notes", "device", "versions",
                "ckd", "recipe"):
        assert key in stored, key
    flops = stored["flops_per_image"]
    assert 0 < flops["teacher_forward"] and 0 < flops["student_forward"] < flops["student_forward_backward"]
    assert flops["useful_per_image"] == pytest.approx(flops["teacher_forward"] + flops["student_forward_backward"])
    for name, r in stored["variants"].items():
        for key in ("images_per_s", "seconds", "step_ms_mean", "useful_gflop_per_s", "executed_gflop_per_s",
                    "peak_rss_mb", "seconds_per_epoch_50k", "projected_240_epochs_h", "mean_train_loss"):
            assert r[key] > 0, (name, key)
        assert r["timed_steps"] == 2 and r["images_timed"] == 16 and r["steps_done"] == 3
        assert r["memory_isolated"] is (not in_process)
    live, cached = stored["variants"]["ours_live"], stored["variants"]["ours_cached"]
    assert live["executed_gflop_per_s"] == pytest.approx(live["useful_gflop_per_s"])
    cache = cached["cache"]
    assert cache["hit_rate_timed"] == 1.0 and cache["misses_timed"] == 0 and cache["hits_timed"] == 16
    assert cache["fill_views"] == 24 and cache["fill_s_per_view"] > 0
    assert cached["teacher_forwards_per_image"] == 0.0
    assert cached["executed_gflop_per_s"] < cached["useful_gflop_per_s"]
    assert set(stored["ratios"]) == {f"{v}/reference" for v in bt.default_variants("cpu") if v != "reference"}
    assert stored["target"]["thresholds"] == {"ours_live": 2.0, "ours_cached": 5.0}
    assert stored["target"]["met"] == all(stored["ratios"][f"{v}/reference"] >= t
                                          for v, t in stored["target"]["thresholds"].items())
    assert report["variants"].keys() == stored["variants"].keys()
    printed = capsys.readouterr().out
    assert "| reference | fp32 |" in printed and "| ours_cached |" in printed and "Targets on CPU" in printed


def test_precision_variants_run_at_their_precision(tmp_path, monkeypatch):
    from ckd_study.config import resolve_precision

    assert [bt.variant_precision(v) for v in ("ours_live", "ours_cached_fp32", "ours_live_bf16")] == \
        ["auto", "fp32", "bf16"]
    monkeypatch.setenv("CKD_CPU_BF16", "1")
    assert bt.default_variants("cpu")[-2:] == ["ours_live_fp32", "ours_cached_fp32"]
    monkeypatch.setenv("CKD_CPU_BF16", "0")
    assert bt.default_variants("cpu") == ["reference", "ours_live", "ours_cached"]
    stored = bt.main(TINY + ["--in-process", "--variants", "ours_live,ours_live_bf16", "--json", str(tmp_path / "b.json")])
    assert stored["variants"]["ours_live"]["precision"] == resolve_precision("auto", "cpu") == "fp32"
    assert stored["variants"]["ours_live_bf16"]["precision"] == "bf16"
    assert "bfloat16" in stored["variants"]["ours_live_bf16"]["execution"]


def test_variants_flag_selects_variants(tmp_path):
    stored = bt.main(TINY + ["--in-process", "--variants", "ours_live", "--json", str(tmp_path / "b.json")])
    assert list(stored["variants"]) == ["ours_live"] and stored["ratios"] == {} and stored["target"] is None
    with pytest.raises(SystemExit):
        bt.parse_args(TINY + ["--variants", "nope"])


def test_rounds_alternate_and_report_the_median_round(tmp_path, capsys):
    i = TINY.index("--rounds")
    argv = TINY[:i] + TINY[i + 2:]
    stored = bt.main(argv + ["--in-process", "--rounds", "2", "--variants", "reference,ours_cached",
                             "--json", str(tmp_path / "b.json")])
    log = capsys.readouterr().err
    assert "round 1/2: reference, ours_cached" in log and "round 2/2: ours_cached, reference" in log
    for r in stored["variants"].values():
        assert [x["round"] for x in r["rounds"]] == [1, 2] and len(r["images_per_s_rounds"]) == 2
        assert r["images_per_s"] == min(r["images_per_s_rounds"])  # lower median of two
    ratios = stored["round_ratios"]["ours_cached/reference"]
    ref, cached = stored["variants"]["reference"], stored["variants"]["ours_cached"]
    assert ratios == pytest.approx([c / f for c, f in zip(cached["images_per_s_rounds"], ref["images_per_s_rounds"])])
    assert stored["settings"]["rounds"] == 2
    with pytest.raises(SystemExit):
        bt.parse_args(TINY + ["--rounds", "0"])


def test_median_round_picks_the_middle_record():
    recs = [{"round": i + 1, "images_per_s": v, "step_ms_mean": 1.0, "peak_rss_mb": 1.0, "tag": t}
            for i, (v, t) in enumerate([(30.0, "a"), (10.0, "b"), (20.0, "c")])]
    chosen = bt.median_round(recs)
    assert chosen["tag"] == "c" and chosen["images_per_s_rounds"] == [30.0, 10.0, 20.0]
    assert bt.median_round(recs[:2])["tag"] == "b"


class _OneBatch:
    """Stands in for the Trainer's BatchIterator: one given batch per epoch."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield self.batch


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmark sets torch's thread count in-process; later tests must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("cached", [False, True], ids=["live_teacher", "cached_teacher"])
def test_reference_loop_and_engine_compute_the_same_loss(cached, channels_last):
    """One augmented batch drawn by the conventional pipeline (torchvision's CIFAR100.__getitem__, PIL
    transforms, DataLoader) goes through the reference step and through Trainer.train_epoch from identical
    weights: same loss (1e-5 relative; the cache's float16 teacher outputs: 1e-3) and the same SGD update.
    In the reference's contiguous layout the weights agree to float32 precision (rtol 1e-5) and each tensor's
    update to 1e-4 relative (measured ≤ 7e-6); in channels_last (the engine's CPU default) the convolutions
    round differently: each update within 1e-3 relative (measured ≤ 6e-5), while a gradient 1 % off gives 1e-2."""
    from torchvision.datasets import CIFAR100

    torch.set_num_threads(1)
    B = 8
    subset = bt.benchmark_subset("synthetic", Path("."), B)
    data = bt.subset_dataset(subset)
    config = bt.engine_config({"teacher": "resnet14", "student": "resnet8", "batch_size": B, "compile": False},
                              data.name, precision="fp32")
    assert config.method == "ckd" and config.method_options["weight"] == 100.0

    # the conventional pipeline: torchvision's own __getitem__ (Image.fromarray + PIL transforms)
    dataset = InMemoryCIFAR100(data.x_train.permute(0, 2, 3, 1).numpy(), data.y_train.tolist(), data.classes,
                               cifar_train_transform(data.mean, data.std))
    assert type(dataset).__getitem__ is CIFAR100.__getitem__ and len(dataset) == B
    images, labels = next(iter(make_train_loader(dataset, B, 0, torch.device("cpu"), seed=3)))

    # recover each image's (sample, view): exactly one of the B x 162 on-device views matches it bit for bit
    n = len(data.x_train)
    cand_idx = torch.arange(n).repeat_interleave(NUM_VIEWS)
    cand_view = torch.arange(NUM_VIEWS).repeat(n)
    candidates = augment(data.x_train[cand_idx], cand_view, data.mean, data.std).flatten(1)
    idx, views = [], []
    for image in images:
        match = ((candidates - image.flatten()).abs().amax(1) == 0).nonzero().flatten()
        assert len(match) == 1
        idx.append(int(cand_idx[match])), views.append(int(cand_view[match]))
    idx, views = torch.tensor(idx), torch.tensor(views)
    assert torch.equal(labels, data.y_train[idx])
    batch = Batch(augment(data.x_train[idx], views, data.mean, data.std), data.y_train[idx], idx, views)
    assert torch.equal(batch.images, images)

    # identical initial weights on both sides
    ref_student, ref_teacher = bt.reference_models(config, data.num_classes)
    # float32 like the reference loop (auto would pick bf16 on a CPU with native bf16)
    setup = dataclasses.replace(DeviceSetup.for_device("cpu", "fp32"), channels_last=channels_last)
    trainer, cache = bt.build_engine(config, data, setup, cached=cached)
    for ours, ref in ((trainer.student, ref_student), (trainer.teacher_source.model if not cached
                                                       else trainer.teacher_source.live.model, ref_teacher)):
        for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), name

    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train_batches = _OneBatch(batch)
    record = trainer.train_epoch(1)
    distiller = bt.reference_distiller(config, ref_student, ref_teacher, "cpu")
    ref_loss = distiller.step(images, labels)
    assert record["train_loss"] == pytest.approx(ref_loss, rel=1e-3 if cached else 1e-5)
    if cached:
        assert cache.misses == B
    else:
        for (name, a), b in zip(trainer.student.state_dict().items(), ref_student.state_dict().values()):
            if not channels_last:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} after one SGD step")
            if a.is_floating_point() and "running" not in name:
                # the step itself: a 1 % error in a gradient is a 1e-2 relative error of the update
                ours, ref = a - before[name], b - before[name]
                error = float((ours - ref).norm() / ref.norm())
                assert error < (1e-3 if channels_last else 1e-4), (name, setup.compute_key, error)


def test_precision_benchmark_records_both_precisions(tmp_path):
    import bench_precision

    from ckd_study.config import cpu_has_native_bf16, resolve_precision

    report = bench_precision.main(["--models", "resnet8", "--teachers", "resnet8", "--steps", "1", "--batch-size",
                                   "4", "--threads", "1", "--json", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == report
    assert [(r["model"], r["kind"]) for r in report["rows"]] == [("resnet8", "train step"),
                                                                 ("resnet8", "teacher forward")]
    for row in report["rows"]:
        assert row["fp32"] > 0 and row["bf16"] > 0
        assert row["bf16_over_fp32"] == pytest.approx(row["bf16"] / row["fp32"])
    assert report["auto_resolves_to"] == resolve_precision("auto", "cpu")
    assert report["cpu_native_bf16"] == cpu_has_native_bf16()


def test_cache_integrity_benchmark_measures_checksums(tmp_path):
    import bench_cache_integrity

    report = bench_cache_integrity.main(["--entries", "70000", "--logits", "10", "--pooled", "4",
                                         "--json", str(tmp_path / "c.json")])
    assert report["blocks"] == 2 and report["checksum_s"] > 0 and report["full_table_entries"] == 50_000 * 162
    assert report["full_table_checksum_s"] == pytest.approx(report["checksum_s"] * 50_000 * 162 / 70_000)
