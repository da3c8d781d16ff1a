"""Train a preset's whole study plan with an executor: local worker processes, or SLURM jobs via submitit.

The plan is every distinct run of every notebook of a preset, teachers included (what ``study plan`` lists),
teachers first. Two executors run it:

- ``local`` (the default): N worker processes on this machine; with GPUs one worker per GPU
  (``CUDA_VISIBLE_DEVICES`` per worker), on CPU a given number of workers sharing the cores;
- ``slurm``: one job per run through ``submitit`` (array jobs; partition, time limit, GPUs, parallelism and extra
  sbatch options from flags or a TOML file). The students of a teacher that still has to train depend on its job
  (``afterok``), so no teacher trains twice; a job that times out or is preempted is requeued by submitit's
  checkpointing hook and resumes from the run's last saved epoch.

Launching again is idempotent: finished runs are skipped, interrupted ones resume, a run that a live process holds
(its lock) or that a queued SLURM job will train is not submitted again. Every worker needs the results store; with
SLURM it must be on a filesystem every node mounts at the same path (the launcher writes a token there that each
job checks before it trains). What each run's last launch did is kept in ``<results>/launch/<preset>/``
(``runs/<run id>.json``: state, where, job id, last error line; ``slurm/``: submitit's scripts and logs).

CLI: ``python -m ckd_study launch --preset paper --executor slurm --partition gpu --max-parallel 64``;
``--status`` prints each run's state. Afterwards ``make figures PRESET=...`` builds tables and figures from the
store as usual.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .config import RunConfig
from .files import atomic_write_json
from .runs import RunStore, _lock_owner, read_json, utc_now

EXECUTORS = ("local", "slurm")


class LaunchError(RuntimeError):
    """A launch cannot go ahead as asked (no SLURM, a store the workers cannot see, a bad option); the message
    says what to do."""


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------
def launch_plan(preset: str, spec: Any = None) -> list[RunConfig]:
    """Every distinct run of the preset's notebooks, teachers (and their teachers) first, each once."""
    from .study.grids import EXPERIMENTS, _unique_configs, experiment_configs

    ordered: dict[str, RunConfig] = {}

    def add(config: RunConfig) -> None:
        if config.teacher is not None:
            add(config.teacher)
        ordered.setdefault(config.run_id, config)

    for experiment in EXPERIMENTS:
        for config in _unique_configs(experiment_configs(preset, experiment, spec)):
            add(config)
    configs = list(ordered.values())
    teacher_ids = _teacher_ids(configs)
    return [c for c in configs if c.run_id in teacher_ids] + [c for c in configs if c.run_id not in teacher_ids]


def _teacher_ids(configs: Sequence[RunConfig]) -> set[str]:
    """The run ids that some run of ``configs`` distils from."""
    return {c.teacher.run_id for c in configs if c.teacher is not None}


def launch_dir(store: RunStore, preset: str) -> Path:
    return store.root / "launch" / preset


def _state_path(store: RunStore, preset: str, run_id: str) -> Path:
    return launch_dir(store, preset) / "runs" / f"{run_id}.json"


def read_state(store: RunStore, preset: str, run_id: str) -> dict:
    path = _state_path(store, preset, run_id)
    try:
        return read_json(path) if path.exists() else {}
    except Exception:  # a state record is advisory: an unreadable one is as good as none
        return {}


def write_state(store: RunStore, preset: str, run_id: str, **fields: Any) -> None:
    """Merge ``fields`` into the run's launch record (atomic write; the last writer wins, which is the newest)."""
    record = read_state(store, preset, run_id)
    record.update(fields, run_id=run_id, updated=utc_now())
    atomic_write_json(_state_path(store, preset, run_id), record)


def _store_token(store: RunStore, preset: str) -> str:
    """A random token in the store, created once: a worker that reads the same token sees the same store (not
    an empty folder at the same path on a node that does not mount the shared filesystem)."""
    path = launch_dir(store, preset) / "store-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".store-token.{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(16))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent launcher reads the winner's token
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


