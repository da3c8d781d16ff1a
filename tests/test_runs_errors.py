"""The results store's refusals and recoveries (ckd_study/runs.py, teacher_cache.py), on the smoke preset.

Each test builds the situation a user meets (an edited config of an interrupted run, a checkpoint copied from
another run, a teacher retrained under a resumed student, a lock held by another process, a teacher of the
wrong class count, weights missing from a finished run, a teacher cache that no longer fits), and checks the
run refuses or recovers as documented, naming the problem and deleting nothing. Resume tests interrupt a run
in-process (a ``step_hook`` that raises mid-epoch) and compare the resumed run with an uninterrupted one
bit for bit. CPU, seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from ckd_study import train
from ckd_study.config import make_config
from ckd_study.models import create_model
from ckd_study.runs import RunError, RunInProgressError, RunStore, load_checkpoint, run, run_lock, sha256_file
from ckd_study.teacher_cache import TeacherOutputCache

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(train_per_class=8, precision="fp32", batch_size=40)  # two steps an epoch


class Interrupt(Exception):
    """Raised by a step hook to stop a run mid-epoch, as a crash would."""


def _student(method: str = "kd", **overrides):
    fields = {**SMALL, "epochs": 2, "milestones": (1,), **overrides}
    return make_config("smoke", method=method, teacher_overrides={"epochs": 1}, device="cpu", **fields)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def teacher_summary(store) -> dict:
    return run(_student().teacher, store=store, quiet=True)


def _local_store(tmp_path: Path, store: RunStore, teacher_summary: dict) -> RunStore:
    """A fresh store holding a copy of the shared teacher run (so a test may damage it)."""
    local = RunStore(tmp_path / "results")
    run_id = teacher_summary["run_id"]
    shutil.copytree(store.run_dir(run_id), local.run_dir(run_id), ignore=shutil.ignore_patterns("*.lock"))
    return local


def _interrupt_at(epoch: int, step: int):
    def hook(trainer, e, s):
        if (e, s) == (epoch, step):
            raise Interrupt(f"stopped at epoch {e}, step {s}")
    return hook


def _interrupted(config, local: RunStore, epoch: int = 2, step: int = 1) -> Path:
    with pytest.raises(Interrupt):
        run(config, store=local, quiet=True, step_hook=_interrupt_at(epoch, step))
    run_dir = local.run_dir(config.run_id)
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["state"]["epoch"] == epoch - 1
    assert not (run_dir / "summary.json").exists() and local.status(config.run_id) == "interrupted"
    return run_dir


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Refusals on resume
# ---------------------------------------------------------------------------------------------------------
def test_changed_config_of_an_interrupted_run_is_refused(tmp_path, store, teacher_summary):
    config = _student()
    local = _local_store(tmp_path, store, teacher_summary)
    run_dir = _interrupted(config, local)
    stored = json.loads((run_dir / "config.json").read_text())
    stored["config"]["lr"] = 0.2  # edited by hand after the interruption
    (run_dir / "config.json").write_text(json.dumps(stored, indent=2))
    before = _snapshot(run_dir)
    with pytest.raises(RunError, match="different config"):
        run(config, store=local, quiet=True)
    assert _snapshot(run_dir) == before, "a refused resume must change nothing"


def test_checkpoint_of_another_run_is_refused(tmp_path, store, teacher_summary):
    local = _local_store(tmp_path, store, teacher_summary)
    source = _student()
    source_dir = _interrupted(source, local)
    other = _student(seed=1)
    assert other.run_id != source.run_id
    other_dir = local.run_dir(other.run_id)
    (other_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(source_dir / "checkpoints" / "latest.pt", other_dir / "checkpoints" / "latest.pt")
    with pytest.raises(RunError, match=re.escape(f"belongs to run '{source.run_id}'")):
        run(other, store=local, quiet=True)
    assert (other_dir / "checkpoints" / "latest.pt").read_bytes() == \
        (source_dir / "checkpoints" / "latest.pt").read_bytes()


def test_resume_against_another_teacher_is_refused(tmp_path, store, teacher_summary):
    config = _student()
    local = _local_store(tmp_path, store, teacher_summary)
    run_dir = _interrupted(config, local)
    latest = run_dir / "checkpoints" / "latest.pt"
    ckpt = load_checkpoint(latest)
    assert ckpt["teacher_sha256"] == teacher_summary["final_sha256"]
    ckpt["teacher_sha256"] = "0" * 64  # the checkpoint was trained against another teacher checkpoint
    torch.save(ckpt, latest)
    saved = latest.read_bytes()
    with pytest.raises(RunError, match="different teacher"):
        run(config, store=local, quiet=True)
    assert latest.read_bytes() == saved


# ---------------------------------------------------------------------------------------------------------
# The teacher a student run loads
# ---------------------------------------------------------------------------------------------------------
def test_teacher_with_the_wrong_class_count_is_refused(tmp_path, store, teacher_summary):
    local = _local_store(tmp_path, store, teacher_summary)
    teacher_dir = local.run_dir(teacher_summary["run_id"])
    final = teacher_dir / "checkpoints" / "final.pt"
    ckpt = load_checkpoint(final)
    ckpt["num_classes"] = 7
    ckpt["model"] = create_model(ckpt["model_name"], 7).state_dict()
    torch.save(ckpt, final)
    summary = json.loads((teacher_dir / "summary.json").read_text())
    summary["final_sha256"] = sha256_file(final)  # a consistent, finished 7-class teacher
    (teacher_dir / "summary.json").write_text(json.dumps(summary))
    config = _student()
    with pytest.raises(RunError, match="predicts 7 classes"):
        run(config, store=local, quiet=True)
    assert not local.run_dir(config.run_id).exists(), "a failed start leaves no run folder"


def test_missing_weights_of_a_finished_run_give_a_clear_error(tmp_path, store, teacher_summary):
    local = _local_store(tmp_path, store, teacher_summary)
    (local.run_dir(teacher_summary["run_id"]) / "checkpoints" / "final.pt").unlink()
    config = _student()
    with pytest.raises(RunError, match=r"has finished but its weights .*final\.pt are missing.*import-teacher"):
        run(config, store=local, quiet=True)
    assert not local.run_dir(config.run_id).exists()
    # a finished student without its weights: the message says how to retrain it
    student = _student(method="ce", epochs=1, milestones=(1,))
    run(student, store=local, quiet=True)
    (local.run_dir(student.run_id) / "checkpoints" / "final.pt").unlink()
    with pytest.raises(RunError, match="are missing.*retrain"):
        local.load_model(student.run_id)


# ---------------------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from ckd_study.runs import run_lock
    run_dir, marks = Path(sys.argv[1]), Path(sys.argv[2])
    with run_lock(run_dir):
        (marks / "held").write_text("1")
        deadline = time.time() + 60
        while not (marks / "go").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)
        released = time.time()
    (marks / "released").write_text(json.dumps(released))
""")


