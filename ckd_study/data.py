"""Datasets, on-device augmentation and the batch iterator.

Datasets
--------
``load_dataset(name, root=None, download=False)`` returns an :class:`ImageDataset` whose images are
uint8 tensors of shape (N, 3, 32, 32) (contiguous, NCHW) and whose labels are int64. Three names exist
(:func:`available_datasets`):

- ``cifar100`` / ``cifar10``: read from ``root`` (default :func:`default_data_root`: ``$CKD_DATA_DIR`` or
  ``<repo>/data``) in one of two layouts, tried in this order:

  1. npz shards: ``root/cifar100/`` (``root/cifar10/``) with ``classes.txt`` (line i = name of label i),
     ``train-0.npz``, ``train-1.npz``, ... and ``test.npz``; every npz holds ``x`` uint8 (N, 32, 32, 3) HWC
     and ``y`` (N,) labels. If a ``SHA256SUMS`` file is present, every file it lists is verified.
  2. the torchvision layout ``root/cifar-100-python/`` (``root/cifar-10-batches-py/``), read (and with
     ``download=True`` downloaded) by ``torchvision.datasets.CIFAR100`` / ``CIFAR10``, which verifies md5
     sums.

  Missing or corrupt data raises :class:`DatasetError` with the paths tried and how to get the data.
- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no files needed), upscaled to 32x32 RGB, with a
  fixed stratified 80/20 split. A tiny real dataset for fast end-to-end checks.

Augmentation
------------
The standard CIFAR augmentation (zero padding of 4 in raw pixel space, random 32x32 crop, horizontal flip with
p=0.5, then normalisation) as one batched gather on whatever device the images live. A *view* of an image is
``(offset_y, offset_x, flip)`` with offsets in 0..8, encoded as ``view_id = (offset_y * 9 + offset_x) * 2 +
flip`` (``NUM_VIEWS = 162``). :func:`augment` is bit-for-bit equal to torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` + ``ToTensor()`` + ``Normalize(mean, std)`` for
the same crop offsets and flip (tested in ``tests/test_data.py``).

Batches
-------
:class:`BatchIterator` iterates device-resident uint8 images and labels. The order and the views of an
epoch depend only on ``(seed, epoch)`` (call :meth:`BatchIterator.set_epoch` before each epoch), and each
sample's view is drawn per sample index, so runs with the same seed see the same augmented data whatever
their batch size or method, and a resumed run replays the same epochs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DatasetError",
    "UnknownDatasetError",
    "ImageDataset",
    "available_datasets",
    "default_data_root",
    "resolve_data_root",
    "load_dataset",
    "NUM_VIEWS",
    "PAD",
    "encode_views",
    "decode_views",
    "sample_views",
    "augment",
    "normalize",
    "Batch",
    "BatchIterator",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

ENV_VAR = "CKD_DATA_DIR"

CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

IMAGE_SIZE = 32
PAD = 4
_OFFSETS = 2 * PAD + 1  # 9 crop offsets per axis
NUM_VIEWS = _OFFSETS * _OFFSETS * 2  # 162

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed forever: changing it changes every digits result


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


class DatasetError(RuntimeError):
    """A dataset is missing or corrupt. The message names the path tried and how to get the data."""


class UnknownDatasetError(ValueError):
    """``load_dataset`` was given a name that is not in :func:`available_datasets`."""


# --------------------------------------------------------------------------------------------------
# the dataset container
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A labelled image dataset held as tensors: uint8 (N, 3, H, W) images, int64 (N,) labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(
                    f"{self.name}: x_{split} must be a uint8 tensor of shape (N, 3, H, W), got "
                    f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
                )
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
                raise ValueError(
                    f"{self.name}: y_{split} must be an int64 tensor of shape (N,), got "
                    f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}"
                )
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: x_{split} has {x.shape[0]} images but y_{split} {y.shape[0]} labels")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"{self.name}: mean and std need 3 channels, got {self.mean}, {self.std}")
        object.__setattr__(self, "classes", list(self.classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )

    def subset(
        self, train_per_class: int | None = None, test_per_class: int | None = None, seed: int = 0
    ) -> "ImageDataset":
        """A class-balanced subset: ``train_per_class`` (``test_per_class``) images of every class.

        ``None`` keeps that split whole. The choice is deterministic: the same ``seed`` picks the same
        indices, the train choice does not depend on ``test_per_class`` and vice versa, and the kept images
        stay in their original order. Normalisation constants are those of the full dataset.
        """
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        x_train, y_train, x_test, y_test = self.x_train, self.y_train, self.x_test, self.y_test
        parts = []
        if train_per_class is not None:
            idx = _balanced_indices(self.y_train, self.num_classes, train_per_class, seed, 0, f"{self.name} train")
            idx = idx.to(self.y_train.device)
            x_train, y_train = x_train[idx].contiguous(), y_train[idx].contiguous()
            parts.append(f"train={train_per_class}/class")
        if test_per_class is not None:
            idx = _balanced_indices(self.y_test, self.num_classes, test_per_class, seed, 1, f"{self.name} test")
            idx = idx.to(self.y_test.device)
            x_test, y_test = x_test[idx].contiguous(), y_test[idx].contiguous()
            parts.append(f"test={test_per_class}/class")
        name = f"{self.name}[{','.join(parts)}]" if parts else self.name
        return dataclasses.replace(self, name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    def to(self, device: torch.device | str) -> "ImageDataset":
        """The same dataset with its tensors on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if all(t.device == device for t in (self.x_train, self.y_train, self.x_test, self.y_test)):
            return self
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


