"""import-teacher: the released teacher checkpoint formats load strictly into our zoo, the measured accuracy is
the model's own, the stored teacher run is the one distillation runs use, and bad files give one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckd_study.config import make_config, teacher_config
from ckd_study.data import load_dataset
from ckd_study.models import create_model
from ckd_study.runs import RunStore, run
from ckd_study.teachers import TeacherImportError, accuracy_note, import_teacher, read_state_dict
from ckd_study.train import DeviceSetup, evaluate

REPO = Path(__file__).resolve().parent.parent


def _weights(model: str = "resnet14", seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model(model, 10).state_dict()


FORMATS = {
    # RepDistiller's train_teacher.py: {'epoch', 'model', 'accuracy', 'optimizer'}.
    "model": lambda sd: {"epoch": 240, "model": sd, "accuracy": torch.tensor(72.3), "optimizer": {"state": {}}},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 240},
    "bare": lambda sd: sd,
    "model+module.": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_released_format_reads_back_the_same_weights(tmp_path, fmt):
    sd = _weights()
    path = tmp_path / "ckpt.pth"
    torch.save(FORMATS[fmt](sd), path)
    weights, found = read_state_dict(path)
    assert found == fmt
    assert weights.keys() == sd.keys() and all(torch.equal(weights[k], sd[k]) for k in sd)


def test_imported_teacher_is_measured_stored_and_used_by_students(tmp_path):
    store = RunStore(tmp_path / "results")
    sd = _weights()
    path = tmp_path / "resnet14_vanilla.pth"
    torch.save(FORMATS["model"](sd), path)
    summary = import_teacher(path, "resnet14", preset="smoke", store=store)
    config = teacher_config("smoke", "resnet14")
    assert summary["run_id"] == config.run_id and store.status(config.run_id) == "finished"
    # The measured accuracy is the model's own on the preset's test set, computed independently here.
    model = create_model("resnet14", 10)
    model.load_state_dict(sd)
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    expected = evaluate(model.eval(), data, DeviceSetup.for_device("cpu", config.precision))
    assert summary["last_top1"] == expected["top1"] and summary["last_top5"] == expected["top5"]
    assert summary["imported"]["format"] == "model" and summary["imported"]["file"] == path.name
    assert len(summary["imported"]["file_sha256"]) == 64
    loaded = store.load_model(config.run_id)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    # A distillation run with that teacher uses the imported weights and trains no teacher.
    student = run(make_config("smoke", method="kd", epochs=1, milestones=(1,)), store=store, quiet=True)
    assert student["teacher_sha256"] == summary["final_sha256"]
    assert student["teacher_top1"] == summary["last_top1"]
    with pytest.raises(TeacherImportError, match="already exists"):
        import_teacher(path, "resnet14", preset="smoke", store=store)
    assert accuracy_note(summary)[1] is False  # no published number for a digits teacher


def test_accuracy_note_warns_beyond_one_point():
    summary = {"last_top1": 70.0, "imported": {"published_top1": 72.34}}
    note, off = accuracy_note(summary)
    assert off and "published 72.34%" in note and "-2.34 pp" in note
    assert accuracy_note({"last_top1": 72.0, "imported": {"published_top1": 72.34}})[1] is False


@pytest.mark.parametrize("make_file, message", [
    (lambda p: torch.save(_weights("resnet8"), p), "is not a resnet14 checkpoint (missing"),
    (lambda p: torch.save({k: v for k, v in _weights().items() if not k.startswith("fc.")}, p), "missing 2 keys"),
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot be read"),
    (lambda p: torch.save({"epoch": 3}, p), "has no weights"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, make_file, message):
    path = tmp_path / "bad.pth"
    make_file(path)
    with pytest.raises(TeacherImportError, match=message.replace("(", r"\(")) as info:
        import_teacher(path, "resnet14", preset="smoke", store=RunStore(tmp_path / "results"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())


def test_wrong_class_count_is_named(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "c100.pth"
    torch.save(create_model("resnet14", 100).state_dict(), path)
    with pytest.raises(TeacherImportError, match="does not fit resnet14 for 10 classes: size mismatch"):
        import_teacher(path, "resnet14", preset="smoke", store=RunStore(tmp_path / "results"))


def test_cli_import_teacher(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"state_dict": _weights()}, path)
    proc = subprocess.run([sys.executable, "-m", "ckd_study", "--results-dir", str(tmp_path / "results"),
                           "import-teacher", str(path), "--model", "resnet14", "--preset", "smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"imported t.pth (state_dict) as teacher run {teacher_config('smoke', 'resnet14').run_id}" in proc.stdout
