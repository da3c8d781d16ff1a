"""Typed, validated run configs and the presets (smoke / quick / paper).

A :class:`RunConfig` describes one training run completely: data, student, teacher (itself a ``RunConfig``),
method and its options, optimiser, schedule, budget and seed. It is validated when built, and its run id is
derived from its canonical JSON, so the same config always maps to the same run in the results store.

Presets are data (:data:`PRESETS`): sets of config defaults. ``make_config(preset=..., **overrides)`` starts
from the preset and applies the overrides; nothing in the engine branches on a preset's name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEDULES = ("step", "cosine")
# "auto" is resolved when a config is built (resolve_precision), so stored configs and run ids hold bf16 or fp32.
PRECISIONS = ("auto", "bf16", "fp32")

# Students trained with lr 0.01 in the benchmark recipe (methods.md §0).
LOW_LR_STUDENTS = frozenset({"MobileNetV2", "ShuffleV1", "ShuffleV2"})

# Per-pair loss hyper-parameters from the released configs (methods.md §1–2), applied unless overridden.
# Only loss weights and temperatures: batch size and lr follow the one common budget of the study.
PAIR_METHOD_DEFAULTS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("resnet56", "resnet20"): {"dkd": {"beta": 2.0}, "ckd": {"weight": 10.0, "temperature": 1.0}},
    ("resnet110", "resnet32"): {"dkd": {"beta": 2.0}, "ckd": {"weight": 10.0, "temperature": 1.0}},
    ("resnet32x4", "resnet8x4"): {"ckd": {"weight": 100.0, "temperature": 1.0}},
    ("wrn_40_2", "wrn_16_2"): {"dkd": {"beta": 6.0}, "ckd": {"weight": 100.0, "temperature": 1.0}},
    ("wrn_40_2", "wrn_40_1"): {"dkd": {"beta": 6.0}, "ckd": {"weight": 50.0, "temperature": 2.0}},
    ("vgg13", "vgg8"): {"dkd": {"beta": 6.0}, "ckd": {"weight": 100.0, "temperature": 1.0}},
    ("resnet32x4", "ShuffleV1"): {"ckd": {"weight": 100.0, "temperature": 1.0}},
    ("wrn_40_2", "ShuffleV1"): {"ckd": {"weight": 100.0, "temperature": 1.0}},
    ("vgg13", "MobileNetV2"): {"dkd": {"beta": 6.0}, "ckd": {"weight": 50.0, "temperature": 2.0}},
    ("ResNet50", "MobileNetV2"): {"ckd": {"weight": 100.0, "temperature": 1.0}},
    ("resnet32x4", "ShuffleV2"): {"ckd": {"weight": 100.0, "temperature": 1.0}},
}
# The LS variants share DKD's per-pair beta.
for _pair in PAIR_METHOD_DEFAULTS.values():
    if "dkd" in _pair:
        _pair["dkd_ls"] = dict(_pair["dkd"])


# Training recipes other than the preset's common budget, as data. A recipe changes a *student* run's budget
# relative to its preset (the teacher keeps the preset's recipe) and is recorded in the config as ``recipe``.
RECIPES: dict[str, dict[str, Any]] = {
    # The CKD authors' released configs (ZhouXinzzzzz/CKD, configs/cifar100/ckd/*.yaml): 480 epochs (2x the
    # 240-epoch benchmark) with a cosine schedule, and batch 32 for five pairs (lr and loss settings unchanged:
    # they equal the recipe's lr and PAIR_METHOD_DEFAULTS). Their KD/DKD baselines use the 240-epoch step recipe.
    "ckd_released": {
        "label": "CKD's released recipe: 2x epochs, cosine lr",
        "epochs_factor": 2,
        "schedule": "cosine",
        "pair_batch_size": {("wrn_40_2", "wrn_40_1"): 32, ("resnet32x4", "ShuffleV1"): 32,
                            ("wrn_40_2", "ShuffleV1"): 32, ("vgg13", "MobileNetV2"): 32,
                            ("ResNet50", "MobileNetV2"): 32},
    },
}


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the valid values."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (teacher training is method ``ce`` with no teacher).

    ``lr=None`` resolves to the recipe's 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students.
    ``method_options`` are resolved against the method's option dataclass by :func:`resolve`, so the stored
    config (and the run id) always lists every option explicitly.
    """

    dataset: str = "cifar100"
    train_per_class: int | None = None  # class-balanced subset of the train split (None: all)
    test_per_class: int | None = None
    student: str = "resnet8x4"
    method: str = "ce"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    teacher: "RunConfig | None" = None
    epochs: int = 240
    batch_size: int = 64
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple[int, ...] = (150, 180, 210)
    lr_decay: float = 0.1
    seed: int = 0
    eval_every: int = 1
    preset: str = "paper"
    teacher_cache: bool = True  # exact teacher-output cache where the method allows it (see teacher_cache.py)
    deterministic: bool = False
    compile: bool = False
    # Networks' compute precision: bf16 autocast (+ channels_last) or float32; losses are float32 either way.
    precision: str = "auto"
    # Keep the last partial batch of an epoch, as the released KD trainers do (RepDistiller, mdistiller, CKD:
    # DataLoader(drop_last=False)); True follows DCD's release. A last batch of a single image is always
    # dropped: BatchNorm cannot train on one sample.
    drop_last: bool = False
    # A named recipe of RECIPES the budget came from (None: the preset's); left out of the run id when None.
    recipe: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "method_options", dict(self.method_options))
        if isinstance(self.teacher, Mapping):
            object.__setattr__(self, "teacher", RunConfig.from_dict(self.teacher))
        self._validate()

    # -- validation --------------------------------------------------------------------------------------
    def _validate(self) -> None:
        from .data import available_datasets
        from .methods import available_methods, method_class
        from .models import available_models

        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config field {name!r}: {message}")

        need(self.dataset in available_datasets(), "dataset",
             f"unknown dataset {self.dataset!r}; valid: {', '.join(available_datasets())}")
        need(self.student in available_models(), "student",
             f"unknown model {self.student!r}; valid: {', '.join(available_models())}")
        need(self.method in available_methods(), "method",
             f"unknown method {self.method!r}; valid: {', '.join(available_methods())}")
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1), name,
                 f"must be a positive integer or None, got {value!r}")
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, f"must be a positive integer, got {value!r}")
        need(self.lr is None or self.lr > 0, "lr", f"must be > 0 (or None for the recipe's), got {self.lr!r}")
        need(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum!r}")
        need(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        need(0 < self.lr_decay <= 1, "lr_decay", f"must be in (0, 1], got {self.lr_decay!r}")
        need(self.schedule in SCHEDULES, "schedule",
             f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        need(list(self.milestones) == sorted(self.milestones) and all(m >= 1 for m in self.milestones),
             "milestones", f"must be increasing positive epochs, got {self.milestones!r}")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        need(self.recipe is None or self.recipe in RECIPES, "recipe",
             f"unknown recipe {self.recipe!r}; valid: {', '.join(RECIPES)}")
        need(self.precision in PRECISIONS, "precision",
             f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        for name in ("teacher_cache", "deterministic", "compile", "drop_last"):
            need(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        needs_teacher = method_class(self.method).needs_teacher
        need(not needs_teacher or self.teacher is not None, "teacher",
             f"method {self.method!r} distils from a teacher: give a teacher config (or --teacher/--teacher-run)")
        need(needs_teacher or self.teacher is None, "teacher",
             f"method {self.method!r} trains without a teacher; remove the teacher")
        if self.teacher is not None:
            need(self.teacher.teacher is None, "teacher", "a teacher must itself be trained without a teacher")
            need(self.teacher.dataset == self.dataset, "teacher",
                 f"the teacher was trained on {self.teacher.dataset!r}, the student on {self.dataset!r}")

    # -- derived values ----------------------------------------------------------------------------------
    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.01 if self.student in LOW_LR_STUDENTS else 0.05

    @property
    def is_teacher_run(self) -> bool:
        return self.teacher is None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["milestones"] = list(self.milestones)
        out["method_options"] = _jsonable(dict(self.method_options))
        out["teacher"] = None if self.teacher is None else self.teacher.to_dict()
        if out["recipe"] is None:  # a field added later: configs without a recipe keep their run ids
            del out["recipe"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @property
    def run_id(self) -> str:
        """Readable prefix + hash of the canonical resolved config: same config, same id."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        pair = self.student if self.teacher is None else f"{self.teacher.student}-{self.student}"
        return f"{self.method}_{pair}_s{self.seed}_{digest}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------------
# Presets: data only. "teacher_*" keys configure the teacher run the preset trains for distillation;
# "method_options" gives per-method option defaults for the preset (e.g. warm-ups scaled to short budgets).
# ---------------------------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: sklearn digits, the two smallest CIFAR ResNets, two epochs on a subset.
    "smoke": {
        "dataset": "digits",
        "train_per_class": 24,
        "test_per_class": 10,
        "student": "resnet8",
        "teacher_student": "resnet14",
        "teacher_epochs": 2,
        "epochs": 2,
        "batch_size": 16,
        "milestones": (2,),
        "method_options": {"dkd": {"warmup": 1}, "dkd_ls": {"warmup": 1}, "mcld": {"warmup": 1},
                           "crd": {"nce_k": 64}},
    },
    # About a minute per student run on a 2-core CPU with real CIFAR-100 (README "Presets": measured cost and
    # why): 100 images per class, the resnet20 teacher trained 12 epochs, resnet8 students 5 epochs.
    "quick": {
        "dataset": "cifar100",
        "train_per_class": 100,
        "test_per_class": 20,
        "student": "resnet8",
        "teacher_student": "resnet20",
        "teacher_epochs": 12,
        "epochs": 5,
        "batch_size": 64,
        "milestones": (3, 4),
        "teacher_milestones": (8, 10),
        # The committed reference outputs were trained in float32: pinned, so that every machine (a CPU with
        # or without native bf16, a GPU) names, finds and extends the same runs (--precision overrides it).
        "precision": "fp32",
        "method_options": {"dkd": {"warmup": 2}, "dkd_ls": {"warmup": 2}, "mcld": {"warmup": 2},
                           "crd": {"nce_k": 4096}},
    },
    # Full CIFAR-100, resnet56 -> resnet20, a short cosine budget for every student; the teacher is the paper
    # recipe's resnet56 (teacher_preset: the same run as the paper preset's, trained once, by the CPU
    # reproduction). 6 epochs: the 56 student runs of its study at the resnet20 fp32 step measured on the
    # project's Intel Xeon (≈ 670 img/s, 2026-12-04) are ≈ 8 h (README "Presets"). The paper's warm-up, 20 of
    # 240 epochs, is half an epoch here; warm-ups count whole epochs, so warmup 2 = the first epoch at half weight.
    "medium": {
        "dataset": "cifar100",
        "student": "resnet20",
        "teacher_student": "resnet56",
        "teacher_preset": "paper",
        # float32 on every machine, like that teacher (the reproduction's campaign plan froze fp32)
        "precision": "fp32",
        "teacher_precision": "fp32",
        "epochs": 6,
        "schedule": "cosine",
        "milestones": (),
        "batch_size": 64,
        "method_options": {"dkd": {"warmup": 2}, "dkd_ls": {"warmup": 2}, "mcld": {"warmup": 2}},
    },
    # The full benchmark recipe of methods.md §0.
    "paper": {
        "dataset": "cifar100",
        "student": "resnet8x4",
        "teacher_student": "resnet32x4",
        "teacher_epochs": 240,
        "epochs": 240,
        "batch_size": 64,
        "milestones": (150, 180, 210),
        "method_options": {},
    },
}

_PRESET_ONLY_KEYS = ("teacher_student", "teacher_epochs", "teacher_milestones", "teacher_preset", "teacher_precision",
                     "method_options")


def available_presets() -> list[str]:
    return list(PRESETS)


def preset_defaults(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return dict(PRESETS[preset])


def teacher_config(preset: str = "paper", teacher: str | None = None, seed: int = 0, *, device: str | None = None,
                   **overrides: Any) -> RunConfig:
    """The config of a teacher run (method ``ce``) under a preset (``device``: see :func:`resolve_precision`)."""
    p = preset_defaults(preset)
    fields = {k: v for k, v in p.items() if k not in _PRESET_ONLY_KEYS}
    fields["student"] = teacher or p["teacher_student"]
    fields["epochs"] = p.get("teacher_epochs", fields.get("epochs"))
    fields["milestones"] = p.get("teacher_milestones", fields.get("milestones"))
    fields.update(method="ce", method_options={}, teacher=None, preset=preset, seed=seed)
    fields.update(overrides)
    return resolve(RunConfig(**fields), device)


def make_config(preset: str = "paper", *, method: str = "ce", teacher: "str | RunConfig | None" = None,
                method_options: Mapping[str, Any] | None = None,
                teacher_overrides: Mapping[str, Any] | None = None, device: str | None = None,
                recipe: str | None = None, **overrides: Any) -> RunConfig:
    """Build a resolved, validated config from a preset plus overrides.

    ``teacher`` is a model name (its run is the preset's teacher recipe, seed 0), a teacher ``RunConfig``,
    or None, in which case methods that need a teacher get the preset's default teacher.
    ``teacher_overrides`` change fields of that teacher recipe (e.g. ``{"epochs": 1}``). ``device`` is where
    the runs will train; it only matters for resolving ``precision="auto"`` (:func:`resolve_precision`).
    ``recipe`` (a name in :data:`RECIPES`) changes the student's budget relative to the preset; explicit
    overrides still win.
    """
    from .methods import method_class

    p = preset_defaults(preset)
    fields = {k: v for k, v in p.items() if k not in _PRESET_ONLY_KEYS}
    fields.update(preset=preset, method=method)
    student = overrides.get("student", fields.get("student", RunConfig.student))
    needs_teacher = method_class(method).needs_teacher if method in _method_names() else False
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
        spec = RECIPES[recipe]
        teacher_name = teacher.student if isinstance(teacher, RunConfig) else (teacher or p["teacher_student"])
        fields.update(epochs=fields["epochs"] * spec["epochs_factor"], schedule=spec["schedule"], recipe=recipe,
                      batch_size=spec["pair_batch_size"].get((teacher_name, student), fields["batch_size"]))
    fields.update(overrides)
    if needs_teacher and not isinstance(teacher, RunConfig):
        shared = {k: fields[k] for k in ("dataset", "train_per_class", "test_per_class") if k in fields}
        if "teacher_precision" in p:
            shared["precision"] = p["teacher_precision"]
        # a preset may distil from another preset's teacher run (medium: the paper recipe's), shared, not retrained
        teacher = teacher_config(p.get("teacher_preset", preset), teacher or p["teacher_student"], device=device,
                                 **{**shared, **(teacher_overrides or {})})
    fields["teacher"] = teacher if needs_teacher else None
    options = dict(p.get("method_options", {}).get(method, {}))
    if isinstance(fields["teacher"], RunConfig):
        options.update(PAIR_METHOD_DEFAULTS.get((fields["teacher"].student, student), {}).get(method, {}))
    options.update(method_options or {})
    fields["method_options"] = options
    return resolve(RunConfig(**fields), device)


def setting_label(config: RunConfig) -> str:
    """What sets a run apart from its preset's default run of the same method, pair and seed, e.g.
    ``batch_size=128 lr=0.1 terms=['inter']`` ('' for the default run): a short label for listings."""
    shared = dict(seed=config.seed, precision=config.precision, dataset=config.dataset,
                  train_per_class=config.train_per_class, test_per_class=config.test_per_class)
    try:
        base = make_config(config.preset, method=config.method, teacher=config.teacher, student=config.student,
                           **shared)
        if config.teacher is None and config.method == "ce":  # a teacher run or the student alone
            teacher_run = teacher_config(config.preset, config.student, **shared)
            if teacher_run == config:
                return "(teacher recipe)"
    except (ConfigError, ValueError):  # a preset that no longer exists: show every option
        base = None
    ours = config.to_dict()
    theirs = base.to_dict() if base is not None else {}
    parts = [f"{k}={_short(v)}" for k, v in ours.items()
             if k not in ("teacher", "method_options") and base is not None and theirs.get(k) != v]
    base_options = theirs.get("method_options", {})
    parts += [f"{k}={_short(v)}" for k, v in ours["method_options"].items() if base_options.get(k) != v]
    return " ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _method_names() -> list[str]:
    from .methods import available_methods

    return available_methods()


# /proc/cpuinfo flags of native bf16 arithmetic (x86 AVX512-BF16 / AMX-BF16, Arm BF16)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def _cpuinfo_words() -> frozenset[str]:
    """The words of /proc/cpuinfo (vendor, flags), or none where there is no such file (not Linux). Read once:
    every config build resolves ``precision="auto"``, and a CPU's flags do not change under a process."""
    try:
        with open("/proc/cpuinfo") as fh:
            return frozenset(fh.read().split())
    except OSError:
        return frozenset()


def _forced_cpu_bf16() -> "bool | None":
    """``CKD_CPU_BF16=0``/``1``: the user's override of both the native-bf16 probe and ``auto``'s choice."""
    import os

    forced = os.environ.get("CKD_CPU_BF16")
    return forced == "1" if forced in ("0", "1") else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (recorded with every run; :func:`cpu_prefers_bf16` decides ``auto``).

    Asked of torch's own CPU feature probe (``torch._C._cpu._is_avx512_bf16_supported``: the x86 AVX512-BF16 or
    AMX-BF16 instructions); where torch lacks the probe, the ``avx512_bf16``/``amx_bf16`` flags of
    /proc/cpuinfo (Linux x86) or ``bf16`` among the Arm features. ``CKD_CPU_BF16=0``/``1`` overrides it.
    """
    forced = _forced_cpu_bf16()
    if forced is not None:
        return forced
    import torch

    probes = [getattr(torch._C._cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes if probe is not None)
    return bool(_cpuinfo_words() & NATIVE_BF16_FLAGS)


def cpu_bf16_flags() -> list[str]:
    """The bf16-related flags /proc/cpuinfo lists (recorded with runs and benchmarks: which kind of CPU it was)."""
    return sorted(_cpuinfo_words() & (NATIVE_BF16_FLAGS | {"amx_tile"}))


def bf16_expected_faster(native_bf16: bool, cpuinfo_words: "set[str] | frozenset[str]") -> bool:
    """Whether bf16 autocast is expected to beat fp32 on a CPU with these /proc/cpuinfo words.

    Native bf16 is needed (emulated bf16 was ~10x slower than fp32 on a Zen 3) but not enough: on an Intel Xeon
    with AVX512-BF16 and no AMX a bf16 train step ran at 0.58-0.79x of fp32, on one with AMX-BF16 at 1.8x
    (``benchmarks/RESULTS.md`` §1e, §1g); on an AMD EPYC (Zen 4) with AVX512-BF16 at 1.46-1.60x (§1h). So:
    native bf16, except on an Intel CPU without ``amx_bf16``. Without /proc/cpuinfo
    (not Linux) the native probe decides.
    """
    if not native_bf16:
        return False
    return not ("GenuineIntel" in cpuinfo_words and "amx_bf16" not in cpuinfo_words)


def cpu_prefers_bf16() -> bool:
    """:func:`bf16_expected_faster` for this CPU; ``CKD_CPU_BF16=0``/``1`` overrides it."""
    forced = _forced_cpu_bf16()
    if forced is not None:
        return forced
    return bf16_expected_faster(cpu_has_native_bf16(), _cpuinfo_words())


def resolve_precision(precision: str, device: "str | None" = None) -> str:
    """``auto`` -> ``bf16`` on CUDA and on CPUs where bf16 is expected faster (:func:`cpu_prefers_bf16`), else
    ``fp32``.

    ``device`` is where the run will train (None: CUDA when available, else the CPU); explicit ``bf16`` and
    ``fp32`` are kept as given (bf16 on a CPU without native support is emulated: correct but slow).
    """
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConfigError(f"config field 'precision': unknown precision {precision!r}; "
                              f"valid: {', '.join(PRECISIONS)}")
        return precision
    import torch

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return "bf16"
    return "bf16" if kind == "cpu" and cpu_prefers_bf16() else "fp32"


def resolve(config: RunConfig, device: "str | None" = None) -> RunConfig:
    """Fill every method option with its default (validated by the method's option dataclass) and resolve
    ``precision="auto"`` for ``device`` (see :func:`resolve_precision`), so the run id names what runs."""
    from .methods import resolve_options

    options = resolve_options(config.method, config.method_options)
    teacher = resolve(config.teacher, device) if config.teacher is not None else None
    return config.replace(method_options=options, teacher=teacher,
                          precision=resolve_precision(config.precision, device))