def _balanced_indices(
    y: torch.Tensor, num_classes: int, per_class: int, seed: int, stream: int, what: str
) -> torch.Tensor:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"{what}: images per class must be an int >= 1, got {per_class!r}")
    labels = y.cpu().numpy()
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < per_class:
        short = [c for c in range(num_classes) if counts[c] < per_class]
        raise ValueError(
            f"{what}: asked for {per_class} images per class but class {short[0]} has only {counts[short[0]]} "
            f"({len(short)} classes have fewer than {per_class}; the smallest class has {counts.min()})"
        )
    rng = np.random.default_rng([seed, stream])
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        chosen.append(members[rng.permutation(members.size)[:per_class]])
    return torch.from_numpy(np.sort(np.concatenate(chosen))).long()


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    title: str
    num_classes: int
    npz_folder: str
    torchvision_folder: str
    torchvision_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CIFAR = {
    "cifar100": _CifarSpec(
        "cifar100", "CIFAR-100", 100, "cifar100", "cifar-100-python", "CIFAR100", CIFAR100_MEAN, CIFAR100_STD
    ),
    "cifar10": _CifarSpec(
        "cifar10", "CIFAR-10", 10, "cifar10", "cifar-10-batches-py", "CIFAR10", CIFAR10_MEAN, CIFAR10_STD
    ),
}


def available_datasets() -> list[str]:
    return ["cifar10", "cifar100", "digits"]


def default_data_root() -> Path:
    """``$CKD_DATA_DIR`` when set (and not empty), else ``<repo>/data``.

    A relative ``$CKD_DATA_DIR`` (the README's ``../shared/datasets``) is taken from the current directory when
    it exists there, else from the repository root: notebooks run with ``notebooks/`` as their directory.
    """
    env = os.environ.get(ENV_VAR, "").strip()
    repo = Path(__file__).resolve().parent.parent
    if env:
        path = Path(env).expanduser()
        if not path.is_absolute() and not path.exists() and (repo / path).exists():
            return repo / path
        return path
    return repo / "data"


def resolve_data_root(root: str | Path | None) -> Path:
    """The folder data is read from: ``root`` (``~`` expanded) when given, else :func:`default_data_root`."""
    return default_data_root() if root is None else Path(root).expanduser()


def load_dataset(name: str, root: str | Path | None = None, download: bool = False) -> ImageDataset:
    """Load a dataset by name (see :func:`available_datasets`); images uint8 (N,3,32,32), labels int64."""
    key = str(name).strip().lower()
    if key not in available_datasets():
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; valid names are: {', '.join(available_datasets())}"
        )
    if key == "digits":
        return _load_digits()
    return _load_cifar(_CIFAR[key], resolve_data_root(root), download)


