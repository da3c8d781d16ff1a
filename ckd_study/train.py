"""The one training loop, for teachers (method ``ce`` without a teacher) and for distillation.

The loop knows nothing about methods: a method maps the batch's student (and teacher) outputs to named,
already-weighted loss terms; the loop sums them, checks they are finite, back-propagates, and logs every term.

Recipe (methods.md §0): SGD with momentum and weight decay, a step schedule (×``lr_decay`` after each milestone)
or cosine, the teacher frozen in eval mode. A run's ``precision`` (``config.resolve_precision``: bf16 on CUDA and
on CPUs where bf16 is measured faster, else fp32) sets how the networks run: bf16 autocast or float32, in the
channels_last memory format either way; the student is optionally ``torch.compile``d. Losses are always computed in float32.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .data import Batch, BatchIterator, ImageDataset, normalize
from .methods import Method
from .models import ModelOutput, ZooModel


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the epoch, the step and the term."""


def lr_at(config: RunConfig, epoch: int) -> float:
    """Learning rate of 1-based ``epoch``: step decay after each milestone (RepDistiller), or cosine."""
    base = config.base_lr
    if config.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))
    passed = sum(1 for m in config.milestones if epoch > m)
    return base * config.lr_decay**passed


@dataclass(frozen=True)
class DeviceSetup:
    """How networks run on a device: the resolved precision, its autocast dtype and the memory format.

    bf16: autocast to bfloat16; fp32: no autocast. Both in channels_last, the fast layout of oneDNN's and
    cuDNN's convolutions: measured on CPU in fp32 (Zen 3, 2 threads, ``benchmarks/bench_precision.py``,
    RESULTS.md §1c), a train step was 1.00–1.42× the contiguous layout's speed (resnet56 1.19×, resnet20 1.42×),
    never slower. The memory format is not part of a run's identity (like the thread count, it changes
    only float rounding); it is recorded per attempt, and the teacher cache is keyed by it (:attr:`compute_key`).
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool
    precision: str = "fp32"

    @classmethod
    def for_device(cls, device: str | torch.device | None = None, precision: str = "auto") -> "DeviceSetup":
        from .config import resolve_precision

        dev = torch.device(device) if device is not None else default_device()
        precision = resolve_precision(precision, str(dev))
        return cls(dev, torch.bfloat16 if precision == "bf16" else None, True, precision)

    @property
    def compute_key(self) -> str:
        """How values are computed, for keying stored network outputs (the teacher cache): the precision and the
        memory format, e.g. ``fp32-channels_last``. Outputs computed another way differ in their last bits."""
        return f"{self.precision}-{'channels_last' if self.channels_last else 'contiguous'}"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def train_batches(config: RunConfig, data: ImageDataset) -> BatchIterator:
    """The shuffled, augmented training batches of a run, seeded by (seed, epoch). The last partial batch is
    kept unless ``config.drop_last`` (released KD trainers keep it); a last batch of a single image is always
    dropped, since BatchNorm cannot train on one sample."""
    drop_last = config.drop_last or len(data.x_train) % config.batch_size == 1
    return BatchIterator(data.x_train, data.y_train, config.batch_size, shuffle=True, drop_last=drop_last,
                         augment=True, mean=data.mean, std=data.std, seed=config.seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TeacherSource:
    """Where the teacher's outputs for a training batch come from (the live network or the exact cache).

    Subclasses implement ``__call__``; what only some sources do has a no-op default here, so the engine calls
    it on any source: ``begin_epoch`` (the epoch's batch iterator, before its first batch), ``counters``
    (running totals the Trainer turns into per-epoch metrics), ``save`` (persist what the source computed, for
    later runs) and ``path`` (the file it persists to, or None)."""

    kind: ClassVar[str] = "live"
    path: Path | None = None

    def __call__(self, batch: Batch) -> ModelOutput:
        raise NotImplementedError

    def begin_epoch(self, batches) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}

    def save(self) -> None:
        pass


class LiveTeacher(TeacherSource):
    """Runs the frozen teacher on the batch's augmented images."""

    kind = "live"

    def __init__(self, model: nn.Module, setup: DeviceSetup) -> None:
        self.model = model.eval()
        self.setup = setup

    @torch.no_grad()
    def __call__(self, batch: Batch) -> ModelOutput:
        return self.forward_images(batch.images)

    @torch.no_grad()
    def forward_images(self, images: torch.Tensor) -> ModelOutput:
        with self.setup.autocast():
            return self.model(self.setup.prepare_images(images))


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, mean, std, *, batch_size: int = 500,
            setup: DeviceSetup | None = None, keep: tuple[str, ...] = ("logits",)) -> dict[str, torch.Tensor]:
    """Test-time outputs of ``model`` on uint8 images (normalised only), concatenated on the CPU in float32.

    ``keep`` names the ModelOutput fields to return (``logits``, ``pooled``).
    """
    setup = setup or DeviceSetup.for_device(next(model.parameters()).device)  # precision: auto for the device
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
    for start in range(0, len(x_uint8), batch_size):
        images = normalize(x_uint8[start:start + batch_size].to(setup.device), mean, std)
        with setup.autocast():
            result = model(setup.prepare_images(images))
        for k in keep:
            out[k].append(getattr(result, k).float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of ``logits`` against ``labels``."""
    labels = labels.to(logits.device)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
        "top5": 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }


def evaluate(model: nn.Module, data: ImageDataset, setup: DeviceSetup, batch_size: int = 500) -> dict[str, float]:
    logits = predict(model, data.x_test, data.mean, data.std, batch_size=batch_size, setup=setup)["logits"]
    return accuracy_metrics(logits, data.y_test.cpu())


@dataclass
class TrainState:
    """What a checkpoint restores: the epoch completed, the best test top-1 so far, and the train time."""

    epoch: int = 0
    best_top1: float = -1.0
    best_top5: float = -1.0
    best_epoch: int = 0
    train_time_s: float = 0.0
    history: list[dict] = field(default_factory=list)


StepHook = Callable[["Trainer", int, int], None]


class Trainer:
    """Trains one run's student (and the method's extra modules) epoch by epoch.

    ``checkpoint_fn(trainer)`` is called after every completed epoch (the results store saves there);
    ``step_hook(trainer, epoch, step)`` after every optimisation step (tests use it to kill a run mid-epoch).
    """

    def __init__(self, config: RunConfig, data: ImageDataset, student: ZooModel, method: Method,
                 teacher_source: TeacherSource | None, setup: DeviceSetup, *, quiet: bool = False,
                 step_hook: StepHook | None = None) -> None:
        self.config = config
        self.data = data
        self.setup = setup
        self.student = setup.prepare_model(student)
        self.method = method.to(setup.device)
        self.teacher_source = teacher_source
        self.quiet = quiet
        self.step_hook = step_hook
        self.forward = torch.compile(self.student) if config.compile else self.student
        if setup.device.type == "cuda" and not config.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        params = list(self.student.parameters()) + list(self.method.parameters())
        self.optimizer = torch.optim.SGD(params, lr=config.base_lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.train_batches = train_batches(config, data)
        if len(self.train_batches) == 0:
            raise ValueError(f"batch_size {config.batch_size} is larger than the training set "
                             f"({len(data.x_train)} images): lower --batch-size")
        self.state = TrainState()
        # On CUDA, checking finiteness every step would synchronise the device; check in small groups.
        self.check_every = 1 if setup.device.type == "cpu" else 25

    # -- state for checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "state": self.state.__dict__,
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.state = TrainState(**ckpt["state"])

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, on_epoch_end: Callable[["Trainer", dict], None] | None = None,
            keep_going: Callable[["Trainer", int], bool] | None = None) -> TrainState:
        """Train the remaining epochs. ``keep_going(trainer, epoch)`` is asked before each epoch; when it says
        False, fit returns early with ``state.epoch`` < ``config.epochs`` (a time-boxed campaign stops so)."""
        cfg = self.config
        with deterministic_mode(cfg.deterministic):
            for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
                if keep_going is not None and not keep_going(self, epoch):
                    break
                record = self.train_epoch(epoch)
                if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                    t0 = time.perf_counter()
                    test = evaluate(self.student, self.data, self.setup)
                    record.update({f"test_{k}": v for k, v in test.items()}, eval_time_s=time.perf_counter() - t0)
                    if test["top1"] > self.state.best_top1:
                        self.state.best_top1, self.state.best_top5 = test["top1"], test["top5"]
                        self.state.best_epoch = epoch
                self.state.epoch = epoch
                self.state.history.append(record)
                if on_epoch_end is not None:
                    on_epoch_end(self, record)
        return self.state

    def train_epoch(self, epoch: int) -> dict:
        lr = lr_at(self.config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.student.train()
        self.method.train()
        self.train_batches.set_epoch(epoch)
        if self.teacher_source is not None:
            self.teacher_source.begin_epoch(self.train_batches)
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.setup.device)
        pending: list[tuple[int, list[str], torch.Tensor]] = []
        seen = 0
        # a teacher source may count what it did (the cache: hits and misses); the epoch records the difference
        counted_before = self.teacher_source.counters() if self.teacher_source is not None else {}
        t0 = time.perf_counter()
        bar = _progress(self.train_batches, epoch, self.config.epochs, self.quiet)
        for step, batch in enumerate(bar, start=1):
            images = self.setup.prepare_images(batch.images)
            with self.setup.autocast():
                student_out = self.forward(images)
            teacher_out = self.teacher_source(batch) if self.teacher_source is not None else None
            terms = self.method(student_out, teacher_out, batch.labels, batch.indices, epoch)
            total = torch.stack([v.float() for v in terms.values()]).sum()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()

            values = torch.stack([v.detach().float() for v in terms.values()])
            pending.append((step, list(terms), values))
            if len(pending) >= self.check_every:
                self._check_finite(epoch, pending)
                pending.clear()
            for name, value in zip(terms, values):
                sums[name] = sums.get(name, 0.0) + value
            correct += (student_out.logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch.labels)
            if not self.quiet and step % 20 == 0:
                bar.set_postfix(loss=f"{float(total):.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if self.step_hook is not None:
                self.step_hook(self, epoch, step)
        self._check_finite(epoch, pending)
        if self.setup.device.type == "cuda":
            torch.cuda.synchronize(self.setup.device)
        elapsed = time.perf_counter() - t0
        self.state.train_time_s += elapsed
        steps = len(self.train_batches)
        record = {"epoch": epoch, "lr": lr}
        record.update({f"train_{k}": float(v) / steps for k, v in sums.items()})
        record["train_loss"] = sum(float(v) for v in sums.values()) / steps
        record.update(train_top1=100.0 * float(correct) / max(seen, 1), epoch_time_s=elapsed,
                      images_per_s=seen / elapsed if elapsed > 0 else float("nan"))
        if self.teacher_source is not None:
            record.update({f"teacher_{k}": v - counted_before.get(k, 0)
                           for k, v in self.teacher_source.counters().items()})
        record.update(self.method.epoch_metrics())
        return record

    @staticmethod
    def _check_finite(epoch: int, pending: list[tuple[int, list[str], torch.Tensor]]) -> None:
        if not pending:
            return
        if bool(torch.stack([v.sum() for _, _, v in pending]).isfinite().all()):
            return
        for step, names, values in pending:
            bad = [(n, float(v)) for n, v in zip(names, values) if not math.isfinite(float(v))]
            if bad:
                name, value = bad[0]
                raise NonFiniteLossError(
                    f"loss term {name!r} is {value} at epoch {epoch}, step {step}; training stopped and the "
                    f"last good checkpoint (end of epoch {epoch - 1}) was kept. Lower the learning rate or the "
                    f"loss weight, or check the inputs.")


def _progress(batches: BatchIterator, epoch: int, epochs: int, quiet: bool) -> Iterator[Batch]:
    if quiet:
        return _Quiet(batches)
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"epoch {epoch}/{epochs}", leave=False, unit="batch")


class _Quiet:
    """A stand-in for tqdm with the bits the loop uses."""

    def __init__(self, it) -> None:
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **_: object) -> None:
        pass


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Bit-identical results for the same seed (CPU): deterministic kernels for the duration of a run."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    cudnn_previous = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_previous