# ---------------------------------------------------------------------------------------------------------
# One run, in a worker (a local process or a SLURM job)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTask:
    """What a worker needs to train one run: plain data, picklable for a process pool and for submitit."""

    config: Mapping[str, Any]
    results_dir: str
    preset: str
    store_token: str
    data_root: str | None = None
    device: str | None = None
    threads: int | None = None
    executor: str = "local"


def _where() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return f"{socket.gethostname()} pid {os.getpid()}" + (f", slurm job {job}" if job else "")


def _last_error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def train_task(task: TrainTask) -> dict:
    """Train one planned run (resuming it if interrupted; a finished run returns its summary at once) and keep
    its launch record up to date. Waits for a run another live process holds rather than training it twice."""
    from .runs import run

    root = Path(task.results_dir)
    token_path = root / "launch" / task.preset / "store-token"
    try:
        token = token_path.read_text().strip()
    except OSError:
        token = None
    if token != task.store_token:
        raise LaunchError(
            f"this worker ({socket.gethostname()}) cannot see the results store the launcher used: {token_path} "
            f"is {'missing' if token is None else 'a different token'}. The store must be on a filesystem shared "
            f"by every node at the same path; pass --results-dir (or set CKD_RESULTS_DIR) to such a folder")
    if task.threads:
        import torch

        torch.set_num_threads(task.threads)
    store = RunStore(root)
    config = RunConfig.from_dict(task.config) if not isinstance(task.config, RunConfig) else task.config
    write_state(store, task.preset, config.run_id, state="running", where=_where(), executor=task.executor,
                started=utc_now(), error=None)
    try:
        summary = run(config, store=store, device=task.device, quiet=True, wait=True, data_root=task.data_root)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or submitit requeueing the job: it resumes later
        write_state(store, task.preset, config.run_id, state="interrupted", error=None)
        raise
    except BaseException as exc:
        write_state(store, task.preset, config.run_id, state="failed", error=_last_error_line(exc))
        raise
    write_state(store, task.preset, config.run_id, state="finished", error=None)
    return {"run_id": config.run_id, "top1": summary.get("last_top1"), "where": _where()}


# ---------------------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------------------
def _pending(configs: Sequence[RunConfig], store: RunStore) -> tuple[list[RunConfig], dict[str, str]]:
    """The runs to train, and what is skipped: finished runs, runs a live process holds."""
    todo, skipped = [], {}
    for config in configs:
        status = store.status(config.run_id)
        if status == "finished":
            skipped[config.run_id] = "finished before"
        elif status in ("running", "locked elsewhere"):
            owner = _lock_owner(store.run_dir(config.run_id) / "run.lock") or {}
            skipped[config.run_id] = f"held by pid {owner.get('pid')} on {owner.get('host')}"
        else:
            todo.append(config)
    return todo, skipped


def _init_local_worker(slots: Any, threads: int | None) -> None:
    slot = slots.get()
    if slot is not None:  # one GPU per worker: set before CUDA initialises in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slot)
    if threads:
        import torch

        torch.set_num_threads(threads)