def _how_to_get(spec: _CifarSpec, root: Path) -> str:
    return (
        f"To get {spec.title}, do one of:\n"
        f"  1. download it (needs internet) into {root / spec.torchvision_folder}:\n"
        f"       python -c \"from ckd_study.data import load_dataset; "
        f"load_dataset('{spec.name}', root='{root}', download=True)\"\n"
        f"  2. copy the npz shards (classes.txt, train-*.npz, test.npz, SHA256SUMS) into {root / spec.npz_folder}/ "
        f"(an offline copy may exist in ../shared/datasets/{spec.npz_folder}/ next to the project);\n"
        f"  3. set {ENV_VAR} to a folder that holds either layout (e.g. export {ENV_VAR}=../shared/datasets) "
        f"or pass root=... to load_dataset.\n"
        f"See data/README.md for the accepted layouts."
    )


def _load_cifar(spec: _CifarSpec, root: Path, download: bool) -> ImageDataset:
    npz_dir = root / spec.npz_folder
    tv_dir = root / spec.torchvision_folder
    if _npz_layout_present(npz_dir):
        return _load_npz_layout(spec, npz_dir, root)
    if tv_dir.is_dir() or download:
        return _load_torchvision_layout(spec, root, download)
    raise DatasetError(
        f"{spec.title} not found. Paths tried:\n"
        f"  - {npz_dir}/ (npz shards: classes.txt, train-*.npz, test.npz)\n"
        f"  - {tv_dir}/ (torchvision layout)\n"
        f"(root {root} {'exists' if root.is_dir() else 'does not exist'}; the root is the root= argument, else "
        f"${ENV_VAR}, else <repo>/data)\n" + _how_to_get(spec, root)
    )


_SHARD_RE = re.compile(r"^train-(\d+)\.npz$")