def test_waiting_for_a_lock_held_by_a_live_process_then_training(tmp_path, capsys):
    """Another live process holds the run's lock: without ``wait`` the run is refused naming that process;
    with ``wait=True`` it waits (run_lock polls) and trains once the holder has released the lock."""
    local = RunStore(tmp_path / "results")
    config = make_config("smoke", method="ce", epochs=1, milestones=(1,), device="cpu", **SMALL)
    run_dir = local.run_dir(config.run_id)
    marks = tmp_path / "marks"
    marks.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), str(marks)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (marks / "held").exists():
            assert holder.poll() is None, holder.communicate()
            assert time.time() < deadline, "the lock holder never started"
            time.sleep(0.05)
        with pytest.raises(RunInProgressError, match=str(holder.pid)):
            run(config, store=local, quiet=True)
        with pytest.raises(RunInProgressError, match=str(holder.pid)):
            with run_lock(run_dir):
                pass  # pragma: no cover
        assert local.status(config.run_id) == "running"
        asked = time.time()
        (marks / "go").write_text("1")  # the holder keeps the lock one more second
        first_step: list[float] = []
        summary = run(config, store=local, quiet=True, wait=True,
                      step_hook=lambda tr, e, s: first_step.append(time.time()))
        assert summary["status"] == "finished" and local.status(config.run_id) == "finished"
        assert holder.wait(timeout=60) == 0, holder.communicate()
        released = json.loads((marks / "released").read_text())
        assert first_step[0] >= released and released - asked >= 0.9, (asked, released, first_step[0])
        assert f"waiting for run {config.run_id}" in capsys.readouterr().err
        assert not (run_dir / "run.lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


# ---------------------------------------------------------------------------------------------------------
# The teacher cache: a file that does not fit is rebuilt
# ---------------------------------------------------------------------------------------------------------
def test_teacher_cache_that_does_not_fit_warns_and_is_rebuilt(tmp_path):
    path = tmp_path / "cache.pt"
    old = TeacherOutputCache(4, {"logits": 3, "pooled": 2})
    keys = torch.tensor([0, 5, 17])
    old.put(keys, {"logits": torch.ones(3, 3), "pooled": torch.full((3, 2), 2.0)})
    old.save(path)
    # another training set size: the stored entries cannot be used
    new = TeacherOutputCache(5, {"logits": 3, "pooled": 2})
    with pytest.warns(UserWarning, match="does not fit"):
        assert new.merge_from(path) is False
    assert not bool(new.filled.any()), "nothing of the unfit file may be loaded"
    fresh = torch.tensor([1, 700])
    new.put(fresh, {"logits": torch.full((2, 3), 3.0), "pooled": torch.full((2, 2), 4.0)})
    with pytest.warns(UserWarning, match="does not fit"):
        new.save(path)  # replaces the unfit file with this cache's entries
    payload = torch.load(path, weights_only=True)
    assert payload["num_samples"] == 5 and sorted(payload["keys"].tolist()) == [1, 700]
    reread = TeacherOutputCache(5, {"logits": 3, "pooled": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # now it fits: no warning
        assert reread.merge_from(path) is True
    assert reread.filled.nonzero().squeeze(1).tolist() == [1, 700]
    assert torch.equal(reread.get(fresh)["logits"], torch.full((2, 3), 3.0))
    # other output widths do not fit either
    with pytest.warns(UserWarning, match="does not fit"):
        assert TeacherOutputCache(5, {"logits": 4, "pooled": 2}).merge_from(path) is False
    # and an unreadable file is rebuilt too
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert TeacherOutputCache(5, {"logits": 3, "pooled": 2}).merge_from(path) is False


# ---------------------------------------------------------------------------------------------------------
# eval_every > 1: which epochs are evaluated and which is best
# ---------------------------------------------------------------------------------------------------------
def test_best_epoch_with_eval_every(tmp_path, monkeypatch):
    scripted = iter([40.0, 60.0, 50.0])  # epochs 2, 4 and the last one, 5
    calls = []

    def fake_evaluate(model, data, setup, batch_size=500):
        top1 = next(scripted)
        calls.append(top1)
        return {"top1": top1, "top5": top1 + 30.0, "loss": 1.0}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    local = RunStore(tmp_path / "results")
    config = make_config("smoke", method="ce", epochs=5, milestones=(3,), eval_every=2, device="cpu",
                         precision="fp32", train_per_class=4, batch_size=20)
    summary = run(config, store=local, quiet=True)
    assert calls == [40.0, 60.0, 50.0]
    metrics = local.metrics(config.run_id)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m.get("test_top1") for m in metrics] == [None, 40.0, None, 60.0, 50.0]
    assert summary["best_epoch"] == 4 and summary["best_top1"] == 60.0 and summary["best_top5"] == 90.0
    assert summary["last_top1"] == 50.0 and summary["last_top5"] == 80.0


# ---------------------------------------------------------------------------------------------------------
# Resume equals uninterrupted: DCD (learnable θ, heads) under the cosine schedule
# ---------------------------------------------------------------------------------------------------------
def test_dcd_cosine_resume_equals_uninterrupted(tmp_path, store, teacher_summary):
    config = _student(method="dcd", epochs=2, milestones=(2,), schedule="cosine", deterministic=True)
    assert config.method_options["fixed_temperature"] is None  # θ is learned
    reference = run(config, store=store, quiet=True)
    local = _local_store(tmp_path, store, teacher_summary)
    run_dir = _interrupted(config, local, epoch=2, step=1)
    theta = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["method"]["log_inv_temperature"]
    assert float(theta) != 1.0, "θ moved during epoch 1: the checkpoint must carry it"
    resumed = run(config, store=local, quiet=True)
    for key in ("final_sha256", "last_top1", "last_top5", "best_top1", "best_epoch"):
        assert resumed[key] == reference[key], key
    ref_metrics, res_metrics = store.metrics(config.run_id), local.metrics(config.run_id)
    assert [m["lr"] for m in res_metrics] == [m["lr"] for m in ref_metrics]
    for term in ("train_loss", "train_dcd_contrastive", "train_dcd_consistency"):
        assert [m[term] for m in res_metrics] == [m[term] for m in ref_metrics], term
