"""Import the standard CIFAR-100 teacher checkpoints instead of training a teacher.

RepDistiller, mdistiller and CKD distribute the same teachers (``cifar_teachers.tar``: resnet56, resnet110,
resnet32x4, wrn_40_2, vgg13, ResNet50, ...). Their files are ``torch.save``d dicts holding the weights under
``model`` (RepDistiller's ``{'epoch', 'model', 'accuracy', 'optimizer'}``) or ``state_dict``, or a bare state
dict; weights saved from ``nn.DataParallel`` carry a ``module.`` prefix. Our zoo uses their parameter names
(MobileNetV2 included), so the weights load strictly.

:func:`import_teacher` loads such a file into our model, measures test top-1/top-5, and stores it as the
finished teacher run of the preset's teacher config (the run ``train`` and the study would otherwise train), so
every distillation run of that teacher uses it. The stored summary names the source file, its format and
sha256, and the published accuracy beside the measured one.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, teacher_config
from .models import create_model
from .published import published_teacher_top1
from .files import atomic_torch_save, atomic_write_json, sha256_json
from .runs import (CHECKPOINT_FORMAT, RunError, RunStore, _check_or_write_config, _record_attempt, _write_metrics,
                   dataset_for, environment_record, run_lock, utc_now)

PUBLISHED_TOLERANCE_PP = 1.0  # warn when the measured top-1 is further than this from the published one


class TeacherImportError(RunError):
    """A teacher checkpoint cannot be imported (unreadable, another architecture, missing keys)."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights in a teacher checkpoint file and the name of its format (``model``, ``state_dict``,
    ``bare``, each with ``+module.`` when a DataParallel prefix was stripped)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherImportError(f"teacher checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" not in str(exc):
            raise TeacherImportError(f"teacher checkpoint {path} cannot be read ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0]}); is it a torch.save file?") from None
        # Older checkpoints pickle numpy scalars beside the weights (e.g. the accuracy): a full unpickle.
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise TeacherImportError(f"teacher checkpoint {path} cannot be read ({type(exc2).__name__}: "
                                     f"{str(exc2).splitlines()[0]})") from None
        warnings.warn(f"{path} holds more than tensors; it was loaded with weights_only=False (only import files "
                      f"you trust)", stacklevel=2)
    if not isinstance(payload, dict):
        raise TeacherImportError(f"teacher checkpoint {path} holds a {type(payload).__name__}, not a state dict")
    fmt = "bare"
    for key in ("model", "state_dict"):
        if isinstance(payload.get(key), dict):
            payload, fmt = payload[key], key
            break
    if not payload or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise TeacherImportError(f"teacher checkpoint {path} has no weights: expected a state dict, or a dict with "
                                 f"'model' or 'state_dict' holding one")
    if all(k.startswith("module.") for k in payload):
        payload, fmt = {k[len("module."):]: v for k, v in payload.items()}, fmt + "+module."
    return payload, fmt


def import_teacher(path: str | Path, model: str, *, preset: str = "paper", store: RunStore | None = None,
                   device: str | None = None, precision: str | None = None, data_root: str | Path | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Store the weights in ``path`` as the finished teacher run of ``teacher_config(preset, model)``.

    The config (and so the run id) is the one ``train --preset PRESET --teacher MODEL`` resolves with the same
    ``device``/``precision``. Returns the run's summary; raises :class:`TeacherImportError` with one line naming
    the problem, and refuses to replace a teacher run that already finished (remove its folder first).
    """
    from .train import DeviceSetup, evaluate

    store = store or RunStore()
    overrides = {"precision": precision} if precision else {}
    config: RunConfig = teacher_config(preset, model, seed=seed, device=device, **overrides)
    run_dir = store.run_dir(config.run_id)
    if (run_dir / "summary.json").exists():
        raise TeacherImportError(f"teacher run {config.run_id} already exists in {store.root / 'runs'}; remove "
                                 f"{run_dir} to replace it with {Path(path).name}")
    weights, fmt = read_state_dict(path)
    file_sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    setup = DeviceSetup.for_device(device, config.precision)
    data = dataset_for(config, setup.device, data_root)
    net = create_model(model, data.num_classes)
    try:
        result = net.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # same names, other shapes (e.g. another width or class count)
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise TeacherImportError(f"{Path(path).name} does not fit {model} for {data.num_classes} classes: {first}; "
                                 f"check --model and the dataset") from None
    if result.missing_keys or result.unexpected_keys:
        shown = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        problems = ([f"missing {len(result.missing_keys)} keys: {shown(result.missing_keys)}"] if result.missing_keys
                    else []) + ([f"unexpected {len(result.unexpected_keys)} keys: {shown(result.unexpected_keys)}"]
                                if result.unexpected_keys else [])
        raise TeacherImportError(f"{Path(path).name} is not a {model} checkpoint ({'; '.join(problems)}); "
                                 f"check --model (`python -m ckd_study models` lists the zoo)")

    with run_lock(run_dir):
        _check_or_write_config(run_dir, config)
        started = time.perf_counter()
        test = evaluate(setup.prepare_model(net).eval(), data, setup)
        seconds = time.perf_counter() - started
        record = {"epoch": config.epochs, "imported": True, **{f"test_{k}": v for k, v in test.items()},
                  "eval_time_s": seconds}
        _write_metrics(run_dir, [record])
        _record_attempt(run_dir, environment_record(setup))
        final = {"format": CHECKPOINT_FORMAT, "run_id": config.run_id, "model_name": model,
                 "num_classes": data.num_classes, "model": net.cpu().state_dict()}
        final_sha = atomic_torch_save(final, run_dir / "checkpoints" / "final.pt")
        published = published_teacher_top1(model) if config.dataset == "cifar100" else None
        summary = {
            "run_id": config.run_id, "status": "finished", "method": "ce", "student": model, "teacher": None,
            "teacher_run_id": None, "teacher_sha256": None, "teacher_top1": None, "dataset": config.dataset,
            "preset": config.preset, "seed": config.seed, "epochs": config.epochs,
            "last_top1": test["top1"], "last_top5": test["top5"], "best_top1": test["top1"],
            "best_top5": test["top5"], "best_epoch": config.epochs, "train_time_s": 0.0, "wall_time_s": seconds,
            "images_per_s": None, "teacher_source": None, "final_sha256": final_sha, "finished_at": utc_now(),
            "device": str(setup.device), "precision": setup.precision,
            "config_sha256": sha256_json(config.to_dict()),
            "imported": {"file": Path(path).name, "format": fmt, "file_sha256": file_sha,
                         "published_top1": published},
        }
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


def accuracy_note(summary: dict) -> tuple[str, bool]:
    """A line comparing the measured and the published top-1, and whether they differ by more than 1 pp."""
    published = summary["imported"]["published_top1"]
    measured = summary["last_top1"]
    if published is None:
        return f"measured top-1 {measured:.2f}% (no published number for this teacher)", False
    off = abs(measured - published) > PUBLISHED_TOLERANCE_PP
    return (f"measured top-1 {measured:.2f}%, published {published:.2f}% (methods.md §5), "
            f"Δ {measured - published:+.2f} pp", off)
