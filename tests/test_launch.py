"""The study plan through executors (ckd_study/launch.py): local worker processes, and a real single-node SLURM
(.ci/start-slurm starts one in CI; the SLURM tests skip with the reason where it is not running)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import torch

from ckd_study import runs
from ckd_study.config import make_config
from ckd_study.launch import (LaunchError, SlurmOptions, TrainTask, launch_local, launch_plan, launch_slurm,
                              launch_status, slurm_available, squeue_jobs, train_task, wait_for, write_state)
from ckd_study.runs import RunStore
from ckd_study.study import plan

PRESET = "smoke"


def test_plan_is_every_distinct_run_of_the_study_teachers_first():
    configs = launch_plan(PRESET)
    ids = [c.run_id for c in configs]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(plan(PRESET, store="/nonexistent-store")["run_id"])
    for position, config in enumerate(configs):
        if config.teacher is not None:
            assert ids.index(config.teacher.run_id) < position, f"{config.run_id} comes before its teacher"


@pytest.fixture(scope="module")
def local_launch(tmp_path_factory):
    """The smoke plan through the local executor with 2 workers, one thread each (shared by the tests below)."""
    store = RunStore(tmp_path_factory.mktemp("launch_local"))
    configs = launch_plan(PRESET)
    outcome = launch_local(configs, store, PRESET, workers=2, threads=1, log=lambda line: None)
    return store, configs, outcome


def test_local_executor_trains_every_run_once(local_launch):
    store, configs, outcome = local_launch
    assert outcome == {c.run_id: "trained" for c in configs}
    for config in configs:
        assert store.status(config.run_id) == "finished"
        assert len(store.attempts(config.run_id)) == 1, f"{config.run_id} was started more than once"
    workers = {read["where"].split(",")[0] for read in
               (json.loads((store.root / "launch" / PRESET / "runs" / f"{c.run_id}.json").read_text())
                for c in configs)}
    assert len(workers) == 2, f"expected two worker processes, saw {workers}"
    assert {r["state"] for r in launch_status(PRESET, store, configs)} == {"finished"}


def test_local_relaunch_is_idempotent(local_launch):
    store, configs, _ = local_launch
    again = launch_local(configs, store, PRESET, workers=2, threads=1, log=lambda line: None)
    assert set(again.values()) == {"finished before"}
    assert all(len(store.attempts(c.run_id)) == 1 for c in configs)


def test_local_results_equal_a_sequential_run(local_launch, tmp_path):
    """Runs trained in the pool's worker processes end with the weights of the same runs trained one after
    another in this process (same thread count): the executor changes where, never what."""
    store, configs, _ = local_launch
    by_method = {}
    for config in configs:
        by_method.setdefault(config.method, config)
    chosen = [by_method[m] for m in ("ce", "kd", "crd", "dcd", "ckd")]
    sequential = RunStore(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for config in chosen:
            runs.run(config, store=sequential, quiet=True)
    finally:
        torch.set_num_threads(threads)
    for config in chosen:
        assert sequential.summary(config.run_id)["final_sha256"] == store.summary(config.run_id)["final_sha256"], \
            config.run_id


def test_local_executor_skips_the_students_of_a_failed_teacher(tmp_path):
    store = RunStore(tmp_path)
    # The data root holds no CIFAR-10: the teacher fails, its student is never started.
    teacher = make_config(PRESET, method="ce", student="resnet14", epochs=1, dataset="cifar10")
    student = make_config(PRESET, method="kd", teacher=teacher, epochs=1, dataset="cifar10")
    outcome = launch_local([teacher, student], store, PRESET, workers=1, threads=1,
                           data_root=tmp_path / "no-data", log=lambda line: None)
    assert outcome[teacher.run_id].startswith("failed: ") and "CIFAR-10 not found" in outcome[teacher.run_id]
    assert outcome[student.run_id] == f"skipped: its teacher {teacher.run_id} failed"
    rows = {r["run_id"]: r for r in launch_status(PRESET, store, [teacher, student])}
    assert rows[teacher.run_id]["state"] == "failed"
    assert "CIFAR-10 not found" in rows[teacher.run_id]["detail"] and "\n" not in rows[teacher.run_id]["detail"]
    assert rows[student.run_id]["state"] == "failed" and "its teacher" in rows[student.run_id]["detail"]
    assert not store.run_dir(student.run_id).exists()


def test_status_tells_queued_interrupted_and_not_started(tmp_path):
    store = RunStore(tmp_path)
    a, b, c = (make_config(PRESET, method="ce", student="resnet8", seed=s) for s in range(3))
    write_state(store, PRESET, a.run_id, state="queued", executor="local", job_id=None)  # its launcher died
    write_state(store, PRESET, b.run_id, state="failed", error="RuntimeError: out of memory")
    rows = {r["run_id"]: r for r in launch_status(PRESET, store, [a, b, c])}
    assert rows[a.run_id]["state"] == "interrupted" and "next launch" in rows[a.run_id]["detail"]
    assert (rows[b.run_id]["state"], rows[b.run_id]["detail"]) == ("failed", "RuntimeError: out of memory")
    assert rows[c.run_id]["state"] == "not started"


def test_a_worker_that_cannot_see_the_store_says_so(tmp_path):
    config = make_config(PRESET, method="ce", student="resnet8")
    (tmp_path / "launch" / PRESET).mkdir(parents=True)
    (tmp_path / "launch" / PRESET / "store-token").write_text("the launcher's token")
    task = TrainTask(config.to_dict(), str(tmp_path), PRESET, "another token")
    with pytest.raises(LaunchError, match="cannot see the results store.*shared by every node"):
        train_task(task)
    with pytest.raises(LaunchError, match="store-token is missing"):
        train_task(TrainTask(config.to_dict(), str(tmp_path / "elsewhere"), PRESET, "another token"))


def test_slurm_options_from_file_and_their_errors(tmp_path):
    path = tmp_path / "slurm.toml"
    path.write_text('[slurm]\npartition = "gpu"\naccount = "lab"\ngpus_per_job = 1\ntime_min = 600\n'
                    'extra = { qos = "high" }\nsetup = ["module load cuda"]\n')
    options = SlurmOptions.from_file(path, partition="a100", max_parallel=None)
    assert (options.partition, options.account, options.gpus_per_job, options.time_min, options.max_parallel) == \
        ("a100", "lab", 1, 600, 64)
    assert options.extra == {"qos": "high"} and options.setup == ["module load cuda"]
    path.write_text('partition = "gpu"\ngpu = 1\n')
    with pytest.raises(LaunchError, match=r"unknown key\(s\) \['gpu'\]"):
        SlurmOptions.from_file(path)
    with pytest.raises(LaunchError, match="does not exist"):
        SlurmOptions.from_file(tmp_path / "missing.toml")
    with pytest.raises(LaunchError, match="time_min must be a positive integer"):
        SlurmOptions(time_min=0)


def test_a_lock_on_another_host_is_live_while_its_heartbeat_is_fresh(tmp_path, monkeypatch):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-other-node", "started": "1"}))
    assert runs._lock_owner(lock) is not None
    stale = time.time() - runs.lock_stale_after_s() - 5
    os.utime(lock, (stale, stale))
    assert runs._lock_owner(lock) is None  # a node that died, or a killed job elsewhere
    monkeypatch.setenv("CKD_LOCK_STALE_S", "5")
    with pytest.raises(runs.RunError, match="CKD_LOCK_STALE_S must exceed the lock heartbeat"):
        runs.lock_stale_after_s()


def test_run_lock_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "LOCK_HEARTBEAT_S", 0.05)
    with runs.run_lock(tmp_path):
        lock = tmp_path / "run.lock"
        old = time.time() - 1000
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 10
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------------------
# A real single-node SLURM (started by .ci/start-slurm)
# ---------------------------------------------------------------------------------------------------------
SLURM_PROBLEM = slurm_available()
needs_slurm = pytest.mark.skipif(SLURM_PROBLEM is not None,
                                 reason=f"no SLURM here ({SLURM_PROBLEM}); `sudo .ci/start-slurm` starts a "
                                        f"single-node one")
SLURM_OPTIONS = dict(partition=None, time_min=20, cpus_per_job=1, max_parallel=2)


def _jobs(store: RunStore, configs) -> dict[str, str]:
    out = {}
    for config in configs:
        path = store.root / "launch" / PRESET / "runs" / f"{config.run_id}.json"
        if path.exists():
            out[config.run_id] = json.loads(path.read_text()).get("job_id")
    return out


@needs_slurm
@pytest.mark.timeout(900)
def test_slurm_executor_runs_the_smoke_study_and_a_cancelled_job_is_relaunched(tmp_path):
    store = RunStore(tmp_path)
    configs = launch_plan(PRESET)
    teacher = next(c for c in configs if c.teacher is None and any(
        s.teacher is not None and s.teacher.run_id == c.run_id for s in configs))
    students = [c for c in configs if c.teacher is not None]
    # Hold every job until we release them, so the cancelled one is certainly not finished.
    first = launch_slurm(configs, store, PRESET, SlurmOptions(**SLURM_OPTIONS, extra={"hold": True}),
                         log=lambda line: None)
    jobs = _jobs(store, configs)
    assert set(jobs) == {c.run_id for c in configs}
    assert first[students[0].run_id].endswith(f"(after {jobs[teacher.run_id]})")  # afterok on the teacher job
    # Launching again while the jobs are queued submits nothing twice.
    again = launch_slurm(configs, store, PRESET, SlurmOptions(**SLURM_OPTIONS), log=lambda line: None)
    assert all(o.startswith("already queued as slurm job") for o in again.values()), again
    assert _jobs(store, configs) == jobs
    victim = students[-1]
    subprocess.run(["scancel", jobs[victim.run_id]], check=True)
    subprocess.run(["scontrol", "release", ",".join(sorted({j.split("_")[0] for j in jobs.values()}))],
                   check=True, capture_output=True)
    rows = wait_for(configs, store, PRESET, timeout_s=600, poll_s=2, until_idle=True)
    states = {r["run_id"]: r["state"] for r in rows}
    assert states[victim.run_id] in ("interrupted", "not started"), states[victim.run_id]
    assert all(s == "finished" for r, s in states.items() if r != victim.run_id), states
    # Re-launch: only the cancelled run is submitted; it trains, nothing else starts again.
    third = launch_slurm(configs, store, PRESET, SlurmOptions(**SLURM_OPTIONS), log=lambda line: None)
    assert [r for r, o in third.items() if o.startswith("submitted")] == [victim.run_id]
    rows = wait_for(configs, store, PRESET, timeout_s=300, poll_s=2)
    assert {r["state"] for r in rows} == {"finished"}, rows
    for config in configs:
        assert len(store.attempts(config.run_id)) == 1, config.run_id


@needs_slurm
@pytest.mark.timeout(600)
def test_a_requeued_slurm_job_resumes_its_run(tmp_path):
    """submitit's checkpoint hook (the signal SLURM sends before a time limit or a preemption) requeues the job,
    and the requeued job resumes the run from its last saved epoch instead of starting it over."""
    store = RunStore(tmp_path)
    config = make_config(PRESET, method="ce", student="resnet8", epochs=16, milestones=(12,))
    launch_slurm([config], store, PRESET, SlurmOptions(**SLURM_OPTIONS), log=lambda line: None)
    job = _jobs(store, [config])[config.run_id]
    metrics = store.run_dir(config.run_id) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # SLURM delays a requeued job (BeginTime, about two minutes); a test need not wait for that.
    deadline = time.monotonic() + 120
    while squeue_jobs([job]).get(job, ("", ""))[1] != "BeginTime" and store.attempts(config.run_id)[1:] == []:
        assert time.monotonic() < deadline, f"job {job} was not requeued: {squeue_jobs([job])}"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    rows = wait_for([config], store, PRESET, timeout_s=300, poll_s=1)
    assert rows[0]["state"] == "finished", rows
    attempts = store.attempts(config.run_id)
    assert len(attempts) == 2, attempts
    assert attempts[0]["start_epoch"] == 0 and 2 <= attempts[1]["start_epoch"] < config.epochs
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, config.epochs + 1))
