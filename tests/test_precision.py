"""Run precision (bf16 autocast + channels_last, or fp32) and the last partial batch: both part of a run's
identity and records; a bf16 run resumed after a kill ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckd_study.config import ConfigError, RunConfig, make_config, resolve_precision, teacher_config
from ckd_study.data import ImageDataset, load_dataset
from ckd_study.runs import RunStore, load_checkpoint, run
from ckd_study.teacher_cache import cache_path
from ckd_study.train import DeviceSetup, train_batches

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flag, device, expected", [
    ("1", "cpu", "bf16"), ("0", "cpu", "fp32"), ("0", "cuda", "bf16"), ("1", "cuda:1", "bf16")])
def test_auto_precision_follows_the_device(monkeypatch, flag, device, expected):
    monkeypatch.setenv("CKD_CPU_BF16", flag)
    assert resolve_precision("auto", device) == expected
    assert resolve_precision("fp32", device) == "fp32" and resolve_precision("bf16", device) == "bf16"


@pytest.mark.parametrize("native, words, expected", [
    (True, {"AuthenticAMD", "avx512_bf16"}, True),                 # EPYC Zen 4: 1.46-1.60x (RESULTS.md §1h)
    (True, {"GenuineIntel", "avx512_bf16"}, False),                # Xeon without AMX: 0.58-0.79x (RESULTS.md §1e)
    (True, {"GenuineIntel", "avx512_bf16", "amx_bf16", "amx_tile"}, True),   # Xeon with AMX: 1.8x (§1g)
    (False, {"AuthenticAMD", "avx2"}, False),                      # Zen 3: emulated, ~10x slower
    (True, set(), True),                                           # no /proc/cpuinfo: the native probe decides
])
def test_auto_picks_bf16_only_where_it_was_measured_faster(monkeypatch, native, words, expected):
    import ckd_study.config as config_module

    monkeypatch.delenv("CKD_CPU_BF16", raising=False)
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(config_module, "_cpuinfo_words", lambda: set(words))
    assert config_module.bf16_expected_faster(native, set(words)) is expected
    assert resolve_precision("auto", "cpu") == ("bf16" if expected else "fp32")
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setenv("CKD_CPU_BF16", "0" if expected else "1")  # the override wins either way
    assert resolve_precision("auto", "cpu") == ("fp32" if expected else "bf16")


def test_runs_record_the_cpus_bf16_flags(monkeypatch):
    import ckd_study.config as config_module
    from ckd_study.runs import environment_record

    words = {"GenuineIntel", "fpu", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    monkeypatch.setattr(config_module, "_cpuinfo_words", lambda: set(words))
    assert environment_record(DeviceSetup.for_device("cpu", "fp32"))["cpu_bf16_flags"] == \
        ["amx_bf16", "amx_tile", "avx512_bf16"]


def test_stored_configs_hold_the_resolved_precision_and_it_changes_the_run_id(monkeypatch):
    monkeypatch.setenv("CKD_CPU_BF16", "1")
    auto = make_config("smoke", method="kd", device="cpu")
    assert auto.precision == "bf16" and auto.teacher.precision == "bf16"
    assert auto.run_id == make_config("smoke", method="kd", precision="bf16", device="cpu").run_id
    fp32 = make_config("smoke", method="kd", precision="fp32", device="cpu")
    assert fp32.run_id != auto.run_id
    # The student's precision is the student's: the teacher run is the preset's (auto) either way.
    assert fp32.teacher.run_id == auto.teacher.run_id
    monkeypatch.setenv("CKD_CPU_BF16", "0")
    all_fp32 = make_config("smoke", method="kd", precision="fp32", teacher_overrides={"precision": "fp32"})
    assert make_config("smoke", method="kd", device="cpu").run_id == all_fp32.run_id
    with pytest.raises(ConfigError, match="precision"):
        make_config("smoke", precision="fp16")
    with pytest.raises(ConfigError, match="drop_last"):
        RunConfig(dataset="digits", student="resnet8", drop_last="no")


def test_device_setup_per_precision():
    bf16 = DeviceSetup.for_device("cpu", "bf16")
    assert (bf16.autocast_dtype, bf16.channels_last, bf16.precision) == (torch.bfloat16, True, "bf16")
    fp32 = DeviceSetup.for_device("cpu", "fp32")
    # fp32 runs in channels_last too: measured faster on CPU (RESULTS.md §1c).
    assert (fp32.autocast_dtype, fp32.channels_last, fp32.precision) == (None, True, "fp32")
    assert (bf16.compute_key, fp32.compute_key) == ("bf16-channels_last", "fp32-channels_last")
    x = torch.randn(2, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 4, 3)
    with bf16.autocast():
        assert conv(bf16.prepare_images(x)).dtype == torch.bfloat16
    with fp32.autocast():
        out = conv(fp32.prepare_images(x))
        assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    model = fp32.prepare_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def _fake_cifar(n_train: int) -> ImageDataset:
    return ImageDataset("fake", torch.zeros(n_train, 3, 32, 32, dtype=torch.uint8),
                        torch.arange(n_train) % 100, torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                        torch.zeros(1, dtype=torch.int64), [str(i) for i in range(100)], (0.5,) * 3, (0.25,) * 3)


def test_last_partial_batch_is_trained_as_released():
    config = make_config("paper", precision="fp32")
    assert config.drop_last is False
    batches = train_batches(config, _fake_cifar(50_000))
    assert len(batches) == 782  # 781 full batches and the last 50,000 % 64 = 16 images
    sizes = [len(b.labels) for b in batches]
    assert sizes[:-1] == [64] * 781 and sizes[-1] == 16
    assert len(train_batches(config.replace(drop_last=True), _fake_cifar(50_000))) == 781
    # One image left over is dropped: BatchNorm cannot train on a batch of one.
    lone = train_batches(config, _fake_cifar(129))
    assert [len(b.labels) for b in lone] == [64, 64]


def test_bf16_run_records_its_precision_and_caches_per_precision(tmp_path):
    store = RunStore(tmp_path / "results")
    config = make_config("smoke", method="kd", precision="bf16", epochs=1, milestones=(1,), train_per_class=4)
    summary = run(config, store=store, quiet=True)
    run_dir = store.run_dir(config.run_id)
    env = json.loads((run_dir / "environment.json").read_text())
    assert summary["precision"] == env["precision"] == "bf16"
    assert env["autocast_dtype"] == "torch.bfloat16" and env["channels_last"] is True
    teacher_env = json.loads((store.run_dir(config.teacher.run_id) / "environment.json").read_text())
    assert teacher_env["precision"] == config.teacher.precision
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    bf16_cache = cache_path(store.root, summary["teacher_sha256"], data, "bf16-channels_last")
    assert bf16_cache.exists() and bf16_cache.name.endswith("-bf16-channels_last.pt")
    assert not cache_path(store.root, summary["teacher_sha256"], data, "fp32-channels_last").exists()
    # The stored metrics came from bf16 networks: the same config in fp32 trains other numbers.
    fp32 = run(config.replace(precision="fp32"), store=store, quiet=True)
    assert fp32["final_sha256"] != summary["final_sha256"]


def _kill_script(results: Path, kill_epoch: int, kill_step: int) -> str:
    return textwrap.dedent(f"""
        import os, signal
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # the parent's: reductions must split the same way
        from ckd_study.config import make_config
        from ckd_study.runs import RunStore, run
        config = make_config("smoke", method="kd", epochs=3, milestones=(2,), deterministic=True, precision="bf16",
                             train_per_class=8, batch_size=12)
        def hook(trainer, epoch, step):
            if (epoch, step) == ({kill_epoch}, {kill_step}):
                os.kill(os.getpid(), signal.SIGKILL)
        run(config, store=RunStore({str(results)!r}), quiet=True, step_hook=hook)
    """)


@pytest.mark.slow
def test_bf16_resume_after_kill_equals_uninterrupted(tmp_path):
    config = make_config("smoke", method="kd", epochs=3, milestones=(2,), deterministic=True, precision="bf16",
                         train_per_class=8, batch_size=12)
    assert len(train_batches(config, load_dataset("digits").subset(8, 10, seed=0))) == 7  # 80 = 6 x 12 + 8
    reference_store = RunStore(tmp_path / "reference")
    reference = run(config, store=reference_store, quiet=True)
    killed = RunStore(tmp_path / "killed")
    shutil.copytree(reference_store.run_dir(config.teacher.run_id), killed.run_dir(config.teacher.run_id))
    proc = subprocess.run([sys.executable, "-c", _kill_script(killed.root, 2, 7)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    latest = killed.run_dir(config.run_id) / "checkpoints" / "latest.pt"
    assert load_checkpoint(latest)["state"]["epoch"] == 1  # killed in epoch 2, on its last (partial) batch
    resumed = run(config, store=killed, quiet=True)
    for key in ("last_top1", "best_top1", "best_epoch", "final_sha256"):
        assert resumed[key] == reference[key], key
    assert [m["train_loss"] for m in killed.metrics(config.run_id)] == \
        [m["train_loss"] for m in reference_store.metrics(config.run_id)]


def test_teacher_config_precision_is_resolved_too(monkeypatch):
    monkeypatch.setenv("CKD_CPU_BF16", "0")
    assert teacher_config("smoke", device="cpu").precision == "fp32"
    assert teacher_config("smoke", device="cuda").precision == "bf16"


def test_quick_and_medium_name_the_same_runs_on_every_machine(monkeypatch, reproduction_plan):
    """quick's committed outputs and medium's reused teacher were trained in float32: both presets pin fp32, so
    a CPU with or without native bf16, or a GPU, resolves them to the same run ids (smoke keeps ``auto``)."""
    seen = set()
    for flag, device in (("0", "cpu"), ("1", "cpu"), ("0", "cuda")):
        monkeypatch.setenv("CKD_CPU_BF16", flag)
        quick = make_config("quick", method="kd", device=device)
        medium = make_config("medium", method="ckd", device=device)
        seen.add((quick.run_id, quick.teacher.run_id, medium.run_id, medium.teacher.run_id))
        assert {quick.precision, quick.teacher.precision, medium.precision, medium.teacher.precision} == {"fp32"}
    assert len(seen) == 1
    # the teacher is the paper recipe's float32 resnet56: the run the CPU reproduction's frozen plan trains
    assert medium.teacher == RunConfig.from_dict({**reproduction_plan["configs"][0], "teacher": None})
    assert medium.teacher.run_id == teacher_config("paper", "resnet56", precision="fp32").run_id
    # an explicit precision changes the student only; the preset's teacher stays the same run
    assert make_config("medium", method="ckd", precision="bf16").teacher.run_id == medium.teacher.run_id
    monkeypatch.setenv("CKD_CPU_BF16", "1")
    assert make_config("smoke", method="kd", device="cpu").precision == "bf16"
