"""The results store: every run lives in ``results/runs/<run-id>/``.

Files of a run (all written atomically: a temporary file in the same folder, then ``os.replace``):

- ``config.json``       the resolved config (teacher config included) and the run id
- ``metrics.jsonl``     one line per completed epoch (losses per term, lr, images/s, test accuracy)
- ``summary.json``      final metrics, best epoch, wall time, images/s; present only when the run finished
- ``environment.json``  git commit, package versions, device, torch threads
- ``checkpoints/latest.pt`` (after every epoch, for resume) and ``checkpoints/final.pt`` (the final weights,
  whose sha256 is recorded in the summary; distillation runs check their teacher against it)

``run(config)`` returns the stored summary of a finished run, resumes an interrupted one from its last
checkpoint, and trains otherwise; distillation runs train their teacher first when it has no finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import RunConfig, cpu_bf16_flags, cpu_has_native_bf16
from .files import atomic_torch_save, atomic_write_bytes, atomic_write_json, sha256_file, sha256_json
from .data import NUM_VIEWS, ImageDataset, load_dataset, resolve_data_root
from .methods import create_method, method_class
from .models import ZooModel, create_model

CHECKPOINT_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """A stored run cannot be used as it is (corrupt file, mismatching teacher, ...); nothing was deleted."""


class RunInProgressError(RunError):
    """Another live process holds the run's lock."""


class RunPaused(Exception):
    """``run(..., stop_at=...)`` stopped cleanly before the deadline; the run resumes from ``epoch``."""

    def __init__(self, run_id: str, epoch: int, epochs: int) -> None:
        super().__init__(f"run {run_id} paused after epoch {epoch}/{epochs}; rerun to resume")
        self.run_id, self.epoch, self.epochs = run_id, epoch, epochs


def default_results_dir() -> Path:
    """``$CKD_RESULTS_DIR`` if set, else ``<repo>/results``."""
    env = os.environ.get("CKD_RESULTS_DIR")
    return Path(env) if env else REPO_ROOT / "results"


# ---------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is corrupt ({exc}). Nothing was deleted: fix or remove the file "
                       f"(removing the run folder {path.parent} retrains the run).") from exc


