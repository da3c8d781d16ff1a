"""Injected faults end in a recovery or a one-line error naming what to do, never a silent wrong number or a
stuck run (smoke preset; a full disk is simulated with OSError(ENOSPC) at the write)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from ckd_study import cli, files
from ckd_study.config import make_config, teacher_config
from ckd_study.data import load_dataset
from ckd_study.runs import RunError, RunInProgressError, RunStore, load_results, process_start_time, run, run_lock
from ckd_study.teacher_cache import CHECK_BLOCK, cache_path
from ckd_study.train import DeviceSetup

SHORT = dict(epochs=2, milestones=(2,), deterministic=True)


def _compute_key(config) -> str:
    """The teacher-cache key of a CPU run of ``config`` (precision and memory format)."""
    return DeviceSetup.for_device("cpu", config.precision).compute_key


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory) -> RunStore:
    store = RunStore(tmp_path_factory.mktemp("teacher"))
    run(teacher_config("smoke"), store=store, quiet=True)
    return store


def _copy_teacher(teacher_store: RunStore, root: Path) -> RunStore:
    store = RunStore(root)
    tid = teacher_config("smoke").run_id
    shutil.copytree(teacher_store.run_dir(tid), store.run_dir(tid))
    return store


def test_tampered_teacher_cache_is_detected_dropped_and_rewritten(tmp_path, teacher_store):
    config = make_config("smoke", method="kd", **SHORT)
    clean = _copy_teacher(teacher_store, tmp_path / "clean")
    reference = run(config, store=clean, quiet=True)
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    path = cache_path(clean.root, reference["teacher_sha256"], data, _compute_key(config))

    bad = _copy_teacher(teacher_store, tmp_path / "bad")
    bad_path = cache_path(bad.root, reference["teacher_sha256"], data, _compute_key(config))
    payload = torch.load(path, weights_only=True)
    payload["values"]["logits"][:20, :10] += 1.0  # 200 float16 logits overwritten; the file still loads
    bad_path.parent.mkdir(parents=True)
    torch.save(payload, bad_path)
    assert len(payload["keys"]) <= CHECK_BLOCK  # one block: all of it is dropped and recomputed
    with pytest.warns(UserWarning, match="failed their checksum"):
        second = run(config, store=bad, quiet=True)
    assert second["teacher_cache_misses"] > 0, "the dropped entries were recomputed, not served"
    assert second["final_sha256"] == reference["final_sha256"], "no wrong number reached the student"
    rewritten = torch.load(bad_path, weights_only=True)
    assert torch.equal(rewritten["values"]["logits"], torch.load(path, weights_only=True)["values"]["logits"])


def test_a_finished_run_binds_its_config(tmp_path, teacher_store):
    store = _copy_teacher(teacher_store, tmp_path / "r")
    config = make_config("smoke", method="kd", **SHORT)
    run(config, store=store, quiet=True)
    path = store.run_dir(config.run_id) / "config.json"
    stored = json.loads(path.read_text())
    stored["config"]["lr"] = 0.5
    path.write_text(json.dumps(stored))
    for read in (lambda: store.summary(config.run_id), lambda: run(config, store=store, quiet=True),
                 lambda: load_results(store)):
        with pytest.raises(RunError, match="does not hold the config .* was trained with .* changed"):
            read()


def _hold_lock(root: str, log: str, barrier) -> None:
    barrier.wait()
    try:
        with run_lock(Path(root)):
            with open(log, "a") as fh:
                fh.write(f"in {time.monotonic()}\n")
            time.sleep(0.05)
            with open(log, "a") as fh:
                fh.write(f"out {time.monotonic()}\n")
    except RunInProgressError:
        pass


def test_simultaneous_starts_never_share_the_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    for _ in range(3):
        barrier = ctx.Barrier(15)
        procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path / "run"), str(log), barrier)) for _ in range(15)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events and events == ["in", "out"] * (len(events) // 2), "two processes held the lock at once"


def test_lock_owner_identity_pid_reuse_foreign_host_and_wait_timeout(tmp_path):
    store = RunStore(tmp_path)
    run_dir = store.run_dir("run")
    run_dir.mkdir(parents=True)
    lock = run_dir / "run.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": "1", "since_utc": "x"}
    lock.write_text(json.dumps(me))  # our pid, another process's start time: a reused pid
    with run_lock(run_dir):
        assert json.loads(lock.read_text())["started"] == process_start_time(os.getpid())
    lock.write_text(json.dumps({**me, "host": "elsewhere", "pid": 1}))
    assert store.status("run") == "locked elsewhere"
    started = time.monotonic()
    with pytest.raises(RunInProgressError, match="gave up after waiting 0.3 s .* held by process 1 on elsewhere"):
        with run_lock(run_dir, wait=True, poll_s=0.05, timeout_s=0.3):
            pass
    assert time.monotonic() - started < 5


def test_full_disk_leaves_no_temp_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.json"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(files.FileWriteError, match=f"cannot write {target}: No space left on device; free some"):
        files.atomic_write_json(target, {"a": 1})
    assert list(target.parent.iterdir()) == []


def test_full_disk_mid_run_keeps_metrics_behind_the_checkpoint_and_resumes(tmp_path, teacher_store, monkeypatch):
    store = _copy_teacher(teacher_store, tmp_path / "r")
    config = make_config("smoke", method="kd", **SHORT)
    reference = run(config, store=_copy_teacher(teacher_store, tmp_path / "ref"), quiet=True)
    real = files.atomic_write_bytes
    calls = {"latest": 0}

    def flaky(path, data):
        if Path(path).name == "latest.pt":
            calls["latest"] += 1
            if calls["latest"] == 2:  # the checkpoint of epoch 2
                raise files.FileWriteError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", flaky)
    import ckd_study.runs as runs_module

    monkeypatch.setattr(runs_module, "atomic_write_bytes", flaky)
    with pytest.raises(OSError, match="No space left"):
        run(config, store=store, quiet=True)
    assert len(store.metrics(config.run_id)) == 1, "metrics never run ahead of the checkpoint"
    monkeypatch.undo()
    resumed = run(config, store=store, quiet=True)
    assert resumed["final_sha256"] == reference["final_sha256"]
    assert not list(store.run_dir(config.run_id).rglob("*.tmp"))


def test_an_unwritable_cache_warns_and_the_run_still_finishes(tmp_path, teacher_store, monkeypatch):
    from ckd_study import teacher_cache

    store = _copy_teacher(teacher_store, tmp_path / "r")

    def read_only(self):
        raise files.FileWriteError(errno.EROFS, "cannot write cache: Read-only file system")

    monkeypatch.setattr(teacher_cache.CachedTeacher, "save", read_only)
    with pytest.warns(UserWarning, match="teacher cache was not saved"):
        summary = run(make_config("smoke", method="kd", **SHORT), store=store, quiet=True)
    assert summary["status"] == "finished"


def test_corrupt_teacher_is_rebuilt_by_retrain(tmp_path, teacher_store, capsys):
    store = _copy_teacher(teacher_store, tmp_path / "r")
    teacher = teacher_config("smoke")
    final = store.run_dir(teacher.run_id) / "checkpoints" / "final.pt"
    final.write_bytes(final.read_bytes()[:-100] + b"x" * 100)
    config = make_config("smoke", method="kd", **SHORT)
    with pytest.raises(RunError, match="--retrain"):
        run(config, store=store, quiet=True)
    rebuilt = run(teacher, store=store, quiet=True, retrain=True)
    assert rebuilt["final_sha256"] == store.summary(teacher.run_id)["final_sha256"]
    aside = [p for p in store.run_dir(teacher.run_id).parent.iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and (aside[0] / "summary.json").exists(), "the old folder is kept aside"
    assert run(config, store=store, quiet=True)["status"] == "finished"


def test_every_attempt_is_recorded(tmp_path, teacher_store):
    store = _copy_teacher(teacher_store, tmp_path / "r")
    config = make_config("smoke", method="kd", **SHORT)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(trainer, epoch, step):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        run(config, store=store, quiet=True, step_hook=stop_in_epoch_2)
    run_dir = store.run_dir(config.run_id)
    first = json.loads((run_dir / "environment.json").read_text())
    (run_dir / "environment.json").unlink()
    with pytest.warns(UserWarning, match="environment.json was missing"):
        summary = run(config, store=store, quiet=True)
    attempts = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == summary["attempts"] == 2
    assert attempts[0] == first == json.loads((run_dir / "environment.json").read_text())
    assert store.attempts(config.run_id) == attempts
    # a run stored before attempts.jsonl existed: its one record is environment.json
    (run_dir / "attempts.jsonl").unlink()
    assert store.attempts(config.run_id) == [first]
    assert store.attempts("no_such_run") == []


def test_cli_one_line_errors_for_store_faults(tmp_path, capsys, teacher_store):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert cli.main(["list", "--results-dir", str(not_a_dir)]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err

    from ckd_study.study import main as study_main

    store = _copy_teacher(teacher_store, tmp_path / "r")
    summary_path = store.run_dir(teacher_config("smoke").run_id) / "summary.json"
    summary_path.write_text(summary_path.read_text()[:40])
    assert study_main(["figures", "--preset", "smoke", "--results-dir", str(store.root)]) == 1
    err = capsys.readouterr().err
    assert "summary.json is corrupt" in err and "Traceback" not in err


def test_ctrl_c_names_the_epoch_and_a_half_written_metrics_line_is_repaired(tmp_path, teacher_store, capsys):
    store = _copy_teacher(teacher_store, tmp_path / "r")
    config = make_config("smoke", method="kd", **SHORT)

    def ctrl_c_in_epoch_2(trainer, epoch, step):
        if epoch == 2:
            raise KeyboardInterrupt

    code = cli.report_errors(lambda: run(config, store=store, quiet=True, step_hook=ctrl_c_in_epoch_2), debug=False)
    assert code == 130
    assert capsys.readouterr().err.strip() == (f"interrupted run {config.run_id} in epoch 2/2 (epochs saved: 1); "
                                               f"rerun the same command to resume")
    summary = run(config, store=store, quiet=True)
    assert summary["teacher_cache_file"].startswith("cache/teacher-")
    path = store.run_dir(config.run_id) / "metrics.jsonl"
    good = path.read_text()
    path.write_text(good + '{"epoch": 3, "train_lo')
    with pytest.warns(UserWarning, match="removed a half-written last line"):
        assert [m["epoch"] for m in store.metrics(config.run_id)] == [1, 2]
    assert path.read_text() == good  # repaired on disk: `show` works from now on
    path.write_text(good.replace('"epoch": 1', '"epoch": 1 oops', 1))
    with pytest.raises(RunError, match="line 1 is corrupt"):
        store.metrics(config.run_id)


def test_a_run_from_uncommitted_code_records_the_diff(tmp_path, monkeypatch):
    """The package's uncommitted changes (edited and new files) are hashed into the attempt record and kept
    beside it, so a number maps to exact code; a clean package records none."""
    import hashlib
    import subprocess

    from ckd_study import runs as runs_module
    from ckd_study.train import DeviceSetup

    repo = tmp_path / "repo"
    (repo / "ckd_study").mkdir(parents=True)
    (repo / "ckd_study" / "losses.py").write_text("TAU = 1.0\n")
    (repo / "notes.txt").write_text("not code\n")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "base")
    monkeypatch.setattr(runs_module, "REPO_ROOT", repo)
    setup = DeviceSetup.for_device("cpu")
    clean = runs_module.environment_record(setup)
    assert clean["code_diff_sha256"] is None and clean["code_diff"] is None
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert clean["git_commit"] == head and clean["git_dirty"] is False

    (repo / "ckd_study" / "losses.py").write_text("TAU = 2.0\n")
    (repo / "ckd_study" / "extra.py").write_text("NEW = 1\n")
    (repo / "notes.txt").write_text("edited, still not code\n")
    record = runs_module.environment_record(setup)
    diff = record["code_diff"]
    assert "-TAU = 1.0" in diff and "+TAU = 2.0" in diff and "+NEW = 1" in diff and "notes" not in diff
    assert record["code_diff_sha256"] == hashlib.sha256(diff.encode()).hexdigest()
    assert record["git_commit"] == head and record["git_dirty"] is True

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs_module._record_attempt(run_dir, record)
    runs_module._record_attempt(run_dir, record)
    stored = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert [a["code_diff_sha256"] for a in stored] == [record["code_diff_sha256"]] * 2
    assert all("code_diff" not in a for a in stored)
    files = list((run_dir / "code_diffs").iterdir())
    assert [f.name for f in files] == [record["code_diff_sha256"][:16] + ".diff"]
    assert files[0].read_text() == diff