def _npz_layout_present(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return any(
        p.name in ("classes.txt", "test.npz", "SHA256SUMS") or _SHARD_RE.match(p.name) for p in folder.iterdir()
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _verify_sha256sums(folder: Path, spec: _CifarSpec, root: Path) -> None:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    fix = (
        f"Re-copy the file (or re-download: delete {folder} and follow the instructions below).\n"
        + _how_to_get(spec, root)
    )
    for lineno, line in enumerate(sums.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(.+)$", line)
        if m is None:
            raise DatasetError(f"{sums}: line {lineno} is not '<sha256>  <file>': {line!r}")
        expected, fname = m.group(1).lower(), m.group(2).strip()
        path = folder / fname
        if not path.is_file():
            raise DatasetError(f"{path}: listed in {sums} but missing. {fix}")
        actual = _sha256(path)
        if actual != expected:
            raise DatasetError(
                f"{path}: checksum mismatch (sha256 {actual}, expected {expected} from {sums}); the file is "
                f"corrupt or truncated. {fix}"
            )


def _read_npz(path: Path, spec: _CifarSpec, root: Path) -> tuple[np.ndarray, np.ndarray]:
    fix = "Re-copy or re-download it.\n" + _how_to_get(spec, root)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, ValueError (pickled/garbage bytes), EOFError, OSError, ...
        raise DatasetError(
            f"{path}: cannot read the npz archive ({type(e).__name__}: {e}); the file is corrupt or truncated. {fix}"
        ) from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: not an npz archive (a plain .npy file?). {fix}")
    try:
        with data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DatasetError(f"{path}: npz archive lacks array(s) {missing} (has {data.files}). {fix}")
            x, y = data["x"], data["y"]
    except DatasetError:
        raise
    except Exception as e:  # BadZipFile (bad CRC), zlib.error, truncated member, bad .npy header, ...
        raise DatasetError(
            f"{path}: cannot read the npz archive ({type(e).__name__}: {e}); the file is corrupt or truncated. {fix}"
        ) from e
    return x, y


def _validate_split(x: np.ndarray, y: np.ndarray, num_classes: int, what: str, fix: str) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DatasetError(f"{what}: x must be uint8 of shape (N, 32, 32, 3), got {x.dtype} {x.shape}. {fix}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DatasetError(f"{what}: y must be integer labels of shape (N,), got {y.dtype} {y.shape}. {fix}")
    if y.shape[0] != x.shape[0]:
        raise DatasetError(f"{what}: {x.shape[0]} images but {y.shape[0]} labels. {fix}")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(
            f"{what}: labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}. {fix}"
        )


def _check_all_classes(y: np.ndarray, classes: list[str], what: str, fix: str) -> None:
    counts = np.bincount(y.astype(np.int64), minlength=len(classes))
    if counts.size and counts.min() == 0:
        empty = [classes[c] for c in np.flatnonzero(counts == 0)[:5]]
        raise DatasetError(f"{what}: no image of class(es) {empty} (classes.txt has {len(classes)} classes). {fix}")


def _nhwc_to_tensor(xs: Sequence[np.ndarray]) -> torch.Tensor:
    n = sum(x.shape[0] for x in xs)
    out = torch.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    start = 0
    for x in xs:
        out[start : start + x.shape[0]].copy_(torch.from_numpy(x).permute(0, 3, 1, 2))
        start += x.shape[0]
    return out


def _load_npz_layout(spec: _CifarSpec, folder: Path, root: Path) -> ImageDataset:
    fix = "Re-copy the data folder.\n" + _how_to_get(spec, root)
    classes_file = folder / "classes.txt"
    test_file = folder / "test.npz"
    shards = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name))), key=lambda t: t[0]
    )
    missing = [str(p) for p in (classes_file, test_file) if not p.is_file()]
    if not shards:
        missing.append(str(folder / "train-0.npz") + " (train-*.npz shards)")
    if missing:
        raise DatasetError(f"{spec.title} npz layout in {folder} is incomplete; missing: {', '.join(missing)}. {fix}")
    numbers = [n for n, _ in shards]
    if numbers != list(range(len(shards))):
        raise DatasetError(f"{folder}: train shards must be numbered 0..{len(shards) - 1}, found {numbers}. {fix}")

    _verify_sha256sums(folder, spec, root)

    try:
        classes = [c.strip() for c in classes_file.read_text(encoding="utf-8").splitlines() if c.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{classes_file}: cannot read ({e}). {fix}") from e
    if len(classes) != spec.num_classes:
        raise DatasetError(
            f"{classes_file}: {spec.title} has {spec.num_classes} classes but the file lists {len(classes)}. {fix}"
        )

    xs, ys = [], []
    for _, path in shards:
        x, y = _read_npz(path, spec, root)
        _validate_split(x, y, spec.num_classes, str(path), fix)
        xs.append(x)
        ys.append(y)
    x_test, y_test = _read_npz(test_file, spec, root)
    _validate_split(x_test, y_test, spec.num_classes, str(test_file), fix)
    y_train = np.concatenate(ys)
    _check_all_classes(y_train, classes, f"{folder} train shards", fix)
    _check_all_classes(y_test, classes, str(test_file), fix)

    return ImageDataset(
        name=spec.name,
        x_train=_nhwc_to_tensor(xs),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_nhwc_to_tensor([x_test]),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        classes=classes,
        mean=spec.mean,
        std=spec.std,
    )


def _load_torchvision_layout(spec: _CifarSpec, root: Path, download: bool) -> ImageDataset:
    import torchvision.datasets  # lazy: importing torchvision costs about a second

    cls = getattr(torchvision.datasets, spec.torchvision_class)
    folder = root / spec.torchvision_folder
    if download:
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:
            raise DatasetError(
                f"downloading {spec.title} into {folder} failed ({type(e).__name__}: {e}). The download needs "
                f"internet access; on an offline machine use the npz shards instead.\n" + _how_to_get(spec, root)
            ) from e
    splits = {}
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except Exception as e:
            raise DatasetError(
                f"{folder}: cannot read the torchvision {spec.title} files ({type(e).__name__}: {e}); they are "
                f"missing, corrupt or fail their md5 check. Delete {folder} and download again, or use the npz "
                f"shards.\n" + _how_to_get(spec, root)
            ) from e
        x = np.ascontiguousarray(ds.data)
        y = np.asarray(ds.targets, dtype=np.int64)
        fix = f"Delete {folder} and download again."
        _validate_split(x, y, spec.num_classes, f"{folder} ({'train' if train else 'test'})", fix)
        splits[train] = (x, y, list(ds.classes))
    classes = splits[True][2]
    if len(classes) != spec.num_classes:
        raise DatasetError(f"{folder}: expected {spec.num_classes} class names, got {len(classes)}")
    return ImageDataset(
        name=spec.name,
        x_train=_nhwc_to_tensor([splits[True][0]]),
        y_train=torch.from_numpy(splits[True][1]),
        x_test=_nhwc_to_tensor([splits[False][0]]),
        y_test=torch.from_numpy(splits[False][1]),
        classes=classes,
        mean=spec.mean,
        std=spec.std,
    )


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits  # lazy; ships with scikit-learn, reads no network

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    x8 = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    x = torch.from_numpy(x8).float().unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    # fixed stratified split: per class, a seeded permutation (legacy RandomState: a frozen stream)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        n_test = int(round(DIGITS_TEST_FRACTION * members.size))
        test_idx.append(members[rng.permutation(members.size)[:n_test]])
    is_test = np.zeros(labels.size, dtype=bool)
    is_test[np.concatenate(test_idx)] = True
    train_idx = torch.from_numpy(np.flatnonzero(~is_test))
    test_idx_t = torch.from_numpy(np.flatnonzero(is_test))

    x_train = x[train_idx].contiguous()
    mean, std = _channel_stats(x_train)
    return ImageDataset(
        name="digits",
        x_train=x_train,
        y_train=torch.from_numpy(labels)[train_idx].contiguous(),
        x_test=x[test_idx_t].contiguous(),
        y_test=torch.from_numpy(labels)[test_idx_t].contiguous(),
        classes=[str(d) for d in range(10)],
        mean=mean,
        std=std,
    )


def _channel_stats(x_uint8: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and (population) std in [0, 1] units, via a 256-bin histogram."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x_uint8.shape[1]):
        hist = torch.bincount(x_uint8[:, c].reshape(-1).to(torch.int64), minlength=256).to(torch.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = (hist * (values - m) ** 2).sum() / n
        means.append(float(m))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------


def encode_views(oy, ox, flip) -> torch.Tensor:
    """``view_id = (offset_y * 9 + offset_x) * 2 + flip`` (int64), for ints or tensors."""
    oy, ox, flip = (torch.as_tensor(v) for v in (oy, ox, flip))
    return (oy.long() * _OFFSETS + ox.long()) * 2 + flip.long()


def decode_views(view_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_views`: ``(offset_y, offset_x, flip)`` as int64 tensors."""
    v = torch.as_tensor(view_ids).long()
    pos = torch.div(v, 2, rounding_mode="floor")
    return torch.div(pos, _OFFSETS, rounding_mode="floor"), pos % _OFFSETS, v % 2


def sample_views(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` view ids drawn uniformly over the 162 views (uniform offsets 0..8, fair flip); int64 on CPU."""
    return torch.randint(0, NUM_VIEWS, (int(n),), generator=generator, dtype=torch.int64)


_STATS_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):
        m = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        return m, s
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), device)
    hit = _STATS_CACHE.get(key)
    if hit is None:
        if len(_STATS_CACHE) > 64:
            _STATS_CACHE.clear()
        hit = (
            torch.tensor(key[0], dtype=torch.float32, device=device).reshape(1, -1, 1, 1),
            torch.tensor(key[1], dtype=torch.float32, device=device).reshape(1, -1, 1, 1),
        )
        _STATS_CACHE[key] = hit
    return hit


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(
            f"expected uint8 images of shape (N, C, H, W), got {getattr(x, 'dtype', type(x))} "
            f"{tuple(getattr(x, 'shape', ()))}"
        )


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """Test-time transform: ``(x / 255 - mean) / std`` as contiguous float32 on x's device.

    The same float32 operations as torchvision's ``ToTensor`` + ``Normalize`` (bit-exact).
    """
    _check_images(x_uint8)
    m, s = _stats(mean, std, x_uint8.device)
    return x_uint8.to(torch.float32).div_(255).sub_(m).div_(s).contiguous()


def augment(x_uint8: torch.Tensor, view_ids: torch.Tensor, mean, std) -> torch.Tensor:
    """Zero-pad 4 (raw pixels), crop at the views' offsets, flip, normalise: float32 (N, C, H, W) on x's device.

    One gather over the padded batch: output pixel (n, c, i, j) reads padded pixel
    ``(oy[n] + i, ox[n] + (W-1-j if flip[n] else j))``. ``view_ids`` may live on the CPU or on x's device.
    Bit-exact with torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize.
    """
    _check_images(x_uint8)
    n, c, h, w = x_uint8.shape
    view_ids = torch.as_tensor(view_ids)
    if view_ids.shape != (n,):
        raise ValueError(f"view_ids must have shape ({n},), got {tuple(view_ids.shape)}")
    if view_ids.device.type == "cpu" and n and (int(view_ids.min()) < 0 or int(view_ids.max()) >= NUM_VIEWS):
        raise ValueError(f"view ids must lie in 0..{NUM_VIEWS - 1}")
    device = x_uint8.device
    v = view_ids.to(device=device, dtype=torch.int64, non_blocking=True)
    flip = v % 2
    pos = v // 2
    oy = pos // _OFFSETS
    ox = pos % _OFFSETS
    wp = w + 2 * PAD
    rows = oy[:, None] + torch.arange(h, device=device)  # (N, H) padded row of each output row
    cols_fwd = torch.arange(w, device=device)
    cols = ox[:, None] + torch.where(flip[:, None].bool(), (w - 1) - cols_fwd, cols_fwd)  # (N, W)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    padded = F.pad(x_uint8, (PAD, PAD, PAD, PAD)).reshape(n, c, -1)  # zeros in raw pixel space
    out = torch.gather(padded, 2, index).reshape(n, c, h, w)
    m, s = _stats(mean, std, device)
    return out.to(torch.float32).div_(255).sub_(m).div_(s)


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    images: torch.Tensor  # float32 normalised (B, 3, 32, 32), on the data's device
    labels: torch.Tensor  # int64 (B,)
    indices: torch.Tensor  # int64 (B,) sample indices into the split
    view_ids: torch.Tensor | None  # int64 (B,) on the data's device; None when not augmented


def _epoch_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


class BatchIterator:
    """Mini-batches of device-resident uint8 images, normalised (and augmented) on the fly.

    The permutation and the views of an epoch come from a CPU ``torch.Generator`` seeded from
    ``(seed, epoch)`` only; views are drawn per sample index, so sample i gets the same view in a given epoch
    whatever the batch size. Call :meth:`set_epoch` before iterating each epoch (iterating twice without it
    replays the same epoch).
    """

    def __init__(
        self,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        augment: bool,
        mean,
        std,
        seed: int = 0,
    ) -> None:
        _check_images(x_uint8)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x_uint8.shape[0]:
            raise ValueError(
                f"y must be a 1-d tensor with one label per image ({x_uint8.shape[0]}), got "
                f"{tuple(getattr(y, 'shape', ()))}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.x = x_uint8
        self.y = y if y.dtype == torch.int64 else y.long()
        if self.y.device != x_uint8.device:
            raise ValueError(f"x is on {x_uint8.device} but y on {self.y.device}; put both on the same device")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.augment = bool(augment)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(order, views) of the current epoch on CPU: sample order (N,) and per-sample view ids (N,) or None."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_epoch_seed(self.seed, self.epoch))
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        views = sample_views(n, gen) if self.augment else None
        return order, views

    def __iter__(self) -> Iterator[Batch]:
        order, views = self.epoch_plan()
        device = self.x.device
        order = order.to(device)
        views = views.to(device) if views is not None else None
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.x[idx]
            if views is not None:
                v = views[idx]
                images = augment(xb, v, self.mean, self.std)
            else:
                v = None
                images = normalize(xb, self.mean, self.std)
            yield Batch(images=images, labels=self.y[idx], indices=idx, view_ids=v)