def load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise RunError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). Nothing was deleted: "
                       f"remove that file to restart the run from scratch (or from an earlier copy).") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"checkpoint {path} is not a ckd-study checkpoint of format {CHECKPOINT_FORMAT}; "
                       f"remove it to restart the run.")
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------
class RunStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_results_dir()

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def run_ids(self) -> list[str]:
        base = self.root / "runs"
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []

    def config(self, run_id: str) -> RunConfig:
        path = self.run_dir(run_id) / "config.json"
        if not path.exists():
            raise RunError(f"no run {run_id!r} in {self.root / 'runs'} (no config.json); "
                           f"`python -m ckd_study list` shows the stored runs")
        return RunConfig.from_dict(read_json(path)["config"])

    def summary(self, run_id: str) -> dict | None:
        """The finished run's summary (None while unfinished), checked against the config it was trained with:
        a summary binds the sha256 of its config, so an edited config.json is reported, not believed."""
        path = self.run_dir(run_id) / "summary.json"
        if not path.exists():
            return None
        summary = read_json(path)
        bound = summary.get("config_sha256")
        if bound is not None:
            config_path = self.run_dir(run_id) / "config.json"
            actual = sha256_json(read_json(config_path)["config"]) if config_path.exists() else None
            if actual != bound:
                raise RunError(f"{config_path} does not hold the config run {run_id} was trained with (it was "
                               f"{'removed' if actual is None else 'changed'} after the run finished); its results "
                               f"are not used. Restore the file (e.g. `git checkout -- {config_path}`), or retrain "
                               f"with `python -m ckd_study train --config <a config.json> --retrain`")
        return summary

    def metrics(self, run_id: str) -> list[dict]:
        path = self.run_dir(run_id) / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for n, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                summary_path = self.run_dir(run_id) / "summary.json"
                epochs = read_json(summary_path).get("epochs") if summary_path.exists() else None
                if n == len(lines) and epochs is not None and [r.get("epoch") for r in rows] == \
                        list(range(1, epochs + 1)):
                    # A finished run whose every epoch is recorded, plus a half-written line (e.g. an append
                    # that was cut off): the line is no record of ours; repair the file without it.
                    warnings.warn(f"{path}: removed a half-written last line ({exc}); the run's {epochs} epoch "
                                  f"records are intact", stacklevel=2)
                    _write_metrics(self.run_dir(run_id), rows)
                    return rows
                raise RunError(f"{path} line {n} is corrupt ({exc}); nothing was deleted. If the run is "
                               f"interrupted, rerun it: its metrics are rewritten from the last checkpoint") from exc
        return rows

    def attempts(self, run_id: str) -> list[dict]:
        """The environment record of every start and resume of the run, oldest first (``attempts.jsonl``; a run
        stored before that log existed has only ``environment.json``, its first attempt's record)."""
        run_dir = self.run_dir(run_id)
        env_path = run_dir / "environment.json"
        return _attempts(run_dir) or ([read_json(env_path)] if env_path.exists() else [])

    def status(self, run_id: str) -> str:
        """``finished``, ``running`` (a live process on this host holds the lock), ``locked elsewhere`` (a
        process on another host holds it), ``interrupted`` (a checkpoint, no live lock: a stale lock of a dead
        process is ignored) or ``new``."""
        d = self.run_dir(run_id)
        if (d / "summary.json").exists():
            return "finished"
        owner = _lock_owner(d / "run.lock")
        if owner is not None:
            return "running" if owner.get("host") == socket.gethostname() else "locked elsewhere"
        if (d / "checkpoints" / "latest.pt").exists() or (d / "inflight" / "manifest.json").exists():
            return "interrupted"
        return "new"

    # -- in-flight checkpoints that travel with the repo (a campaign spans machines) ------------------------
    INFLIGHT_PART_BYTES = 3 << 20  # parts well under the repo's 5 MiB per file

    def inflight_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "inflight"

    def export_inflight(self, run_id: str) -> list[Path]:
        """Copy ``checkpoints/latest.pt`` of an unfinished run into ``inflight/`` as parts of at most 3 MiB
        plus a manifest (sha256 of the whole), files small enough to commit; returns the files written."""
        latest = self.run_dir(run_id) / "checkpoints" / "latest.pt"
        data = latest.read_bytes()
        folder = self.inflight_dir(run_id)
        for old in folder.glob("latest.pt.part*"):
            old.unlink()
        step = self.INFLIGHT_PART_BYTES
        parts = []
        for n, start in enumerate(range(0, len(data), step)):
            parts.append(folder / f"latest.pt.part{n:02d}")
            atomic_write_bytes(parts[-1], data[start:start + step])
        manifest = folder / "manifest.json"
        atomic_write_json(manifest, {"file": "checkpoints/latest.pt", "sha256": hashlib.sha256(data).hexdigest(),
                                     "bytes": len(data), "parts": [p.name for p in parts],
                                     "epoch": load_checkpoint(latest)["state"]["epoch"]})
        return [manifest, *parts]

    def restore_inflight(self, run_id: str) -> bool:
        """Rebuild ``checkpoints/latest.pt`` from ``inflight/`` when it is missing or older than the exported
        one (a fresh clone, another machine); the parts' sha256 must match the manifest. Returns True if
        it restored."""
        manifest_path = self.inflight_dir(run_id) / "manifest.json"
        if not manifest_path.exists():
            return False
        manifest = read_json(manifest_path)
        latest = self.run_dir(run_id) / "checkpoints" / "latest.pt"
        if latest.exists() and load_checkpoint(latest)["state"]["epoch"] >= manifest["epoch"]:
            return False
        data = b"".join((self.inflight_dir(run_id) / name).read_bytes() for name in manifest["parts"])
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise RunError(f"the in-flight checkpoint parts in {self.inflight_dir(run_id)} do not match their "
                           f"manifest (sha256); restore them from git (`git checkout -- {self.inflight_dir(run_id)}`)"
                           f" or remove that folder to restart the run from its local checkpoint or from scratch")
        atomic_write_bytes(latest, data)
        return True

    def remove_inflight(self, run_id: str) -> None:
        folder = self.inflight_dir(run_id)
        if folder.exists():
            for path in folder.iterdir():
                path.unlink()
            folder.rmdir()

    def load_model(self, run_id: str, device: str | torch.device = "cpu") -> ZooModel:
        """The final weights of a finished run, verified against the sha256 in its summary, in eval mode."""
        summary = self.summary(run_id)
        if summary is None:
            raise RunError(f"run {run_id!r} has not finished: no summary.json in {self.run_dir(run_id)}")
        config = self.config(run_id)
        path = self.run_dir(run_id) / "checkpoints" / "final.pt"
        if not path.exists():
            how = (f"import a checkpoint with `python -m ckd_study import-teacher FILE --model {config.student} "
                   f"--preset {config.preset}` after moving {self.run_dir(run_id)} away, or "
                   if config.teacher is None else "")
            raise RunError(f"run {run_id!r} has finished but its weights {path} are missing (checkpoints of "
                           f"students are not committed); {how}retrain it with `python -m ckd_study train --config "
                           f"{self.run_dir(run_id)}/config.json --retrain` (the old folder is kept aside)")
        actual = sha256_file(path)
        if actual != summary["final_sha256"]:
            raise RunError(f"checkpoint {path} has sha256 {actual[:12]}…, but the run recorded "
                           f"{summary['final_sha256'][:12]}…: the weights were changed or corrupted. "
                           f"Nothing was deleted; restore the file, or retrain the run with `python -m ckd_study "
                           f"train --config {self.run_dir(run_id)}/config.json --retrain` (the old folder is kept "
                           f"aside)")
        ckpt = load_checkpoint(path)
        num_classes = ckpt["num_classes"]
        model = create_model(config.student, num_classes)
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Locks: one process trains a run at a time
# ---------------------------------------------------------------------------------------------------------
def process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/<pid>/stat field 22; None where /proc
    is missing or the process is gone): with the pid, it identifies a process even after its pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