def launch_local(configs: Sequence[RunConfig], store: RunStore, preset: str, *, workers: int | None = None,
                 device: str | None = None, data_root: str | Path | None = None, threads: int | None = None,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Train ``configs`` with ``workers`` processes on this machine; a teacher's students start once it has
    finished. With CUDA and no ``device`` given: one worker per visible GPU. On CPU the workers share the cores
    (``threads`` each; default cores // workers). Returns run id -> outcome."""
    import torch

    gpus = torch.cuda.device_count() if device in (None, "cuda") and torch.cuda.is_available() else 0
    workers = workers or max(gpus, 1)
    if workers < 1:
        raise LaunchError(f"--workers must be at least 1, got {workers}")
    if gpus:
        if workers > gpus:
            raise LaunchError(f"{workers} workers but {gpus} visible GPUs: one worker per GPU (--workers {gpus}), "
                              f"or --device cpu")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        slot_ids: list[str | None] = ids[:workers]
        device = "cuda"
    else:
        slot_ids = [None] * workers
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
    todo, outcome = _pending(configs, store)
    for run_id, why in outcome.items():
        log(f"skip {run_id}: {why}")
    token = _store_token(store, preset)
    waiting = {c.run_id: c for c in todo}
    failed: set[str] = set()

    in_flight: set[str] = set()

    def ready(config: RunConfig) -> bool | None:
        """True: can start (no teacher, or it finished, or another process trains it: the worker waits for
        that one's lock); False: its teacher still trains in this launch; None: its teacher failed here."""
        teacher = config.teacher.run_id if config.teacher is not None else None
        if teacher is not None and teacher in failed:
            return None
        return teacher is None or (teacher not in waiting and teacher not in in_flight)

    ctx = multiprocessing.get_context("spawn")
    slots = ctx.Queue()
    for slot in slot_ids:
        slots.put(slot)
    log(f"launch {preset}: {len(todo)} runs to train with {workers} local worker(s)"
        + (f" on GPUs {','.join(str(s) for s in slot_ids)}" if gpus else f", {threads} thread(s) each"))
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_local_worker,
                                initargs=(slots, None if gpus else threads)) as pool:
        running: dict[cf.Future, RunConfig] = {}

        def submit_ready() -> None:
            for run_id, config in list(waiting.items()):
                state = ready(config)
                if state is None:
                    del waiting[run_id]
                    failed.add(run_id)
                    outcome[run_id] = f"skipped: its teacher {config.teacher.run_id} failed"
                    write_state(store, preset, run_id, state="failed", error=outcome[run_id])
                    log(f"skip {run_id}: {outcome[run_id]}")
                elif state:
                    del waiting[run_id]
                    task = TrainTask(config.to_dict(), str(store.root), preset, token,
                                     None if data_root is None else str(data_root), device, None, "local")
                    write_state(store, preset, run_id, state="queued", executor="local", job_id=None)
                    running[pool.submit(train_task, task)] = config
                    in_flight.add(run_id)

        submit_ready()
        while running:
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                config = running.pop(future)
                in_flight.discard(config.run_id)
                try:
                    result = future.result()
                except Exception as exc:  # the worker recorded it; go on with the runs that do not need it
                    failed.add(config.run_id)
                    outcome[config.run_id] = f"failed: {_last_error_line(exc)}"
                    log(f"FAILED {config.run_id}: {_last_error_line(exc)}")
                else:
                    outcome[config.run_id] = "trained"
                    log(f"done {config.run_id} (top-1 {result['top1']:.2f} %, {result['where']})")
            submit_ready()
    return outcome


@dataclass
class SlurmOptions:
    """Where and how SLURM runs the jobs. ``extra``: further sbatch options (``{"qos": "high"}`` ->
    ``#SBATCH --qos=high``; ``True`` for a flag without a value, ``{"hold": True}`` -> ``#SBATCH --hold``);
    ``setup``: shell lines run before each job (``module load ...``)."""

    partition: str | None = None
    account: str | None = None
    time_min: int = 24 * 60
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem: str | None = None
    max_parallel: int = 64
    extra: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("time_min", "max_parallel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LaunchError(f"slurm option {name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.gpus_per_job, int) or self.gpus_per_job < 0:
            raise LaunchError(f"slurm option gpus_per_job must be an integer >= 0, got {self.gpus_per_job!r}")
        if self.cpus_per_job is not None and (not isinstance(self.cpus_per_job, int) or self.cpus_per_job < 1):
            raise LaunchError(f"slurm option cpus_per_job must be a positive integer, got {self.cpus_per_job!r}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "SlurmOptions":
        """Options from a TOML file (its keys are this class's fields), then ``overrides`` that are not None."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LaunchError(f"slurm config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise LaunchError(f"slurm config file {path} is not valid TOML: {exc}") from None
        data = data.get("slurm", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LaunchError(f"unknown key(s) {unknown} in {path}; valid: {', '.join(sorted(known))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)


def slurm_available() -> str | None:
    """None when SLURM answers here (``sinfo`` lists a partition), else why not."""
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        return "sbatch/squeue are not on PATH (no SLURM client on this machine)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if out.returncode != 0 or not out.stdout.strip():
        return f"sinfo lists no partition (is slurmctld running?): {(out.stderr or out.stdout).strip()[:200]}"
    return None


def squeue_jobs(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason or node) for those of ``job_ids`` SLURM still knows (pending, running, ...)."""
    ids = sorted({j for j in job_ids if j})
    if not ids or shutil.which("squeue") is None:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%R", "-j", ",".join(ids)], capture_output=True,
                         text=True, timeout=60)
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:  # squeue writes a pending job's reason in parentheses, a running job's node bare
            jobs[parts[0]] = (parts[1], parts[2].strip("()"))
    return jobs


class SlurmTrainJob:
    """The callable a SLURM job runs; submitit's ``checkpoint`` hook requeues it on timeout or preemption, and the
    requeued job resumes the run from its last saved epoch (the run's own checkpoint; nothing else is needed)."""

    def __call__(self, task: TrainTask) -> dict:
        if task.threads is None and os.environ.get("SLURM_CPUS_PER_TASK"):
            task = dataclasses.replace(task, threads=int(os.environ["SLURM_CPUS_PER_TASK"]))
        return train_task(task)

    def checkpoint(self, task: TrainTask):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTrainJob(), task)


def launch_slurm(configs: Sequence[RunConfig], store: RunStore, preset: str, options: SlurmOptions, *,
                 device: str | None = None, data_root: str | Path | None = None,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Submit one SLURM job per run still to train (array jobs, at most ``max_parallel`` at once); students of a
    teacher that trains in this launch depend on its job (``afterok``). Returns run id -> outcome (job id or
    why it was skipped). Does not wait for the jobs: ``launch --status`` follows them."""
    problem = slurm_available()
    if problem:
        raise LaunchError(f"cannot submit to SLURM: {problem}")
    try:
        import submitit
    except ImportError:
        raise LaunchError("the slurm executor needs submitit: pip install submitit") from None
    todo, outcome = _pending(configs, store)
    recorded = {c.run_id: read_state(store, preset, c.run_id) for c in todo}
    queue = squeue_jobs(r.get("job_id") for r in recorded.values())
    job_of: dict[str, str] = {}  # run id -> the live job that trains it (an earlier launch's, or this one's)
    to_submit = []
    for config in todo:
        job = recorded[config.run_id].get("job_id")
        state = queue.get(job)
        if state is not None and "DependencyNeverSatisfied" not in state[1]:
            job_of[config.run_id] = job
            outcome[config.run_id] = f"already queued as slurm job {job} ({state[0].lower()})"
        else:
            if state is not None:  # waits for a teacher job that failed or was cancelled: replace it
                subprocess.run(["scancel", job], capture_output=True, timeout=60)
            to_submit.append(config)
    for run_id, why in outcome.items():
        log(f"skip {run_id}: {why}")
    if not to_submit:
        log(f"launch {preset}: nothing to submit")
        return outcome

    token = _store_token(store, preset)
    device = device or ("cuda" if options.gpus_per_job else "cpu")
    folder = launch_dir(store, preset) / "slurm"
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=10)
    params: dict[str, Any] = {"time": options.time_min, "array_parallelism": options.max_parallel,
                              "job_name": f"ckd-{preset}", "additional_parameters": dict(options.extra),
                              "setup": list(options.setup), "signal_delay_s": 120}
    for key, value in (("partition", options.partition), ("account", options.account), ("mem", options.mem),
                       ("cpus_per_task", options.cpus_per_job)):
        if value is not None:
            params[key] = value
    if options.gpus_per_job:
        params["gpus_per_node"] = options.gpus_per_job
    executor.update_parameters(**params)

    def task(config: RunConfig) -> TrainTask:
        return TrainTask(config.to_dict(), str(store.root), preset, token,
                         None if data_root is None else str(data_root), device, None, "slurm")

    # Submit in waves: runs whose teacher needs no job first (teachers among them), then the students of each
    # teacher job, with an afterok dependency on it.
    remaining = list(to_submit)
    while remaining:
        groups: dict[str | None, list[RunConfig]] = {}
        later = []
        for config in remaining:
            teacher = config.teacher.run_id if config.teacher is not None else None
            if teacher is not None and any(c.run_id == teacher for c in remaining):
                later.append(config)  # its teacher is submitted in this wave; it goes in the next one
            else:
                groups.setdefault(job_of.get(teacher) if teacher else None, []).append(config)
        for dependency, group in groups.items():
            executor.update_parameters(dependency=f"afterok:{dependency}" if dependency else None)
            with executor.batch():
                jobs = [executor.submit(SlurmTrainJob(), task(config)) for config in group]
            for config, job in zip(group, jobs):
                job_of[config.run_id] = job.job_id
                outcome[config.run_id] = f"submitted as slurm job {job.job_id}" + (
                    f" (after {dependency})" if dependency else "")
                write_state(store, preset, config.run_id, state="queued", executor="slurm", job_id=job.job_id,
                            submitted=utc_now(), error=None)
                log(f"{config.run_id}: {outcome[config.run_id]}")
        remaining = later
    return outcome


# ---------------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------------
def launch_status(preset: str, store: RunStore, configs: Sequence[RunConfig] | None = None) -> list[dict]:
    """One row per planned run: finished / running where / queued (SLURM job) / failed with its last error line /
    interrupted / not started."""
    configs = list(configs) if configs is not None else launch_plan(preset)
    records = {c.run_id: read_state(store, preset, c.run_id) for c in configs}
    queue = squeue_jobs(r.get("job_id") for r in records.values() if r.get("executor") == "slurm")
    teacher_ids = _teacher_ids(configs)
    rows = []
    for config in configs:
        run_id, record = config.run_id, records[config.run_id]
        status = store.status(run_id)
        job = record.get("job_id")
        detail = ""
        if status == "finished":
            state = "finished"
        elif status in ("running", "locked elsewhere"):
            owner = _lock_owner(store.run_dir(run_id) / "run.lock") or {}
            state, detail = "running", f"on {owner.get('host')} pid {owner.get('pid')}" + (
                f", slurm job {job}" if job in queue else "")
        elif job in queue:
            slurm_state, reason = queue[job]
            state = "queued" if slurm_state == "PENDING" else slurm_state.lower()
            detail = f"slurm job {job}" + (f" ({reason})" if reason and reason != "None" else "")
        elif record.get("state") == "failed":
            state, detail = "failed", str(record.get("error") or "")
        elif status == "interrupted" or record.get("state") in ("running", "queued"):
            state = "interrupted"
            detail = "resumes at the next launch" + (f" (slurm job {job} is gone)" if job else "")
        else:
            state = "not started"
        rows.append({"run_id": run_id, "role": "teacher" if run_id in teacher_ids else (
                         "student" if config.teacher is not None else "alone"),
                     "state": state, "detail": detail})
    return rows


def format_status(rows: Sequence[Mapping[str, str]]) -> str:
    width = max((len(r["run_id"]) for r in rows), default=10)
    lines = [f"{r['run_id']:<{width}}  {r['role']:<7}  {r['state']:<11}  {r['detail']}".rstrip() for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(rows)} runs)")
    return "\n".join(lines)


def wait_for(configs: Sequence[RunConfig], store: RunStore, preset: str, *, timeout_s: float,
             poll_s: float = 2.0, until_idle: bool = False) -> list[dict]:
    """Poll until every run of ``configs`` is finished or failed (``until_idle``: until none is queued or
    running any more, e.g. after a job was cancelled), or ``timeout_s`` passes; returns the last status rows.
    For tests and for ``launch --wait``."""
    deadline = time.monotonic() + timeout_s
    ended = ("finished", "failed", "interrupted", "not started") if until_idle else ("finished", "failed")
    while True:
        rows = launch_status(preset, store, configs)
        if all(r["state"] in ended for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(poll_s)
