"""The training engine and results store, end to end on the smoke preset (sklearn digits, CPU, seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckd_study.config import ConfigError, RunConfig, make_config, teacher_config
from ckd_study.methods import MethodError, available_methods
from ckd_study.runs import RunError, RunInProgressError, RunStore, load_checkpoint, load_results, run
from ckd_study.train import NonFiniteLossError, lr_at

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def teacher_summary(store) -> dict:
    return run(teacher_config("smoke"), store=store, quiet=True)


def test_teacher_run_writes_every_file(store, teacher_summary):
    run_dir = store.run_dir(teacher_summary["run_id"])
    for name in ("config.json", "metrics.jsonl", "summary.json", "environment.json",
                 "checkpoints/latest.pt", "checkpoints/final.pt"):
        assert (run_dir / name).exists(), name
    config = teacher_config("smoke")
    assert teacher_summary["run_id"] == config.run_id
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == config.epochs
    record = json.loads(lines[-1])
    for key in ("epoch", "lr", "train_ce", "train_loss", "test_top1", "test_top5", "images_per_s", "epoch_time_s"):
        assert key in record, key
    assert 0 <= teacher_summary["last_top1"] <= 100
    assert teacher_summary["best_top1"] >= teacher_summary["last_top1"]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["versions"]["torch"] == torch.__version__ and env["torch_threads"] >= 1
    assert not list(run_dir.glob("**/*.tmp")), "no temporary files left behind"


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "ce"] + ["ce"])
def test_every_method_trains_end_to_end(store, teacher_summary, method):
    config = make_config("smoke", method=method)
    summary = run(config, store=store, quiet=True)
    assert summary["status"] == "finished" and summary["method"] == method
    metrics = store.metrics(config.run_id)
    assert [m["epoch"] for m in metrics] == list(range(1, config.epochs + 1))
    if method != "ce":
        assert summary["teacher_run_id"] == teacher_summary["run_id"]
        assert summary["teacher_sha256"] == teacher_summary["final_sha256"]
    for m in metrics:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in m.items() if k.startswith("train_"))


def test_finished_run_is_not_trained_again(store, teacher_summary):
    config = make_config("smoke", method="kd")
    first = run(config, store=store, quiet=True)

    def fail(trainer, epoch, step):  # pragma: no cover - must not be called
        raise AssertionError("a finished run trained again")

    assert run(config, store=store, quiet=True, step_hook=fail) == first


def test_same_config_same_id_and_options_resolved():
    a = make_config("smoke", method="ckd")
    b = make_config("smoke", method="ckd", method_options={"temperature": 1.0})
    c = make_config("smoke", method="ckd", method_options={"temperature": 0.5})
    assert a.run_id == b.run_id != c.run_id
    assert a.method_options["anchor"] == "teacher" and a.method_options["weight"] == 100.0
    assert RunConfig.from_dict(json.loads(json.dumps(a.to_dict()))).run_id == a.run_id


def test_pair_defaults_apply_and_lr_recipe():
    cfg = make_config("paper", method="dkd", teacher="wrn_40_2", student="wrn_16_2")
    assert cfg.method_options["beta"] == 6.0
    cfg = make_config("paper", method="ckd", teacher="wrn_40_2", student="wrn_40_1")
    assert cfg.method_options["weight"] == 50.0 and cfg.method_options["temperature"] == 2.0
    assert make_config("paper", student="MobileNetV2").base_lr == 0.01
    paper = make_config("paper")
    assert [lr_at(paper, e) for e in (1, 150, 151, 181, 211)] == pytest.approx([0.05, 0.05, 0.005, 0.0005, 0.00005])
    cosine = paper.replace(schedule="cosine", epochs=480)
    assert lr_at(cosine, 1) == pytest.approx(0.05) and lr_at(cosine, 241) == pytest.approx(0.025)


@pytest.mark.parametrize("changes, field", [
    ({"student": "resnet9000"}, "student"), ({"method": "magic"}, "method"), ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"), ({"schedule": "linear"}, "schedule"), ({"dataset": "imagenet"}, "dataset"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises((ConfigError, MethodError), match=field if field != "method" else "magic"):
        make_config("smoke", **changes) if "method" not in changes else make_config("smoke", method="magic")


def test_bad_method_option_is_clear():
    with pytest.raises(MethodError, match="anchor"):
        make_config("smoke", method="ckd", method_options={"anchor": "sideways"})
    with pytest.raises(MethodError, match="temperature"):
        make_config("smoke", method="kd", method_options={"temperature": -1})
    with pytest.raises(MethodError, match="unknown option"):
        make_config("smoke", method="kd", method_options={"tempreature": 2})
    with pytest.raises(ConfigError, match="teacher"):
        RunConfig(dataset="digits", student="resnet8", method="kd")


def _kill_script(results: Path, kill_epoch: int, kill_step: int) -> str:
    return textwrap.dedent(f"""
        import os, signal
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's: reductions must split the same way
        from ckd_study.config import make_config
        from ckd_study.runs import RunStore, run
        config = make_config("smoke", method="crd", epochs=3, milestones=(2,), deterministic=True)
        def hook(trainer, epoch, step):
            if (epoch, step) == ({kill_epoch}, {kill_step}):
                os.kill(os.getpid(), signal.SIGKILL)
        run(config, store=RunStore({str(results)!r}), quiet=True, step_hook=hook)
    """)


def test_resume_after_kill_equals_uninterrupted(tmp_path, store, teacher_summary):
    # With the teacher cache (the default): the killed run's cache is never saved, so the resumed run recomputes
    # the views the reference had cached; canonical teacher calls make those values bit-identical.
    config = make_config("smoke", method="crd", epochs=3, milestones=(2,), deterministic=True)
    assert config.teacher_cache
    # The uninterrupted reference shares the teacher (same store); the killed run gets its own store with a
    # copy of the teacher, so both distil from byte-identical teacher weights.
    reference = run(config, store=store, quiet=True)
    killed_store = RunStore(tmp_path / "results")
    teacher_dir = store.run_dir(teacher_summary["run_id"])
    import shutil

    shutil.copytree(teacher_dir, killed_store.run_dir(teacher_summary["run_id"]))
    proc = subprocess.run([sys.executable, "-c", _kill_script(killed_store.root, 2, 3)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = killed_store.run_dir(config.run_id)
    assert not (run_dir / "summary.json").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["state"]["epoch"] == 1
    assert killed_store.status(config.run_id) == "interrupted"  # the dead process's lock is stale

    resumed = run(config, store=killed_store, quiet=True)
    for key in ("last_top1", "last_top5", "best_top1", "best_epoch", "final_sha256"):
        assert resumed[key] == reference[key], key
    ref_metrics = store.metrics(config.run_id)
    res_metrics = killed_store.metrics(config.run_id)
    assert [m["train_loss"] for m in res_metrics] == [m["train_loss"] for m in ref_metrics]


def test_corrupt_checkpoint_and_config_give_clear_errors(tmp_path, store, teacher_summary):
    config = make_config("smoke", method="kd", epochs=1, milestones=(1,))
    local = RunStore(tmp_path / "results")
    import shutil

    shutil.copytree(store.run_dir(teacher_summary["run_id"]), local.run_dir(teacher_summary["run_id"]))
    run_dir = local.run_dir(config.run_id)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RunError, match="latest.pt"):
        run(config, store=local, quiet=True)
    assert (run_dir / "checkpoints" / "latest.pt").read_bytes() == b"not a checkpoint at all"

    (run_dir / "checkpoints" / "latest.pt").unlink()
    (run_dir / "config.json").write_text("{ this is not json")
    with pytest.raises(RunError, match="config.json"):
        run(config, store=local, quiet=True)
    assert (run_dir / "config.json").read_text() == "{ this is not json"


def test_teacher_checkpoint_with_wrong_sha_is_refused(tmp_path, store, teacher_summary):
    local = RunStore(tmp_path / "results")
    import shutil

    teacher_dir = local.run_dir(teacher_summary["run_id"])
    shutil.copytree(store.run_dir(teacher_summary["run_id"]), teacher_dir)
    ckpt = torch.load(teacher_dir / "checkpoints" / "final.pt", weights_only=False)
    first = next(iter(ckpt["model"]))
    ckpt["model"][first] = ckpt["model"][first] + 1
    torch.save(ckpt, teacher_dir / "checkpoints" / "final.pt")
    with pytest.raises(RunError, match="sha256"):
        run(make_config("smoke", method="kd", epochs=1, milestones=(1,)), store=local, quiet=True)


def test_nan_loss_stops_with_epoch_step_and_term(tmp_path):
    local = RunStore(tmp_path / "results")
    config = make_config("smoke", method="ce", epochs=3, milestones=(2,))

    def poison(trainer, epoch, step):
        if (epoch, step) == (2, 2):
            for p in trainer.student.parameters():
                p.data.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"'ce'.*epoch 2, step 3"):
        run(config, store=local, quiet=True, step_hook=poison)
    latest = load_checkpoint(local.run_dir(config.run_id) / "checkpoints" / "latest.pt")
    assert latest["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in latest["student"].values() if v.is_floating_point())


def test_lock_refuses_a_second_live_process_and_takes_over_a_stale_one(tmp_path):
    local = RunStore(tmp_path / "results")
    config = make_config("smoke", method="ce", epochs=1, milestones=(1,))
    run_dir = local.run_dir(config.run_id)
    run_dir.mkdir(parents=True)
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / "run.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        assert local.status(config.run_id) == "running"
        with pytest.raises(RunInProgressError, match=str(sleeper.pid)):
            run(config, store=local, quiet=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run(config, store=local, quiet=True)["status"] == "finished"  # the dead owner's lock is stale
    assert not (run_dir / "run.lock").exists()


def test_load_results(store, teacher_summary):
    run(make_config("smoke", method="ckd"), store=store, quiet=True)
    frame, epochs = load_results(store, epochs=True)
    assert {"run_id", "method", "student", "teacher", "last_top1", "best_top1", "seed"} <= set(frame.columns)
    assert set(frame["method"]) >= {"ce", "ckd"}
    assert len(epochs) >= len(frame)
    assert "option.temperature" in frame.columns


def _cli(*args: str, results: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, CKD_RESULTS_DIR=str(results))
    proc = subprocess.run([sys.executable, "-m", "ckd_study", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_train_list_show_models_methods(tmp_path):
    results = tmp_path / "results"
    out = _cli("train", "--preset", "smoke", "--method", "ckd", "--option", "temperature=0.5", "--quiet",
               results=results).stdout
    assert "finished" in out
    run_id = out.split("run id: ")[1].split()[0]
    assert make_config("smoke", method="ckd", method_options={"temperature": 0.5}).run_id == run_id
    listing = _cli("list", results=results).stdout
    assert run_id in listing and "finished" in listing
    assert '"temperature": 0.5' in _cli("show", run_id, results=results).stdout
    assert "resnet32x4" in _cli("models", results=results).stdout
    assert "anchor = 'teacher'" in _cli("methods", results=results).stdout
    cached = _cli("cache-teacher", "--preset", "smoke", "--train-per-class", "6", "--quiet", results=results).stdout
    assert "100.0% of 9,720 image-views filled (9,720 computed now" in cached
    assert Path(cached.split("stored in ")[1].strip()).is_file()
    again = _cli("train", "--config", str(results / "runs" / run_id / "config.json"), "--quiet", results=results)
    assert run_id in again.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "nope"], "invalid choice: 'nope'"),
    (["train", "--preset", "smoke", "--method", "ckd", "--option", "anchor=sideways"], "anchor"),
    (["train", "--preset", "smoke", "--student", "resnet9000"], "resnet9000"),
    (["train", "--preset", "smoke", "--epochs", "0"], "epochs"),
    (["show", "no-such-run"], "no run"),
    (["cache-teacher", "--preset", "smoke", "--method", "ce"], "trains without a teacher"),
])
def test_cli_errors_name_the_problem(tmp_path, args, message):
    proc = _cli(*args, results=tmp_path / "results", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.realdata
def test_quick_preset_cli_on_real_cifar100(tmp_path, cifar_root):
    """The quick preset's models on real CIFAR-100, shrunk to one short epoch for the test's sake."""
    proc = _cli("train", "--preset", "quick", "--method", "ckd", "--train-per-class", "4", "--test-per-class", "2",
                "--epochs", "1", "--milestones", "1", "--batch-size", "50", "--teacher-epochs", "1", "--quiet", "--data-dir", str(cifar_root),
                results=tmp_path / "results")
    assert "finished" in proc.stdout
    summary = load_results(tmp_path / "results")
    assert set(summary["dataset"]) == {"cifar100"} and set(summary["method"]) == {"ce", "ckd"}
    assert sorted(summary["epochs"]) == [1, 1]