LOCK_HEARTBEAT_S = 30.0


def lock_stale_after_s() -> float:
    """How old another host's lock heartbeat may be before the lock counts as stale: ``$CKD_LOCK_STALE_S``,
    default 300 s (ten heartbeats; clocks of a cluster's nodes and its shared filesystem may differ a little)."""
    value = os.environ.get("CKD_LOCK_STALE_S", "300")
    try:
        seconds = float(value)
    except ValueError:
        raise RunError(f"CKD_LOCK_STALE_S must be a number of seconds, got {value!r}") from None
    if not seconds > LOCK_HEARTBEAT_S:
        raise RunError(f"CKD_LOCK_STALE_S must exceed the lock heartbeat ({LOCK_HEARTBEAT_S:g} s), got {value!r}")
    return seconds


@contextmanager
def _heartbeat(path: Path, every_s: float) -> Iterator[None]:
    """Touch ``path`` every ``every_s`` seconds while the block runs (a daemon thread), so that other hosts
    can tell a live lock from the lock of a process that died without removing it."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                os.utime(path)
            except OSError:  # the lock was removed under us (e.g. --retrain elsewhere): nothing to keep alive
                return

    thread = threading.Thread(target=beat, name=f"heartbeat {path.parent.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _lock_owner(path: Path) -> dict | None:
    """The live owner of a lock file, or None when there is no lock or its owner is gone (a dead process, or a
    reused pid: the start time differs). An owner on another host counts as live while the lock's heartbeat
    (its mtime) is younger than :func:`lock_stale_after_s`."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # locks are written whole before they appear (see run_lock): unreadable means corrupt
    if not isinstance(owner, dict):
        return None
    if owner.get("host") != socket.gethostname():
        # Another host's process cannot be asked; its lock is live while its heartbeat is recent (run_lock
        # touches the file every LOCK_HEARTBEAT_S): a node that died or a SLURM job that was killed stops it.
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return None if age > lock_stale_after_s() else owner
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return None  # stale: the process died (killed runs leave their lock behind)
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
        started = owner.get("started")
        if started is not None and process_start_time(int(owner["pid"])) not in (None, started):
            return None  # the pid now belongs to another process
    return owner


def _describe_owner(owner: dict) -> str:
    return f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('since_utc', '?')})"


