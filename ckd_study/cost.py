"""Training cost per method, measured: seconds per step with the live teacher on one device.

The study's runs read the teacher from the exact teacher-output cache, so their own timings say little about what
a method costs when the teacher runs (the efficiency claims of the papers, e.g. CKD needs no memory bank and no
extra head). :func:`measure_training_cost` times ``steps`` real training steps of a run's config (the trainer's
own loop: augmentation, live teacher forward, student forward and backward, the method's loss and extra modules,
the optimiser) after ``warmup`` untimed steps, and reports seconds per step, images per second and the implied
seconds per epoch. Measurements are data: :func:`training_cost` stores each under
``<results>/analysis/<preset>/cost/`` with the machine it ran on, so tables are rebuilt from the record, and a
stored record is reused rather than measured again on another machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .data import DatasetError
from .files import atomic_write_json
from .runs import RunError, RunStore, cpu_name, read_json, utc_now


class _Enough(Exception):
    """Raised from the step hook to end the timed steps."""


def measure_training_cost(config: RunConfig, store: RunStore, *, steps: int = 20, warmup: int = 3,
                          device: Any = None, data_root: str | Path | None = None) -> dict:
    """Time ``steps`` training steps of ``config`` (after ``warmup``), the teacher live; returns the record."""
    from .runs import training_parts
    from .train import LiveTeacher, Trainer

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    setup, data, student, teacher, method = training_parts(config, store, device, data_root)
    source = LiveTeacher(teacher, setup) if teacher is not None else None
    marks: list[float] = []

    def hook(trainer, epoch: int, step: int) -> None:
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        marks.append(time.perf_counter())
        if len(marks) > warmup + steps:
            raise _Enough

    trainer = Trainer(config, data, student, method, source, setup, quiet=True, step_hook=hook)
    steps_per_epoch = len(trainer.train_batches)
    # Within the first epoch (an epoch boundary adds evaluation): a tiny dataset times fewer steps.
    warmup = min(warmup, max(steps_per_epoch - 2, 0))
    steps = min(steps, steps_per_epoch - warmup - 1)
    if steps < 1:
        raise RunError(f"cannot time {config.run_id}: an epoch has only {steps_per_epoch} steps")
    try:
        trainer.fit()
    except _Enough:
        pass
    seconds = (marks[warmup + steps] - marks[warmup]) / steps
    return {"run_id": config.run_id, "method": config.method, "student": config.student,
            "teacher": config.teacher.student if config.teacher is not None else None,
            "batch_size": config.batch_size, "steps_timed": steps, "warmup_steps": warmup,
            "seconds_per_step": seconds, "images_per_s": config.batch_size / seconds,
            "steps_per_epoch": steps_per_epoch, "seconds_per_epoch": seconds * steps_per_epoch,
            "teacher_source": "live" if teacher is not None else None, "device": str(setup.device),
            "precision": setup.precision, "channels_last": setup.channels_last, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "torch": torch.__version__, "measured_at": utc_now(), **method.added_state()}


def added_state(config: RunConfig, *, data_root: str | Path | None = None) -> dict[str, int]:
    """``Method.added_state`` of ``config``'s method: the method built over freshly initialised student and
    teacher models of the configured architectures (only the sizes count, so the teacher's checkpoint is not
    needed) and the configured training set (its size sets CRD's memory bank)."""
    from .methods import create_method
    from .models import create_model
    from .runs import dataset_for

    data = dataset_for(config, torch.device("cpu"), data_root)
    student = create_model(config.student, data.num_classes)
    teacher = None if config.teacher is None else create_model(config.teacher.student, data.num_classes)
    method = create_method(config.method, student, teacher, num_train=len(data.x_train),
                           train_labels=data.y_train, **config.method_options)
    return method.added_state()


def training_cost(config: RunConfig, store: RunStore, folder: Path, *, measure: bool = True, **kwargs: Any
                  ) -> dict | None:
    """The stored cost record of ``config`` in ``folder``, else (``measure``) a new measurement, stored."""
    path = Path(folder) / f"{config.run_id}.json"
    if path.exists():
        record = read_json(path)
        if record.get("run_id") == config.run_id:
            if "method_parameters" not in record:  # measured before records held it: sizes, not timings, added
                try:
                    record.update(added_state(config, data_root=kwargs.get("data_root")))
                except (DatasetError, OSError):  # the sizes need the training set: the table shows "–"
                    return record
                atomic_write_json(path, record)
            return record
    if not measure:
        return None
    record = measure_training_cost(config, store, **kwargs)
    atomic_write_json(path, record)
    return record
