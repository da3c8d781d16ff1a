#!/usr/bin/env python
"""Training-speed benchmark: our engine against the conventional KD training loop, side by side.

Usage:  python benchmarks/bench_training.py [--steps N] [--warmup N] [--batch-size 64]
            [--teacher resnet32x4] [--student resnet8x4] [--workers 2] [--threads N] [--device cpu|cuda]
            [--data-dir DIR] [--dataset cifar100|cifar10|digits|synthetic] [--json PATH] [--compile]
            [--variants reference,ours_live,ours_cached] [--rounds R] [--in-process]
        ``make bench`` runs it with the defaults (CPU: 3 rounds of 12 timed steps of 64 after 2 warm-up steps
        per variant, about 5 minutes in all on 2 cores; CUDA: 1 round of 200 after 20).

The variants train the same pair (default resnet32x4 -> resnet8x4) with CKD (the study's per-pair options,
lambda=100, tau=1 for this pair), the same batch size, the same SGD recipe, on the same images (a fixed random
choice of ``(warmup + steps) * batch_size`` CIFAR-100 training images, so that no loop pays for images it does
not use), for ``warmup`` untimed steps and then ``steps`` timed ones:

reference    the conventional loop (``benchmarks/reference_loop.py``, RepDistiller's ``train_distill``):
             torchvision's CIFAR100 dataset class with PIL transforms (RandomCrop(32, padding=4),
             RandomHorizontalFlip, ToTensor, Normalize) in ``--workers`` DataLoader processes, float32 eager,
             the teacher forward every step under no_grad, CE + CKD, SGD.
ours_live    our engine built the way ``ckd_study.runs.run`` builds it (create_model / create_method /
             DeviceSetup / Trainer): device-resident uint8 images, on-device augmentation (BatchIterator),
             ``Trainer.train_epoch``, the live teacher, at the run's resolved precision (bf16: autocast +
             channels_last, DeviceSetup), and with ``--compile`` a compiled student.
ours_cached  the same with the exact teacher-output cache (``ckd_study.teacher_cache.CachedTeacher``) warm: an
             untimed pass over the epoch's batches fills exactly the views the timed steps use (the lazy fill a
             run does on first sight of a view; it is timed separately and reported per image-view), then
             the timed epoch replays the same (seed, epoch) plan, so every timed step is a cache hit (the hit
             rate is measured and reported).

Rounds: each round runs every variant once, in the given order in odd rounds and reversed in even ones, and
each variant reports its median round (all rounds are kept in the JSON, with the per-round paired ratios): on a
shared CPU the throughput drifts by tens of percent within minutes, which one pass in a fixed order would fold
into the ratio.

Every variant runs in a fresh subprocess (``--in-process`` runs them in this one), so its peak memory is its
own: on CPU the peak resident set of the process (VmHWM of /proc/self/status; ``ru_maxrss`` of a freshly
exec'd process would include the launching process, Linux keeps the pre-exec high-water mark) and, for the
reference, of its DataLoader workers; on CUDA ``torch.cuda.max_memory_allocated``.

Arithmetic: ``torch.utils.flop_counter.FlopCounterMode`` counts (once per model) the teacher's forward and the
student's forward+backward per image (convolutions and matrix products; normalisation and element-wise
operations are not counted). "Useful" GFLOP/s credits every variant with teacher forward + student
forward/backward per image, since the cache delivers the same teacher outputs; "executed" counts what ran
(the cached variant does not run the teacher on hits). The teacher has random weights: the speed of a
forward pass does not depend on the weights.

Output: a markdown table on stdout and a JSON file (default ``benchmarks/results/bench_training_<device>.json``).
On CPU the targets are ours_live / reference >= 2x and ours_cached / reference >= 5x at the precision ``auto``
resolves to (bf16 where the CPU computes it natively, else fp32; ``--variants`` adds ``ours_*_fp32`` /
``ours_*_bf16`` for a side-by-side comparison); whether they are met is printed. No test asserts timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ckd_study.config import make_config  # noqa: E402
from ckd_study.data import (CIFAR100_MEAN, CIFAR100_STD, NUM_VIEWS, DatasetError,  # noqa: E402
                            ImageDataset, available_datasets, load_dataset)
from ckd_study.methods import create_method  # noqa: E402
from ckd_study.models import create_model  # noqa: E402
from ckd_study.runs import cpu_name  # noqa: E402
from ckd_study.teacher_cache import CachedTeacher, TeacherOutputCache  # noqa: E402
from ckd_study.train import DeviceSetup, LiveTeacher, Trainer  # noqa: E402

# ours_live / ours_cached run at the precision "auto" resolves to on the device; the suffixed ones at that precision.
VARIANTS = ("reference", "ours_live", "ours_cached", "ours_live_fp32", "ours_cached_fp32", "ours_live_bf16",
            "ours_cached_bf16")
FULL_TRAIN_IMAGES = 50_000
RUN_EPOCHS = 240
CPU_TARGETS = {"ours_live": 2.0, "ours_cached": 5.0}  # images/s over the reference's, on CPU (issue 11)
DEFAULT_STEPS = {"cpu": (12, 2), "cuda": (200, 20)}  # (timed steps, warm-up steps) per device type
# Rounds per variant: a shared CPU drifts by tens of percent within minutes (load from other tenants,
# clock changes), so CPU variants run in alternating order over several rounds and the median round counts.
DEFAULT_ROUNDS = {"cpu": 3, "cuda": 1}
SEED = 0


# ---------------------------------------------------------------------------------------------------------
# small helpers: clocks, memory
# ---------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kb(pid: int | str, field: str, name: str = "status") -> int | None:
    """A ``kB`` field of /proc/<pid>/<name> (Linux), else None."""
    try:
        with open(f"/proc/{pid}/{name}") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024.0


def _ru_maxrss_mb(who: int) -> float:
    value = resource.getrusage(who).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024.0  # bytes on macOS, kB on Linux


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = _proc_kb("self", "VmHWM")
    return _mb(hwm) if hwm is not None else _ru_maxrss_mb(resource.RUSAGE_SELF)


def current_rss_mb() -> float | None:
    return _mb(_proc_kb("self", "VmRSS"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); used only by --in-process."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _worker_memory(iterator) -> dict:
    """Peak RSS and private memory of a DataLoader iterator's live worker processes."""
    peaks, private = [], 0.0
    for w in getattr(iterator, "_workers", []) or []:
        pid = getattr(w, "pid", None)
        if pid is None:
            continue
        peak = _proc_kb(pid, "VmHWM")
        if peak is not None:
            peaks.append(peak / 1024.0)
        priv = [_proc_kb(pid, f, "smaps_rollup") for f in ("Private_Clean", "Private_Dirty")]
        private += sum(p for p in priv if p is not None) / 1024.0
    return {"workers_peak_rss_mb": peaks, "workers_private_mb": private if peaks else 0.0}