@contextmanager
def run_lock(run_dir: Path, wait: bool = False, poll_s: float = 1.0, timeout_s: float | None = None,
             on_wait=None) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` while the block runs: one process trains a run at a time.

    The lock file appears atomically with its owner's identity in it (written to a temporary file, then
    hard-linked into place, which fails if a lock exists), so a lock is never seen empty; a lock whose owner is
    dead or whose pid was reused is taken over. ``wait=True`` polls until the lock is free (``timeout_s``: give
    up with :class:`RunInProgressError`); ``on_wait(owner)`` is called once, when waiting starts.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.lock"
    pid = os.getpid()
    me = {"pid": pid, "host": socket.gethostname(), "started": process_start_time(pid), "since": time.time(),
          "since_utc": utc_now()}
    tmp = run_dir / f".run.lock.{pid}.tmp"
    atomic_write_json(tmp, me)
    waited_since = None
    try:
        while True:
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                owner = _lock_owner(path)
                if owner is None:  # stale lock of a dead process: take it over
                    path.unlink(missing_ok=True)
                    continue
                if not wait:
                    raise RunInProgressError(
                        f"run {run_dir.name} is being trained by {_describe_owner(owner)}; wait for it (`--wait`; "
                        f"from Python run(..., wait=True)) or, if that process is gone, remove {path}") from None
                if waited_since is None:
                    waited_since = time.monotonic()
                    if on_wait is not None:
                        on_wait(owner)
                if timeout_s is not None and time.monotonic() - waited_since > timeout_s:
                    raise RunInProgressError(f"gave up after waiting {timeout_s:g} s for run {run_dir.name}, "
                                             f"held by {_describe_owner(owner)}") from None
                time.sleep(poll_s)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        with _heartbeat(path, LOCK_HEARTBEAT_S):
            yield
    finally:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Environment record
# ---------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git(*args: str, ok: tuple[int, ...] = (0,)) -> str | None:
    """``git ARGS`` in the repository: its stdout when the exit code is in ``ok``, None when git fails or is
    missing (a run outside a checkout records no commit rather than failing)."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode in ok else None


def package_diff() -> str | None:
    """The package's uncommitted changes: ``git diff HEAD -- ckd_study`` plus each new, untracked file of the
    package as a diff from nothing; None when the package is as committed (or git is unavailable). Changes to
    notebooks, tests or the results store do not change what a run computes and are not included."""
    tracked = _git("diff", "HEAD", "--", "ckd_study")
    if tracked is None:
        return None
    untracked = (_git("ls-files", "--others", "--exclude-standard", "--", "ckd_study") or "").split()
    new_files = [_git("diff", "--no-index", "--", "/dev/null", name, ok=(0, 1)) or "" for name in untracked]
    text = tracked + "".join(new_files)
    return text or None


def environment_record(setup) -> dict:
    """Where and with what a run trains: git state, versions, device, precision (a ``train.DeviceSetup``).

    A run started from uncommitted package code records ``code_diff_sha256`` beside ``git_commit``, and the
    record carries the diff itself under ``code_diff`` (:func:`_record_attempt` moves it to
    ``<run>/code_diffs/<sha256 prefix>.diff``), so that every number maps to exact code."""
    device = setup.device
    import numpy

    import ckd_study

    code_diff = package_diff()
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                "ckd_study": ckd_study.__version__}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return {
        "git_commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        "git_dirty": bool((_git("status", "--porcelain", "--untracked-files=no") or "").strip()),
        "code_diff_sha256": None if code_diff is None else hashlib.sha256(code_diff.encode()).hexdigest(),
        "code_diff": code_diff,
        "versions": versions,
        "device": str(device),
        "precision": setup.precision,
        "autocast_dtype": None if setup.autocast_dtype is None else str(setup.autocast_dtype),
        "channels_last": setup.channels_last,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "recorded_at": utc_now(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
    }


# ---------------------------------------------------------------------------------------------------------
# run()
# ---------------------------------------------------------------------------------------------------------
_DATA_CACHE: dict[tuple, ImageDataset] = {}


def dataset_for(config: RunConfig, device: torch.device, data_root: str | Path | None = None) -> ImageDataset:
    """The (subset of the) dataset a config trains on, on ``device``; loaded once per process and data folder.

    The key holds the folder the data comes from, resolved now (``$CKD_DATA_DIR`` when ``data_root`` is None):
    a process whose data folder changes (a notebook kernel, the tests) must load from the new one, or fail when
    it is missing, rather than train on what an earlier folder held.
    """
    root = resolve_data_root(data_root).resolve()
    key = (config.dataset, config.train_per_class, config.test_per_class, str(device), str(root))
    if key not in _DATA_CACHE:
        data = load_dataset(config.dataset, root=root)
        if config.train_per_class is not None or config.test_per_class is not None:
            data = data.subset(config.train_per_class, config.test_per_class, seed=0)
        _DATA_CACHE[key] = data.to(device)
    return _DATA_CACHE[key]


EPOCH_ESTIMATE_WINDOW = 3


def next_epoch_seconds(history: list[dict], window: int = EPOCH_ESTIMATE_WINDOW) -> float | None:
    """The expected wall time of the next epoch: the median of the last ``window`` epochs' training + evaluation
    seconds (None without any). A median, not the last epoch: one epoch stretched by a pause (SIGSTOP, a
    suspended laptop, a resume's first epoch on a busy machine) must not make a time-boxed run stop at once,
    while two slow epochs in a row (a machine that really got slower) do move the estimate."""
    times = [m["epoch_time_s"] + m.get("eval_time_s", 0.0) for m in history[-window:]]
    return statistics.median(times) if times else None


def time_for_another_epoch(history: list[dict], stop_at: float | None, now: float | None = None) -> bool:
    """Whether a run with ``history`` may start another epoch before the ``stop_at`` deadline: the estimate
    (:func:`next_epoch_seconds`) plus a 10 % + 5 s margin must end in time. No deadline, or no epoch yet
    to estimate from, always may."""
    estimate = next_epoch_seconds(history)
    if stop_at is None or estimate is None:
        return True
    return (time.time() if now is None else now) + 1.1 * estimate + 5.0 <= stop_at


def run(config: RunConfig, *, store: RunStore | None = None, device: str | torch.device | None = None,
        quiet: bool = False, wait: bool = False, data_root: str | Path | None = None,
        step_hook=None, stop_at: float | None = None, on_epoch=None, wait_timeout: float | None = None,
        retrain: bool = False) -> dict:
    """Train ``config`` (resuming if interrupted) unless it already finished; return its summary.

    ``wait=True`` waits for another process that holds the run's lock instead of raising
    :class:`RunInProgressError` (saying who holds it on stderr; ``wait_timeout`` seconds at most).
    ``retrain=True`` moves the run's folder aside (``<run id>.replaced-<time>``, nothing is deleted) and trains
    it again: the way back from corrupt weights or records. ``stop_at`` (a ``time.time()`` deadline) stops the
    run cleanly, after a saved epoch, when the next epoch would not end before it (:func:`time_for_another_epoch`),
    raising :class:`RunPaused`; ``on_epoch(config, record)`` is called after every saved epoch (progress reports).

    The steps: build the trainer, resume from the latest checkpoint, fit epoch by epoch (a checkpoint and the
    metrics after each), keep the teacher outputs computed, and, once every epoch is done, the final weights and
    ``summary.json``.
    """
    store = store or RunStore()
    run_id = config.run_id
    run_dir = store.run_dir(run_id)
    if retrain and run_dir.exists():
        _move_aside(run_dir)
    finished = store.summary(run_id) if (run_dir / "summary.json").exists() else None
    if finished is not None:
        return finished

    teacher_summary = None
    if config.teacher is not None:
        teacher_summary = run(config.teacher, store=store, device=device, quiet=quiet, wait=wait,
                              data_root=data_root, stop_at=stop_at, on_epoch=on_epoch, wait_timeout=wait_timeout)

    def waiting(owner: dict) -> None:
        print(f"waiting for run {run_id}, held by {_describe_owner(owner)}"
              + (f" (at most {wait_timeout:g} s)" if wait_timeout is not None else ""), file=sys.stderr, flush=True)

    created = not run_dir.exists()
    with run_lock(run_dir, wait=wait, timeout_s=wait_timeout, on_wait=waiting), \
            _removed_on_failure(run_dir if created else None):
        finished = store.summary(run_id)  # another process may have finished it while we waited
        if finished is not None:
            return finished
        _check_or_write_config(run_dir, config)
        trainer = _build_trainer(config, store, teacher_summary, device, data_root, quiet, step_hook)
        wall_before = _resume(trainer, store, config, teacher_summary)
        teacher_sha = teacher_summary["final_sha256"] if teacher_summary else None
        try:
            state, wall_time_s = _fit(trainer, run_dir, teacher_sha, wall_before, stop_at, on_epoch)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the resumed run (or the next) reads what this one computed
            _keep_teacher_outputs(trainer.teacher_source)
            raise
        _keep_teacher_outputs(trainer.teacher_source)
        if state.epoch < config.epochs:
            raise RunPaused(run_id, state.epoch, config.epochs)
        summary = _finish(trainer, store, teacher_summary, wall_time_s)
        store.remove_inflight(run_id)  # a finished run keeps its records, not its in-flight checkpoint
        return summary


def _move_aside(run_dir: Path) -> None:
    """``retrain``: move a run's folder aside (``<run id>.replaced-<time>``); nothing is deleted."""
    with run_lock(run_dir):
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{utc_now().replace(':', '')}")
        os.replace(run_dir, aside)
    (aside / "run.lock").unlink(missing_ok=True)
    print(f"moved the old run folder aside to {aside}", file=sys.stderr)


def _build_trainer(config: RunConfig, store: RunStore, teacher_summary: dict | None, device, data_root,
                   quiet: bool, step_hook):
    """The Trainer of a fresh start: device, data, student, method, and the teacher source (live or cached)."""
    from .train import Trainer

    setup, data, student, teacher_model, method = training_parts(config, store, device, data_root)
    teacher_source = None
    if teacher_model is not None:
        teacher_source = _teacher_source(config, teacher_model, teacher_summary, data, setup, store)
    return Trainer(config, data, student, method, teacher_source, setup, quiet=quiet, step_hook=step_hook)


def _resume(trainer, store: RunStore, config: RunConfig, teacher_summary: dict | None) -> float:
    """Load the run's latest checkpoint into ``trainer`` if there is one (rebuilt from committed in-flight parts
    when missing), rewrite the metrics to match it and record this attempt; return the wall time of the epochs
    done before (0 for a fresh start)."""
    run_id = config.run_id
    run_dir = store.run_dir(run_id)
    latest = run_dir / "checkpoints" / "latest.pt"
    store.restore_inflight(run_id)
    wall_before = 0.0
    if latest.exists():
        ckpt = load_checkpoint(latest)
        wall_before = float(ckpt.get("wall_time_s", 0.0))
        if ckpt.get("run_id") != run_id:
            raise RunError(f"checkpoint {latest} belongs to run {ckpt.get('run_id')!r}, not {run_id!r}; "
                           f"remove it to restart")
        if teacher_summary is not None and ckpt.get("teacher_sha256") != teacher_summary["final_sha256"]:
            raise RunError(f"checkpoint {latest} was trained against a different teacher checkpoint "
                           f"(sha256 {str(ckpt.get('teacher_sha256'))[:12]}…, now "
                           f"{teacher_summary['final_sha256'][:12]}…); remove it to restart the run")
        trainer.load_state_dict(ckpt)
    # Metric lines past the checkpoint come from an epoch that was killed before it was saved.
    _write_metrics(run_dir, trainer.state.history)
    # start_epoch: where this attempt began (0, or the saved epoch it resumed from)
    _record_attempt(run_dir, {**environment_record(trainer.setup), "start_epoch": trainer.state.epoch})
    return wall_before


def _fit(trainer, run_dir: Path, teacher_sha: str | None, wall_before: float, stop_at: float | None, on_epoch):
    """Train from the trainer's epoch on, saving a checkpoint and the metrics after every epoch; stop early when
    the next epoch would not end before ``stop_at``. Returns the state and the run's wall time so far."""
    config = trainer.config
    latest = run_dir / "checkpoints" / "latest.pt"
    started = time.perf_counter()

    def save(tr, record: dict) -> None:
        # The checkpoint first, then the metrics it describes: metrics never run ahead of the checkpoint.
        ckpt = {"format": CHECKPOINT_FORMAT, "run_id": config.run_id, "teacher_sha256": teacher_sha,
                "wall_time_s": wall_before + time.perf_counter() - started, **tr.state_dict()}
        atomic_torch_save(ckpt, latest)
        _write_metrics(run_dir, tr.state.history)
        if on_epoch is not None:
            on_epoch(config, record)

    def keep_going(tr, epoch: int) -> bool:
        return time_for_another_epoch(tr.state.history, stop_at)

    try:
        state = trainer.fit(on_epoch_end=save, keep_going=keep_going)
    except KeyboardInterrupt:
        done = trainer.state.epoch
        raise KeyboardInterrupt(f"interrupted run {config.run_id} in epoch {done + 1}/{config.epochs} (epochs "
                                f"saved: {done}); rerun the same command to resume") from None
    return state, wall_before + time.perf_counter() - started


def _keep_teacher_outputs(teacher_source) -> None:
    """Persist the teacher outputs this run computed (the cache) for later runs: an optional write that warns
    and never costs the run."""
    if teacher_source is None:
        return
    try:
        teacher_source.save()
    except OSError as exc:
        warnings.warn(f"the teacher cache was not saved ({exc}); later runs recompute what it held", stacklevel=3)


def _finish(trainer, store: RunStore, teacher_summary: dict | None, wall_time_s: float) -> dict:
    """Write the final weights and ``summary.json`` of a run whose every epoch is done; return the summary."""
    config, state, setup, teacher_source = trainer.config, trainer.state, trainer.setup, trainer.teacher_source
    run_id = config.run_id
    run_dir = store.run_dir(run_id)
    final = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "model_name": config.student,
             "num_classes": trainer.data.num_classes, "model": trainer.student.state_dict()}
    final_sha = atomic_torch_save(final, run_dir / "checkpoints" / "final.pt")
    last = state.history[-1]
    images_per_s = [r["images_per_s"] for r in state.history]
    summary = {
        "run_id": run_id,
        "status": "finished",
        "method": config.method,
        "student": config.student,
        "teacher": config.teacher.student if config.teacher else None,
        "teacher_run_id": config.teacher.run_id if config.teacher else None,
        "teacher_sha256": teacher_summary["final_sha256"] if teacher_summary else None,
        "teacher_top1": teacher_summary["last_top1"] if teacher_summary else None,
        "dataset": config.dataset,
        "preset": config.preset,
        "seed": config.seed,
        "epochs": config.epochs,
        "last_top1": last["test_top1"],
        "last_top5": last["test_top5"],
        "best_top1": state.best_top1,
        "best_top5": state.best_top5,
        "best_epoch": state.best_epoch,
        "train_time_s": state.train_time_s,
        "wall_time_s": wall_time_s,
        "images_per_s": sum(images_per_s) / len(images_per_s),
        "teacher_source": None if teacher_source is None else teacher_source.kind,
        "teacher_cache_file": (str(Path(teacher_source.path).relative_to(store.root))
                               if teacher_source is not None and teacher_source.path is not None else None),
        **{key: sum(r.get(key, 0) for r in state.history)
           for key in ("teacher_cache_hits", "teacher_cache_misses", "teacher_cache_prefetched", "teacher_calls")
           if key in last},
        "final_sha256": final_sha,
        "finished_at": utc_now(),
        "device": str(setup.device),
        "precision": setup.precision,
        "config_sha256": sha256_json(config.to_dict()),  # binds the record to config.json (checked on read)
        "attempts": len(_attempts(run_dir)),
        **trainer.method.added_state(),
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


@contextmanager
def _removed_on_failure(run_dir: Path | None) -> Iterator[None]:
    """Remove a run folder this call created when the run fails before its first checkpoint (a missing
    dataset, a bad teacher, Ctrl-C in epoch 1): no half-made run is left in the store."""
    try:
        yield
    except BaseException:
        if run_dir is not None and not (run_dir / "checkpoints").exists():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def training_parts(config: RunConfig, store: RunStore, device=None, data_root: str | Path | None = None):
    """What a run of ``config`` trains with, built in the order that fixes its random initialisation: the device
    setup, the dataset, the student (seeded), the frozen teacher from its finished run (or None) and the method
    with its extra modules. Shared by :func:`run` and the cost measurement (``ckd_study.cost``)."""
    from .train import DeviceSetup

    setup = DeviceSetup.for_device(device, config.precision)
    data = dataset_for(config, setup.device, data_root)
    torch.manual_seed(config.seed)
    student = create_model(config.student, data.num_classes)
    teacher_model = _frozen_teacher(config, store, data, setup) if config.teacher is not None else None
    method = create_method(config.method, student, teacher_model, num_train=len(data.x_train),
                           train_labels=data.y_train, **config.method_options)
    return setup, data, student, teacher_model, method


def _frozen_teacher(config: RunConfig, store: RunStore, data: ImageDataset, setup) -> ZooModel:
    """``config``'s teacher from its finished run (sha256-checked), on the device, in eval mode, frozen."""
    teacher = store.load_model(config.teacher.run_id)
    if teacher.num_classes != data.num_classes:
        raise RunError(f"teacher {config.teacher.run_id} predicts {teacher.num_classes} classes, "
                       f"the dataset has {data.num_classes}")
    teacher = setup.prepare_model(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_of(config: RunConfig) -> RunConfig:
    """The teacher config of a distillation config; a clear error for a config that trains without one."""
    if config.teacher is None:
        raise RunError(f"run {config.run_id} trains without a teacher (method {config.method!r}): there is no "
                       f"teacher output to cache; give a distillation config (a method with a teacher)")
    return config.teacher


def precompute_teacher_cache(config: RunConfig, *, store: RunStore | None = None,
                             device: str | torch.device | None = None, quiet: bool = False, wait: bool = False,
                             data_root: str | Path | None = None, save_every: int = 18) -> dict:
    """Fill the exact teacher-output cache of ``config``'s teacher and training set for all 162 views of every
    image, and save it in the store, where every later run with this teacher and training set reads it.

    Runs fill the cache lazily on their own (a view's teacher outputs are computed the first time a run meets
    it); precomputing is for when the whole table is wanted up front, e.g. before a grid of long runs. The
    teacher is trained first if it has no finished run. Views already cached (on disk) are skipped, and the
    table is saved every ``save_every`` views, so an interrupted precompute continues where it stopped.
    Returns the cache file, the teacher run, how many image-views were computed and how long it took.
    """
    from .teacher_cache import CACHEABLE, cached_teacher_source
    from .train import DeviceSetup, LiveTeacher

    teacher_config = teacher_of(config)
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every!r}")
    store = store or RunStore()
    teacher_summary = run(teacher_config, store=store, device=device, quiet=quiet, wait=wait, data_root=data_root)
    setup = DeviceSetup.for_device(device, config.precision)  # the precision the student runs will read
    data = dataset_for(config, setup.device, data_root)
    live = LiveTeacher(_frozen_teacher(config, store, data, setup), setup)
    source = cached_teacher_source(live, CACHEABLE, teacher_summary, data, setup, store)
    cache = source.cache
    image_views = len(data.x_train) * NUM_VIEWS
    cached_before = int(cache.filled.sum())
    started = time.perf_counter()

    def after_view(view: int) -> None:
        done = view + 1
        if done % save_every == 0 or done == NUM_VIEWS:
            source.save()
        if not quiet:
            print(f"teacher cache: view {done}/{NUM_VIEWS}, {cache.coverage:.1%} of {image_views:,} image-views "
                  f"filled, {time.perf_counter() - started:.0f} s", flush=True)

    computed = cache.fill_all(live, data, on_view=after_view)
    seconds = time.perf_counter() - started
    return {"cache_path": str(source.path), "teacher_run_id": teacher_config.run_id,
            "teacher_sha256": teacher_summary["final_sha256"], "image_views": image_views,
            "cached_before": cached_before, "computed": computed, "coverage": cache.coverage,
            "seconds": seconds, "device": str(setup.device)}


def _teacher_source(config, teacher_model, teacher_summary, data, setup, store):
    """The live teacher, or the exact teacher-output cache when the config and method allow it."""
    from .train import LiveTeacher

    live = LiveTeacher(teacher_model, setup)
    if not config.teacher_cache:
        return live
    try:
        from .teacher_cache import cached_teacher_source
    except ImportError:  # the cache module is optional for the engine
        return live
    return cached_teacher_source(live, method_class(config.method).teacher_outputs, teacher_summary, data,
                                 setup, store) or live


def _attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def _record_attempt(run_dir: Path, record: dict) -> None:
    """Provenance per attempt: each start or resume appends its environment to ``attempts.jsonl``;
    ``environment.json`` keeps the first attempt's (recreated from the log, with a warning, if it vanished). The
    uncommitted package code a record carries goes to ``code_diffs/`` (one file per distinct diff)."""
    record = dict(record)
    code_diff = record.pop("code_diff", None)
    if code_diff is not None:
        diff_path = run_dir / "code_diffs" / f"{record['code_diff_sha256'][:16]}.diff"
        if not diff_path.exists():
            diff_path.parent.mkdir(exist_ok=True)
            atomic_write_bytes(diff_path, code_diff.encode())
    attempts = _attempts(run_dir)
    env_path = run_dir / "environment.json"
    if attempts and not env_path.exists():
        warnings.warn(f"{env_path} was missing; recreated from the first attempt in attempts.jsonl", stacklevel=3)
        atomic_write_json(env_path, attempts[0])
    elif not env_path.exists():
        atomic_write_json(env_path, record)
    lines = "".join(json.dumps(a) + "\n" for a in [*attempts, record])
    atomic_write_bytes(run_dir / "attempts.jsonl", lines.encode())


def _check_or_write_config(run_dir: Path, config: RunConfig) -> None:
    path = run_dir / "config.json"
    payload = {"run_id": config.run_id, "config": config.to_dict()}
    if path.exists():
        stored = read_json(path)
        if stored.get("config") != payload["config"]:
            raise RunError(f"{path} holds a different config than run {config.run_id!r} (edited by hand?). "
                           f"Nothing was deleted: restore it or move the run folder away.")
        return
    atomic_write_json(path, payload)


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())


# ---------------------------------------------------------------------------------------------------------
# Reading results for tables and figures
# ---------------------------------------------------------------------------------------------------------
def load_results(store: RunStore | str | Path | None = None, *, epochs: bool = False, finished_only: bool = True):
    """All stored run summaries as a DataFrame (one row per run, with config columns flattened as
    ``option.<name>``); with ``epochs=True`` a second DataFrame of per-epoch metrics is returned too."""
    import pandas as pd

    store = store if isinstance(store, RunStore) else RunStore(store)
    rows, epoch_rows = [], []
    for run_id in store.run_ids():
        if not (store.run_dir(run_id) / "config.json").exists():
            continue
        summary = store.summary(run_id)
        if finished_only and summary is None:
            continue
        config = store.config(run_id)
        row = {"run_id": run_id, "status": store.status(run_id), "method": config.method,
               "student": config.student, "teacher": config.teacher.student if config.teacher else None,
               "dataset": config.dataset, "preset": config.preset, "seed": config.seed, "epochs": config.epochs,
               "batch_size": config.batch_size, "lr": config.base_lr, "schedule": config.schedule,
               "precision": config.precision}
        row.update({f"option.{k}": (tuple(v) if isinstance(v, list) else v)
                    for k, v in config.method_options.items()})
        row.update({k: v for k, v in (summary or {}).items() if k not in row})
        rows.append(row)
        if epochs:
            for r in store.metrics(run_id):
                epoch_rows.append({"run_id": run_id, "method": config.method, **r})
    frame = pd.DataFrame(rows)
    return (frame, pd.DataFrame(epoch_rows)) if epochs else frame