class StepTimer:
    """Clock marks taken after optimisation steps: at the end of the warm-up and of the last step (with a
    CUDA synchronisation there); on CPU after every step too (free there), for per-step statistics."""

    def __init__(self, warmup: int, total: int, device: torch.device, on_warm=None) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.every_step = device.type != "cuda"
        self.on_warm = on_warm
        self.marks: dict[int, float] = {}

    def __call__(self, step: int) -> None:
        if step in (self.warmup, self.total) or (self.every_step and step > self.warmup):
            _sync(self.device)
            self.marks[step] = time.perf_counter()
        if step == self.warmup and self.on_warm is not None:
            self.on_warm()

    def result(self, batch_size: int) -> dict:
        if self.warmup not in self.marks or self.total not in self.marks:
            raise RuntimeError(f"the loop stopped before step {self.total} (marks at {sorted(self.marks)})")
        steps = self.total - self.warmup
        seconds = self.marks[self.total] - self.marks[self.warmup]
        out = {"timed_steps": steps, "images_timed": steps * batch_size, "seconds": seconds,
               "images_per_s": steps * batch_size / seconds, "step_ms_mean": 1e3 * seconds / steps,
               "step_ms_median": None, "images_per_s_median": None}
        if self.every_step:
            ticks = [self.marks[s] for s in range(self.warmup, self.total + 1)]
            deltas = [b - a for a, b in zip(ticks, ticks[1:])]
            median = statistics.median(deltas)
            out.update(step_ms_median=1e3 * median, images_per_s_median=batch_size / median,
                       step_ms=[round(1e3 * d, 2) for d in deltas])
        return out


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """$CKD_DATA_DIR, else ../shared/datasets next to the repo if it exists, else <repo>/data."""
    env = os.environ.get("CKD_DATA_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    shared = REPO.parent / "shared" / "datasets"
    return shared if shared.is_dir() else REPO / "data"


def synthetic_dataset(n: int, num_classes: int = 100, seed: int = SEED) -> ImageDataset:
    """Random uint8 images with CIFAR-100's shape, classes and normalisation (tests; speed is data-blind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return ImageDataset("synthetic", x, y, x[:1].clone(), y[:1].clone(), [str(c) for c in range(num_classes)],
                        CIFAR100_MEAN, CIFAR100_STD)


def benchmark_subset(dataset: str, data_dir: Path, num_images: int) -> dict:
    """A fixed random choice (seed 0, kept in dataset order) of ``num_images`` training images, on the CPU.

    A random choice rather than the first images: the npz shards are sorted by class.
    """
    if dataset == "synthetic":
        data = synthetic_dataset(num_images)
    else:
        data = load_dataset(dataset, root=data_dir)
    n = len(data.x_train)
    if n < num_images:
        raise SystemExit(f"{data.name} has {n} training images, the benchmark needs (warmup + steps) * batch_size "
                         f"= {num_images}: lower --steps, --warmup or --batch-size")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))[:num_images].sort().values
    return {"name": data.name, "x": data.x_train[idx].cpu().contiguous(), "y": data.y_train[idx].cpu().contiguous(),
            "classes": list(data.classes), "mean": tuple(data.mean), "std": tuple(data.std),
            "source_train_images": n}


def subset_dataset(subset: dict, device: torch.device | str = "cpu") -> ImageDataset:
    x, y = subset["x"], subset["y"]
    # the test split is never touched by the timed loops; one image keeps ImageDataset valid
    data = ImageDataset(subset["name"], x, y, x[:1].clone(), y[:1].clone(), subset["classes"], subset["mean"],
                        subset["std"])
    return data.to(device)


# ---------------------------------------------------------------------------------------------------------
# the pair, as run() builds it
# ---------------------------------------------------------------------------------------------------------
def variant_precision(variant: str) -> str:
    """``ours_live_fp32`` -> ``fp32``; the unsuffixed variants run at ``auto`` (resolved for the device)."""
    suffix = variant.rsplit("_", 1)[-1]
    return suffix if suffix in ("fp32", "bf16") else "auto"


def default_variants(device: str) -> list[str]:
    """reference, ours_live, ours_cached at the resolved precision, plus fp32 beside them when that is bf16."""
    from ckd_study.config import resolve_precision

    extra = ["ours_live_fp32", "ours_cached_fp32"] if resolve_precision("auto", device) != "fp32" else []
    return ["reference", "ours_live", "ours_cached", *extra]


def engine_config(settings: dict, dataset_name: str, precision: str = "auto"):
    """The run config of the benchmark's distillation run (paper preset: SGD 0.05 / 0.9 / 5e-4, CKD with the
    study's per-pair options) at ``precision``."""
    base = dataset_name.split("[")[0]
    return make_config("paper", method="ckd", teacher=settings["teacher"], student=settings["student"],
                       batch_size=settings["batch_size"], compile=bool(settings["compile"]), seed=SEED,
                       dataset=base if base in available_datasets() else "cifar100", precision=precision,
                       device=settings.get("device"))


def build_engine(config, data: ImageDataset, setup: DeviceSetup, *, cached: bool, step_hook=None
                 ) -> tuple[Trainer, TeacherOutputCache | None]:
    """Student, method, teacher source and Trainer exactly as ``ckd_study.runs.run`` builds them, except that
    the teacher has random weights (no trained teacher run needed) and the cache lives only in memory."""
    torch.manual_seed(config.seed)
    student = create_model(config.student, data.num_classes)
    teacher = create_model(config.teacher.student, data.num_classes)  # random weights: speed is weight-blind
    method = create_method(config.method, student, teacher, num_train=len(data.x_train), **config.method_options)
    teacher = setup.prepare_model(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    live = LiveTeacher(teacher, setup)
    cache = None
    source = live
    if cached:
        dims = {"logits": teacher.num_classes, "pooled": teacher.pooled_dim}
        cache = TeacherOutputCache(len(data.x_train), dims, setup.device)
        source = CachedTeacher(live, cache, path=None)
    trainer = Trainer(config, data, student, method, source, setup, quiet=True, step_hook=step_hook)
    return trainer, cache


def reference_models(config, num_classes: int):
    """The same initial weights as :func:`build_engine` (same seed, same creation order)."""
    torch.manual_seed(config.seed)
    student = create_model(config.student, num_classes)
    teacher = create_model(config.teacher.student, num_classes)
    return student, teacher


def reference_distiller(config, student, teacher, device):
    from reference_loop import ReferenceDistiller

    o = config.method_options
    return ReferenceDistiller(student, teacher, device=device, weight=o["weight"], temperature=o["temperature"],
                              ce_weight=o["ce_weight"],
                              ckd_options={"anchor": o["anchor"], "negatives": o["negatives"],
                                           "terms": tuple(o["terms"])},
                              lr=config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------------------
# one variant (runs in its own process unless --in-process)
# ---------------------------------------------------------------------------------------------------------
def run_variant(variant: str, subset: dict, settings: dict) -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    device = torch.device(settings["device"])
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup, steps, batch_size = settings["warmup"], settings["steps"], settings["batch_size"]
    total = warmup + steps
    config = engine_config(settings, subset["name"], variant_precision(variant))
    rec: dict = {"variant": variant, "threads": torch.get_num_threads(),
                 "precision": "fp32" if variant == "reference" else config.precision}
    log = lambda msg: print(f"[{variant}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    if variant == "reference":
        from reference_loop import InMemoryCIFAR100, cifar_train_transform, make_train_loader, train_distill

        student, teacher = reference_models(config, len(subset["classes"]))
        distiller = reference_distiller(config, student, teacher, device)
        cudnn_benchmark = torch.backends.cudnn.benchmark
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as RepDistiller's train_student.py
        x_hwc = subset["x"].permute(0, 2, 3, 1).contiguous().numpy()
        dataset = InMemoryCIFAR100(x_hwc, subset["y"].tolist(), subset["classes"],
                                   cifar_train_transform(subset["mean"], subset["std"]))
        loader = make_train_loader(dataset, batch_size, settings["workers"], device, seed=SEED)
        if len(loader) < total:
            raise RuntimeError(f"the loader has {len(loader)} batches, {total} are needed")
        timer = StepTimer(warmup, total, device)
        workers: dict = {}

        def on_step(step: int, iterator) -> None:
            timer(step)
            if step == total:
                workers.update(_worker_memory(iterator))

        rec["rss_before_loop_mb"] = current_rss_mb()
        log(f"{total} steps ({warmup} warm-up), {settings['workers']} DataLoader workers")
        done = train_distill(loader, distiller, max_steps=total, on_step=on_step)
        torch.backends.cudnn.benchmark = cudnn_benchmark  # (matters only with --in-process)
        rec.update(timer.result(batch_size))
        rec.update(workers or {"workers_peak_rss_mb": [], "workers_private_mb": 0.0})
        rec.update(steps_done=done, mean_train_loss=distiller.mean_loss, teacher_forwards_per_image=1.0,
                   data_pipeline="torchvision CIFAR100 + PIL transforms in DataLoader workers",
                   execution="float32 eager, NCHW", workers=settings["workers"])
    else:
        setup = DeviceSetup.for_device(device, config.precision)
        data = subset_dataset(subset, setup.device)
        cached = variant == "ours_cached"
        snap: dict = {}
        cache_ref: list = []

        def on_warm() -> None:
            if cache_ref and cache_ref[0] is not None:
                snap.update(hits=cache_ref[0].hits, misses=cache_ref[0].misses)

        timer = StepTimer(warmup, total, device, on_warm=on_warm)
        trainer, cache = build_engine(config, data, setup, cached=cached,
                                      step_hook=lambda tr, epoch, step: timer(step))
        cache_ref.append(cache)
        if len(trainer.train_batches) < total:
            raise RuntimeError(f"the iterator has {len(trainer.train_batches)} batches, {total} are needed")
        rec["rss_before_loop_mb"] = current_rss_mb()
        if cached:
            # The lazy fill, untimed for the steps: the teacher source sees every batch of epoch 1 once, which
            # fills exactly the (sample, view) keys the timed epoch (the same seeded plan) will look up.
            log(f"filling the teacher cache for the {len(data.x_train)} image-views of the timed epoch")
            batches = trainer.train_batches
            batches.set_epoch(1)
            _sync(setup.device)
            t0 = time.perf_counter()
            for batch in batches:
                trainer.teacher_source(batch)
            _sync(setup.device)
            fill_s = time.perf_counter() - t0
            filled = int(cache.filled.sum())
            cache.hits = cache.misses = 0
        log(f"{total} steps ({warmup} warm-up) of Trainer.train_epoch")
        record = trainer.train_epoch(1)
        rec.update(timer.result(batch_size))
        rec.update(mean_train_loss=record["train_loss"], steps_done=len(trainer.train_batches),
                   data_pipeline="device-resident uint8 + on-device augmentation (BatchIterator)",
                   execution=(f"autocast {setup.autocast_dtype}" if setup.autocast_dtype else "float32")
                   + (", channels_last" if setup.channels_last else "") + (", compiled student" if config.compile
                                                                            else ", eager"),
                   workers=0, workers_peak_rss_mb=[], workers_private_mb=0.0)
        if cached:
            hits = cache.hits - snap.get("hits", 0)
            misses = cache.misses - snap.get("misses", 0)
            entry_bytes = 2 * sum(cache.dims.values())  # float16 per value
            rec["teacher_forwards_per_image"] = misses / max(hits + misses, 1)
            rec["cache"] = {
                "hit_rate_timed": hits / max(hits + misses, 1), "hits_timed": hits, "misses_timed": misses,
                "hit_rate_epoch": cache.hits / max(cache.hits + cache.misses, 1),
                "fill_views": filled, "fill_seconds": fill_s, "fill_s_per_view": fill_s / max(filled, 1),
                "fill_views_per_s": filled / fill_s if fill_s > 0 else None, "fill_batch_size": batch_size,
                "table_mb": cache.num_samples * NUM_VIEWS * (entry_bytes + 1) / 2**20,
                "table_full_train_gb": FULL_TRAIN_IMAGES * NUM_VIEWS * (entry_bytes + 1) / 2**30,
                "dims": dict(cache.dims),
            }
        else:
            rec["teacher_forwards_per_image"] = 1.0
    _sync(device)
    rec["peak_rss_mb"] = peak_rss_mb()
    rec["ru_maxrss_mb"] = _ru_maxrss_mb(resource.RUSAGE_SELF)
    rec["children_ru_maxrss_mb"] = _ru_maxrss_mb(resource.RUSAGE_CHILDREN)
    rec["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    log(f"{rec['images_per_s']:.1f} images/s")
    return rec


def _child_main(child_dir: Path, variant: str) -> None:
    settings = json.loads((child_dir / "settings.json").read_text())
    subset = torch.load(child_dir / "subset.pt", weights_only=False)
    rec = run_variant(variant, subset, settings)
    rec["memory_isolated"] = True
    (child_dir / f"{variant}.json").write_text(json.dumps(rec))


def _spawn(child_dir: Path, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(child_dir), "--_variant", variant]
    proc = subprocess.run(cmd, cwd=str(REPO))
    out = child_dir / f"{variant}.json"
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"variant {variant} failed (exit status {proc.returncode}); its output is above")
    return json.loads(out.read_text())


def median_round(recs: list[dict]) -> dict:
    """The record of a variant's median round by images/s (the lower median for an even count), with every
    round's throughput attached so that the spread stays visible."""
    ranked = sorted(recs, key=lambda rec: rec["images_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["rounds"] = [{"round": rec["round"], "images_per_s": rec["images_per_s"],
                         "step_ms_mean": rec["step_ms_mean"], "peak_rss_mb": rec["peak_rss_mb"]} for rec in recs]
    chosen["images_per_s_rounds"] = [rec["images_per_s"] for rec in recs]
    return chosen


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------
def count_flops(teacher: str, student: str, num_classes: int, batch: int = 2) -> dict:
    """Counted FLOPs per image: teacher forward (eval, no_grad), student forward and forward+backward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(SEED)
    t_model = create_model(teacher, num_classes).eval()
    s_model = create_model(student, num_classes).train()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        t_model(x)
    t_fwd = fc.get_total_flops() / batch
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        s_model(x)
    s_fwd = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc:
        s_model(x).logits.sum().backward()
    s_fb = fc.get_total_flops() / batch
    return {"teacher_forward": t_fwd, "student_forward": s_fwd, "student_forward_backward": s_fb,
            "useful_per_image": t_fwd + s_fb, "counted": "convolutions and matrix products (FlopCounterMode)"}


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def distinct_views(epochs: int) -> float:
    """Expected number of distinct views of one image among ``epochs`` uniform draws from the 162 views."""
    return NUM_VIEWS * (1.0 - (1.0 - 1.0 / NUM_VIEWS) ** epochs)


def summarize(results: dict, flops: dict, settings: dict, meta: dict) -> dict:
    useful = flops["useful_per_image"]
    for name, r in results.items():
        ips = r["images_per_s"]
        executed = flops["student_forward_backward"] + r["teacher_forwards_per_image"] * flops["teacher_forward"]
        r["useful_gflop_per_s"] = useful * ips / 1e9
        r["executed_gflop_per_s"] = executed * ips / 1e9
        r["executed_gflop_per_image"] = executed / 1e9
        r["seconds_per_epoch_50k"] = FULL_TRAIN_IMAGES / ips
        r["projected_240_epochs_h"] = RUN_EPOCHS * FULL_TRAIN_IMAGES / ips / 3600
        if name == "reference":
            continue
        if "reference" in results:
            r["speedup_vs_reference"] = ips / results["reference"]["images_per_s"]
    cached = results.get("ours_cached")
    if cached is not None:
        c = cached["cache"]
        views = distinct_views(RUN_EPOCHS)
        fill_run_s = FULL_TRAIN_IMAGES * views * c["fill_s_per_view"]
        c["distinct_views_per_image_240_epochs"] = views
        c["lazy_fill_seconds_240_epochs_50k"] = fill_run_s
        c["fill_all_seconds_50k"] = FULL_TRAIN_IMAGES * NUM_VIEWS * c["fill_s_per_view"]
        cached["projected_240_epochs_cold_cache_h"] = cached["projected_240_epochs_h"] + fill_run_s / 3600
    ratios = {f"{n}/reference": results[n]["images_per_s"] / results["reference"]["images_per_s"]
              for n in results if n != "reference" and "reference" in results}
    device_type = settings["device"].split(":")[0]
    target = None
    checked = {v: t for v, t in CPU_TARGETS.items() if f"{v}/reference" in ratios}
    if device_type == "cpu" and checked:
        target = {"metric": "images/s over the reference's, at the resolved precision",
                  "thresholds": checked, "ratios": {v: ratios[f"{v}/reference"] for v in checked},
                  "met": all(ratios[f"{v}/reference"] >= t for v, t in checked.items())}
    notes = [
        "teacher weights are random: the speed of a forward pass does not depend on the weights",
        "useful GFLOP/s credit every variant with teacher forward + student forward/backward per image "
        "(the cache delivers the same teacher outputs); executed GFLOP/s count only what ran",
        "FLOPs: convolutions and matrix products of the networks counted by torch.utils.flop_counter; "
        "normalisation, element-wise ops and the loss (O(B^2 C)) are not counted",
        "peak_rss_mb: the variant process's own peak RSS (VmHWM of /proc/self/status); workers_peak_rss_mb / "
        "workers_private_mb: its DataLoader workers at the last step (a forked worker's RSS counts the pages it "
        "shares with the main process, so its private memory is the better measure of what it adds)",
        "ru_maxrss_mb / children_ru_maxrss_mb: getrusage(RUSAGE_SELF / RUSAGE_CHILDREN) as reported; on Linux "
        "a freshly exec'd process inherits the launcher's high-water mark and a child's includes the pages it "
        "was forked with (and any helper subprocess), so prefer peak_rss_mb and workers_private_mb",
        "ours_cached's peak memory includes the dense float16 cache table of the benchmark's images "
        "(cache.table_mb); a full run holds cache.table_full_train_gb",
        f"seconds_per_epoch_50k / projected_240_epochs_h extrapolate images/s to {FULL_TRAIN_IMAGES} images "
        f"and {RUN_EPOCHS} epochs (training steps only, no evaluation)",
    ]
    if device_type == "cpu":
        notes.append("CPU timings on a shared machine are inflated by other processes; compare variants of one "
                     "invocation, on a quiet machine")
    return {"benchmark": "bench_training", **meta, "settings": settings, "flops_per_image": flops,
            "variants": results, "ratios": ratios, "target": target, "notes": notes}


def _fmt(v, digits=1, unit=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}{unit}"


def markdown(report: dict) -> str:
    s, f, res = report["settings"], report["flops_per_image"], report["variants"]
    cuda = s["device"].startswith("cuda")
    lines = [
        f"## Training speed: {s['teacher']} → {s['student']}, CKD (λ={report['ckd']['weight']:g}, "
        f"τ={report['ckd']['temperature']:g}), batch {s['batch_size']}, {report['device_name']} "
        f"({s['device']}), torch {report['versions']['torch']}, {report['threads']} threads",
        "",
        f"{s['steps']} timed steps after {s['warmup']} warm-up steps per variant, on the same {s['num_images']} "
        f"{report['dataset']} training images; teacher weights random (speed does not depend on the weights). "
        + (f"{s['rounds']} rounds over the variants in alternating order; each row is the variant's median round."
           if s.get("rounds", 1) > 1 else ""),
        "",
    ]
    head = ["variant", "precision", "images/s", "× reference", "ms/step", "useful GFLOP/s", "executed GFLOP/s",
            "teacher fwd/image", "peak RSS MB", "workers MB (private)"]
    if cuda:
        head.append("peak GPU MB")
    head += ["s/epoch (50k)", "240 epochs (h)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in sorted(res.items(), key=lambda item: VARIANTS.index(item[0])):  # the JSON's keys are sorted
        ratio = "1.00×" if name == "reference" else _fmt(r.get("speedup_vs_reference"), 2, "×")
        workers = f"{r['workers_private_mb']:.0f} ({r['workers']} proc)" if r.get("workers") else "–"
        row = [name, r.get("precision", "fp32"), _fmt(r["images_per_s"]), ratio, _fmt(r["step_ms_mean"], 0), _fmt(r["useful_gflop_per_s"]),
               _fmt(r["executed_gflop_per_s"]), _fmt(r["teacher_forwards_per_image"], 2),
               _fmt(r["peak_rss_mb"], 0), workers]
        if cuda:
            row.append(_fmt(r["cuda_peak_mb"], 0))
        row += [_fmt(r["seconds_per_epoch_50k"], 1), _fmt(r["projected_240_epochs_h"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"FLOPs per image (convolutions + matmuls): teacher forward {f['teacher_forward'] / 1e9:.3f} G, "
                  f"student forward+backward {f['student_forward_backward'] / 1e9:.3f} G; useful = "
                  f"{f['useful_per_image'] / 1e9:.3f} G for every variant."]
    c = res.get("ours_cached", {}).get("cache")
    if c:
        lines.append(
            f"Teacher cache: {100 * c['hit_rate_timed']:.1f}% hits in the timed steps ({c['hits_timed']} hits, "
            f"{c['misses_timed']} misses). One-off fill: {1e3 * c['fill_s_per_view']:.2f} ms per image-view "
            f"({c['fill_views_per_s']:.0f} views/s, lazy fill at batch {c['fill_batch_size']}). A "
            f"{RUN_EPOCHS}-epoch run shows each image {RUN_EPOCHS} views of which "
            f"{c['distinct_views_per_image_240_epochs']:.0f} distinct: the lazy fill runs the teacher on those "
            f"only (never more than the live teacher; ≈{c['lazy_fill_seconds_240_epochs_50k'] / 3600:.2f} h here, "
            f"so one cold-cache run ≈ {res['ours_cached']['projected_240_epochs_cold_cache_h']:.2f} h), while "
            f"fill_all costs {NUM_VIEWS} teacher forwards per image (≈{c['fill_all_seconds_50k'] / 3600:.2f} h), "
            f"paid once for every run sharing the teacher. Cache table for 50k images: "
            f"{c['table_full_train_gb']:.1f} GiB (this benchmark's: {c['table_mb']:.0f} MiB, in its peak memory).")
    for name, values in report.get("round_ratios", {}).items():
        if len(values) > 1:
            lines.append(f"{name} per round (same round, paired): "
                         + ", ".join(f"{v:.2f}×" for v in values) + ".")
    t = report.get("target")
    if t:
        lines.append("Targets on CPU: " + "; ".join(
            f"{v} / reference = {t['ratios'][v]:.2f}× (≥ {t['thresholds'][v]:g}×)" for v in t["thresholds"])
            + f": {'met' if t['met'] else 'NOT met'}.")
    elif "ours_cached/reference" in report["ratios"]:
        lines.append(f"ours_cached / reference = {report['ratios']['ours_cached/reference']:.2f}×.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant (default: %d on CPU, %d on CUDA)" % (DEFAULT_STEPS["cpu"][0],
                                                                                       DEFAULT_STEPS["cuda"][0]))
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed warm-up steps before them, >= 1 (default: %d on CPU, %d on CUDA)"
                    % (DEFAULT_STEPS["cpu"][1], DEFAULT_STEPS["cuda"][1]))
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds over the variants, in alternating order; each variant reports its median round "
                         "(default: %d on CPU, %d on CUDA)" % (DEFAULT_ROUNDS["cpu"], DEFAULT_ROUNDS["cuda"]))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference loop")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="dataset root (default: $CKD_DATA_DIR, else ../shared/datasets beside the repo if it "
                         "exists, else data/)")
    ap.add_argument("--dataset", default="cifar100", choices=["cifar100", "cifar10", "digits", "synthetic"],
                    help="training images to use (synthetic: random images, for tests)")
    ap.add_argument("--json", type=Path, default=None,
                    help="where to write the JSON (default: benchmarks/results/bench_training_<device>.json)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our engine's student (config.compile)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: reference, ours_live, "
                         "ours_cached at the precision auto resolves to, and the fp32 pair when that is bf16)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the variants in this process (faster; peak memory then not per variant)")
    ap.add_argument("--_child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child is not None:
        return args
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.variants is None:
        args.variants = ",".join(default_variants(str(device)))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        ap.error(f"--variants: unknown {bad or 'empty'}; valid: {', '.join(VARIANTS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if device.type not in DEFAULT_STEPS:
        ap.error(f"--device {device}: only cpu and cuda are supported")
    args.device = str(device)
    steps, warmup = DEFAULT_STEPS[device.type]
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.rounds = DEFAULT_ROUNDS[device.type] if args.rounds is None else args.rounds
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the clock starts at the end of the last warm-up step)")
    if args.batch_size < 2:
        ap.error("--batch-size must be >= 2 (batch norm in training mode)")
    if args.workers < 0:
        ap.error("--workers must be >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    args.data_dir = args.data_dir or default_data_dir()
    return args


def _meta(device: torch.device) -> dict:
    import numpy
    import torchvision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "numpy": numpy.__version__},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._child is not None:
        _child_main(args._child, args._variant)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    num_images = (args.steps + args.warmup) * args.batch_size
    t_start = time.perf_counter()
    where = f" from {args.data_dir}" if args.dataset in ("cifar100", "cifar10") else ""
    print(f"choosing {num_images} {args.dataset} training images{where} ...", file=sys.stderr, flush=True)
    try:
        subset = benchmark_subset(args.dataset, args.data_dir, num_images)
    except DatasetError as exc:
        raise SystemExit(f"bench_training: {exc}") from None
    settings = {"device": args.device, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                "teacher": args.teacher, "student": args.student, "workers": args.workers, "threads": args.threads,
                "compile": args.compile, "num_images": num_images, "rounds": args.rounds, "variants": list(args.variants),
                "in_process": args.in_process, "dataset": args.dataset,
                "data_dir": str(args.data_dir) if args.dataset in ("cifar100", "cifar10") else None,
                "image_choice": f"{num_images} of the {subset['source_train_images']} training images, "
                                f"torch.randperm seed {SEED}, kept in dataset order"}
    config = engine_config(settings, subset["name"])
    flops = count_flops(args.teacher, args.student, len(subset["classes"]))
    meta = _meta(device)
    meta.update(dataset=subset["name"], method="ckd", ckd=dict(config.method_options),
                recipe={"lr": config.base_lr, "momentum": config.momentum, "weight_decay": config.weight_decay})

    rounds: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        child_dir = Path(tmp)
        if not args.in_process:
            torch.save(subset, child_dir / "subset.pt")
            (child_dir / "settings.json").write_text(json.dumps(settings))
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            if args.rounds > 1:
                print(f"round {r + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
            for variant in order:
                if args.in_process:
                    reset_peak_rss()
                    rec = run_variant(variant, subset, settings)
                    rec["memory_isolated"] = False
                else:
                    rec = _spawn(child_dir, variant)
                rec["round"] = r + 1
                rounds[variant].append(rec)
    results = {variant: median_round(recs) for variant, recs in rounds.items()}
    report = summarize(results, flops, settings, meta)
    report["round_ratios"] = {f"{n}/reference": [a["images_per_s"] / b["images_per_s"]
                                                 for a, b in zip(rounds[n], rounds["reference"])]
                              for n in rounds if n != "reference" and "reference" in rounds}
    report["wall_seconds"] = time.perf_counter() - t_start

    print(markdown(report))
    pair = "" if (args.teacher, args.student) == ("resnet32x4", "resnet8x4") else f"_{args.teacher}-{args.student}"
    path = args.json or HERE / "results" / f"bench_training_{device.type}{pair}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"\n(wrote {path}; {report['wall_seconds']:.0f} s in all)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
