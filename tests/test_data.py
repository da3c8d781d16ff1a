"""Tests for ckd_study.data: loading (real CIFAR-100, digits, broken folders), augmentation, batch iterator."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ckd_study.data import (
    NUM_VIEWS,
    Batch,
    BatchIterator,
    DatasetError,
    ImageDataset,
    augment,
    available_datasets,
    decode_views,
    default_data_root,
    encode_views,
    load_dataset,
    normalize,
    resolve_data_root,
    sample_views,
)

REPO = Path(__file__).resolve().parent.parent
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _real_data_root() -> Path | None:
    env = os.environ.get("CKD_DATA_DIR")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "datasets"
    return shared if shared.is_dir() else None


def _exact_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std in [0,1] units via a histogram (exact, low memory)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(3):
        h = torch.bincount(x[:, c].reshape(-1).long(), minlength=256).double()
        m = (h * v).sum() / h.sum()
        means.append(float(m))
        stds.append(float(((h * (v - m) ** 2).sum() / h.sum()).sqrt()))
    return means, stds


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, x=x, y=y)


def _fake_cifar100(folder: Path, n_shards: int = 2, per_class_per_shard: int = 1, sums: bool = True) -> dict:
    """A tiny valid npz-shard layout: 100 classes, random pixels. Returns the arrays written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(123)
    classes = [f"class{i:03d}" for i in range(100)]
    (folder / "classes.txt").write_text("\n".join(classes) + "\n")
    ys = []
    for s in range(n_shards):
        y = np.repeat(np.arange(100, dtype=np.uint8), per_class_per_shard)
        y = np.roll(y, s)  # shards differ so the concatenation order is observable
        x = rng.integers(0, 256, size=(y.size, 32, 32, 3), dtype=np.uint8)
        _write_npz(folder / f"train-{s}.npz", x, y)
        ys.append(y)
    y_test = np.arange(100, dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(100, 32, 32, 3), dtype=np.uint8)
    _write_npz(folder / "test.npz", x_test, y_test)
    if sums:
        _write_sums(folder)
    return {"classes": classes, "y_train": np.concatenate(ys), "x_test": x_test, "y_test": y_test}


def _write_sums(folder: Path) -> None:
    lines = []
    for p in sorted(folder.iterdir()):
        if p.name != "SHA256SUMS":
            lines.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """Small tensors everywhere here: one intra-op thread is as fast on an idle machine and avoids the large
    slow-downs of oversubscribed OpenMP threads on a busy 2-core CI box. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar100_or_none():
    root = _real_data_root()
    if root is None or not (root / "cifar100").is_dir():
        return None
    return load_dataset("cifar100", root=root)


@pytest.fixture(scope="module")
def cifar100(cifar100_or_none):
    if cifar100_or_none is None:
        root = _real_data_root()
        pytest.skip(
            f"real CIFAR-100 not found: looked for {(root or REPO.parent / 'shared' / 'datasets') / 'cifar100'}/; "
            f"set the CKD_DATA_DIR env var to the folder holding cifar100/ (e.g. ../shared/datasets)"
        )
    return cifar100_or_none


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# --------------------------------------------------------------------------------------------------
# real CIFAR-100
# --------------------------------------------------------------------------------------------------


def test_cifar100_real_data(cifar100):
    ds = cifar100
    assert ds.name == "cifar100"
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert ds.num_classes == len(ds.classes) == 100
    assert ds.classes[0] == "apple" and ds.classes[99] == "worm"
    assert torch.bincount(ds.y_train, minlength=100).tolist() == [500] * 100
    assert torch.bincount(ds.y_test, minlength=100).tolist() == [100] * 100
    mean, std = _exact_stats(ds.x_train)
    np.testing.assert_allclose(mean, (0.50707516, 0.48654887, 0.44091784), atol=1e-6, rtol=0)
    np.testing.assert_allclose(std, (0.26733429, 0.25643846, 0.27615047), atol=1e-6, rtol=0)
    assert ds.mean == CIFAR100_MEAN and ds.std == CIFAR100_STD  # the spec's constants, exactly


def test_cifar100_real_subset(cifar100):
    sub = cifar100.subset(train_per_class=100, test_per_class=20, seed=3)
    assert sub.name == "cifar100[train=100/class,test=20/class]"
    assert torch.bincount(sub.y_train, minlength=100).tolist() == [100] * 100
    assert torch.bincount(sub.y_test, minlength=100).tolist() == [20] * 100
    again = cifar100.subset(train_per_class=100, test_per_class=20, seed=3)
    assert torch.equal(sub.x_train, again.x_train) and torch.equal(sub.y_test, again.y_test)
    with pytest.raises(ValueError, match="500"):
        cifar100.subset(train_per_class=501)


# --------------------------------------------------------------------------------------------------
# missing / corrupt data
# --------------------------------------------------------------------------------------------------


def test_missing_data_message(tmp_path):
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar100", root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "cifar100") in msg  # the shard folder tried
    assert str(tmp_path / "cifar-100-python") in msg  # the torchvision folder tried
    assert "download=True" in msg and "CKD_DATA_DIR" in msg and "train-*.npz" in msg


def test_missing_data_cifar10(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path / "nowhere")


def test_fake_shard_layout_loads(tmp_path):
    folder = tmp_path / "cifar100"
    ref = _fake_cifar100(folder, n_shards=11)  # train-10 must come after train-9 (numeric order)
    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.classes == ref["classes"]
    assert ds.x_train.shape == (1100, 3, 32, 32) and ds.x_train.is_contiguous()
    np.testing.assert_array_equal(ds.y_train.numpy(), ref["y_train"])
    np.testing.assert_array_equal(ds.x_test.permute(0, 2, 3, 1).numpy(), ref["x_test"])
    assert ds.y_test.dtype == torch.int64


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped_bytes"])
def test_corrupt_shard(tmp_path, damage):
    folder = tmp_path / "cifar100"
    _fake_cifar100(folder, sums=False)
    shard = folder / "train-0.npz"
    raw = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        shard.write_bytes(b"this is not an npz file" * 10)
    else:  # same size, corrupted compressed payload: only the zip CRC / zlib can notice
        for i in range(200, 260):
            raw[i] ^= 0xFF
        shard.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as ei:
        load_dataset("cifar100", root=tmp_path)
    assert str(shard) in str(ei.value)
    assert "corrupt" in str(ei.value) or "not an npz" in str(ei.value)


def test_sha256_mismatch(tmp_path):
    folder = tmp_path / "cifar100"
    _fake_cifar100(folder, sums=True)
    test_file = folder / "test.npz"
    x = np.zeros((100, 32, 32, 3), np.uint8)
    _write_npz(test_file, x, np.arange(100, dtype=np.uint8))  # valid npz, but not the listed bytes
    with pytest.raises(DatasetError, match="checksum mismatch") as ei:
        load_dataset("cifar100", root=tmp_path)
    assert str(test_file) in str(ei.value)


def test_sha256_listed_file_missing(tmp_path):
    folder = tmp_path / "cifar100"
    _fake_cifar100(folder, sums=True)
    with open(folder / "SHA256SUMS", "a") as f:
        f.write("0" * 64 + "  train-extra.bin\n")
    with pytest.raises(DatasetError, match="train-extra.bin"):
        load_dataset("cifar100", root=tmp_path)


def test_invalid_arrays(tmp_path):
    folder = tmp_path / "cifar100"
    _fake_cifar100(folder, sums=False)
    shard = folder / "train-1.npz"
    _write_npz(shard, np.zeros((100, 32, 32, 3), np.float32), np.arange(100, dtype=np.uint8))
    with pytest.raises(DatasetError, match="uint8") as ei:
        load_dataset("cifar100", root=tmp_path)
    assert str(shard) in str(ei.value)
    _write_npz(shard, np.zeros((100, 32, 32, 3), np.uint8), np.full(100, 100, np.uint8))
    with pytest.raises(DatasetError, match="labels must lie in 0..99"):
        load_dataset("cifar100", root=tmp_path)
    _write_npz(shard, np.zeros((100, 3, 32, 32), np.uint8), np.arange(100, dtype=np.uint8))  # CHW, not HWC
    with pytest.raises(DatasetError, match="32, 32, 3"):
        load_dataset("cifar100", root=tmp_path)


def test_wrong_class_count_and_incomplete_layout(tmp_path):
    folder = tmp_path / "cifar100"
    _fake_cifar100(folder, sums=False)
    (folder / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match="classes.txt"):
        load_dataset("cifar100", root=tmp_path)
    (folder / "test.npz").unlink()
    with pytest.raises(DatasetError, match="incomplete") as ei:
        load_dataset("cifar100", root=tmp_path)
    assert str(folder / "test.npz") in str(ei.value)


def test_corrupt_torchvision_layout(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()  # present but empty: torchvision's md5 check fails
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(DatasetError, match="internet") as ei:
        load_dataset("cifar100", root=tmp_path, download=True)
    assert isinstance(ei.value.__cause__, urllib.error.URLError)


def test_unknown_dataset_name():
    with pytest.raises(ValueError) as ei:
        load_dataset("imagenet")
    for name in available_datasets():
        assert name in str(ei.value)
    assert available_datasets() == ["cifar10", "cifar100", "digits"]


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("CKD_DATA_DIR")
    assert default_data_root() == REPO / "data"


def test_resolve_data_root_prefers_the_given_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path / "from_env"))
    assert resolve_data_root(None) == tmp_path / "from_env"
    assert resolve_data_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_root("~/cifar") == tmp_path / "cifar"


# --------------------------------------------------------------------------------------------------
# digits and ImageDataset
# --------------------------------------------------------------------------------------------------


def test_digits(digits):
    ds = digits
    assert ds.name == "digits" and ds.classes == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.x_train.shape == (1438, 3, 32, 32) and ds.x_test.shape == (359, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])  # grey replicated to RGB
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    # stratified: each class's test share is round(20%) of that class
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(ds.y_test, minlength=10).numpy()
    np.testing.assert_array_equal(test_counts, np.rint(0.2 * totals).astype(int))
    np.testing.assert_array_equal(torch.bincount(ds.y_train, minlength=10).numpy() + test_counts, totals)
    # normalisation constants from the train split
    mean, std = _exact_stats(ds.x_train)
    np.testing.assert_allclose(ds.mean, mean, atol=1e-12)
    np.testing.assert_allclose(ds.std, std, atol=1e-12)
    # fixed forever: the split is the same on every call
    again = load_dataset("digits")
    for a in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(ds, a), getattr(again, a))
    assert ds.mean == again.mean


def test_subset(digits):
    sub = digits.subset(train_per_class=50, test_per_class=10, seed=1)
    assert sub.name == "digits[train=50/class,test=10/class]"
    assert torch.bincount(sub.y_train, minlength=10).tolist() == [50] * 10
    assert torch.bincount(sub.y_test, minlength=10).tolist() == [10] * 10
    assert sub.mean == digits.mean and sub.classes == digits.classes
    same = digits.subset(train_per_class=50, test_per_class=10, seed=1)
    assert torch.equal(sub.x_train, same.x_train) and torch.equal(sub.x_test, same.x_test)
    other = digits.subset(train_per_class=50, test_per_class=10, seed=2)
    assert not torch.equal(sub.x_train, other.x_train)
    # the train choice does not depend on test_per_class; None keeps a split whole
    only_train = digits.subset(train_per_class=50, seed=1)
    assert only_train.name == "digits[train=50/class]"
    assert torch.equal(only_train.x_train, sub.x_train) and torch.equal(only_train.x_test, digits.x_test)
    with pytest.raises(ValueError, match="per class"):
        digits.subset(train_per_class=1000)
    with pytest.raises(ValueError):
        digits.subset(test_per_class=0)


def test_dataset_to_and_validation(digits):
    assert digits.to("cpu") is digits
    meta = digits.to("meta")
    assert meta.x_train.device.type == "meta" and meta.name == "digits"
    with pytest.raises(ValueError):
        ImageDataset("bad", digits.x_train.float(), digits.y_train, digits.x_test, digits.y_test,
                     digits.classes, digits.mean, digits.std)
    assert "digits" in repr(digits) and len(repr(digits)) < 300


# --------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------


def test_view_encoding_round_trip():
    ids = torch.arange(NUM_VIEWS)
    oy, ox, flip = decode_views(ids)
    assert NUM_VIEWS == 162
    assert oy.min() == 0 and oy.max() == 8 and ox.min() == 0 and ox.max() == 8 and set(flip.tolist()) == {0, 1}
    assert torch.equal(encode_views(oy, ox, flip), ids)
    triples = {(int(a), int(b), int(c)) for a, b, c in zip(oy, ox, flip)}
    assert len(triples) == 162
    assert int(encode_views(3, 5, 1)) == (3 * 9 + 5) * 2 + 1


def test_sample_views_uniform():
    g = torch.Generator().manual_seed(0)
    v = sample_views(162_000, g)
    assert v.dtype == torch.int64 and v.device.type == "cpu" and v.shape == (162_000,)
    counts = torch.bincount(v, minlength=NUM_VIEWS)
    assert counts.numel() == NUM_VIEWS and int(counts.min()) > 800 and int(counts.max()) < 1200  # mean 1000
    oy, ox, flip = decode_views(v)
    assert abs(flip.float().mean().item() - 0.5) < 0.01
    assert abs(oy.float().mean().item() - 4) < 0.05 and abs(ox.float().mean().item() - 4) < 0.05
    same = [sample_views(10, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(same[0], same[1])


def _test_images(cifar100_or_none) -> torch.Tensor:
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=rng, dtype=torch.int64).to(torch.uint8)
    x[0] = 255  # saturated image: padding must still be zero
    if cifar100_or_none is not None:
        x = torch.cat([x, cifar100_or_none.x_test[::1250]])  # 8 real test images
    return x


def test_augment_matches_torchvision_functional(cifar100_or_none):
    """Every one of the 162 views (corners, edges and all the rest), on random and real images (three images per
    view, rotating, so every image meets dozens of views), equals torchvision's pad/crop/flip/normalise."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    x = _test_images(cifar100_or_none)
    n_img = x.shape[0]
    for v in range(NUM_VIEWS):
        oy, ox, flip = (int(t) for t in decode_views(torch.tensor(v)))
        ours = augment(x, torch.full((n_img,), v), CIFAR100_MEAN, CIFAR100_STD)
        for n in sorted({v % n_img, (v + 5) % n_img, (v + 9) % n_img}):
            img = Image.fromarray(x[n].permute(1, 2, 0).numpy())
            ref = TF.crop(TF.pad(img, 4, fill=0), top=oy, left=ox, height=32, width=32)
            if flip:
                ref = TF.hflip(ref)
            ref = TF.normalize(TF.to_tensor(ref), CIFAR100_MEAN, CIFAR100_STD)
            assert (ours[n] - ref).abs().max().item() < 1e-6, (v, n)


def test_augment_matches_torchvision_random_transforms(cifar100_or_none):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize under a fixed torch seed draws
    (top, left) via RandomCrop.get_params on the padded image and a flip via torch.rand(1) < 0.5; replaying
    those draws as a view id reproduces the pipeline's output."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    x = _test_images(cifar100_or_none)
    crop = T.RandomCrop(32, padding=4)
    flip_t = T.RandomHorizontalFlip()
    pipeline = T.Compose([crop, flip_t, T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    seen = set()
    for seed in range(300):
        n = seed % x.shape[0]
        img = Image.fromarray(x[n].permute(1, 2, 0).numpy())
        # RandomCrop alone is pad + crop at get_params' draw
        torch.manual_seed(seed)
        cropped = crop(img)
        torch.manual_seed(seed)
        top, left, h, w = T.RandomCrop.get_params(TF.pad(img, 4, fill=0), (32, 32))
        assert (h, w) == (32, 32)
        assert np.array_equal(np.asarray(cropped), np.asarray(TF.crop(TF.pad(img, 4, fill=0), top, left, 32, 32)))
        # RandomHorizontalFlip alone is hflip when torch.rand(1) < 0.5
        torch.manual_seed(seed)
        flipped = flip_t(img)
        torch.manual_seed(seed)
        do_flip = bool(torch.rand(1) < 0.5)
        assert np.array_equal(np.asarray(flipped), np.asarray(TF.hflip(img) if do_flip else img))
        # the whole pipeline: crop draws first, then the flip
        torch.manual_seed(seed)
        ref = pipeline(img)
        torch.manual_seed(seed)
        top, left, _, _ = T.RandomCrop.get_params(TF.pad(img, 4, fill=0), (32, 32))
        do_flip = bool(torch.rand(1) < 0.5)
        view = encode_views(top, left, int(do_flip)).reshape(1)
        ours = augment(x[n : n + 1], view, CIFAR100_MEAN, CIFAR100_STD)[0]
        assert (ours - ref).abs().max().item() < 1e-6, seed
        seen.add(int(view))
    assert len(seen) > 100  # the seeds exercised many different views


def test_normalize_matches_torchvision(cifar100_or_none):
    import torchvision.transforms.functional as TF
    from PIL import Image

    x = _test_images(cifar100_or_none)
    ours = normalize(x, CIFAR100_MEAN, CIFAR100_STD)
    assert ours.dtype == torch.float32 and ours.is_contiguous() and ours.shape == x.shape
    for n in range(x.shape[0]):
        ref = TF.normalize(TF.to_tensor(Image.fromarray(x[n].permute(1, 2, 0).numpy())), CIFAR100_MEAN, CIFAR100_STD)
        assert (ours[n] - ref).abs().max().item() < 1e-6


def test_view_zero_pads_top_left_with_zero_pixels():
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment(x, torch.tensor([0, encode_views(8, 8, 0)]), CIFAR100_MEAN, CIFAR100_STD)
    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    raw = ((out * std + mean) * 255).round()
    assert torch.all(raw[0, :, :4, :] == 0) and torch.all(raw[0, :, :, :4] == 0)  # view 0: top-left padding
    assert torch.all(raw[0, :, 4:, 4:] == 200)
    assert torch.all(raw[1, :, 28:, :] == 0) and torch.all(raw[1, :, :, 28:] == 0)  # (8, 8): bottom-right
    # padded pixels are exactly -mean/std after normalisation
    assert torch.allclose(out[0, :, 0, 0], -torch.tensor(CIFAR100_MEAN) / torch.tensor(CIFAR100_STD))


def test_augment_output_follows_x_device():
    # no GPU in CI: the meta device proves the computation follows x.device (view ids stay on the CPU)
    x = torch.empty((4, 3, 32, 32), dtype=torch.uint8, device="meta")
    out = augment(x, torch.tensor([0, 1, 80, 161]), CIFAR100_MEAN, CIFAR100_STD)
    assert out.device.type == "meta" and out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert normalize(x, CIFAR100_MEAN, CIFAR100_STD).device.type == "meta"
    cpu = augment(torch.zeros((4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 80, 161]), CIFAR100_MEAN,
                  CIFAR100_STD)
    assert cpu.is_contiguous() and cpu.dtype == torch.float32


def test_augment_rejects_bad_input():
    x = torch.zeros((2, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError):
        augment(x, torch.tensor([0, 162]), CIFAR100_MEAN, CIFAR100_STD)
    with pytest.raises(ValueError):
        augment(x, torch.tensor([0]), CIFAR100_MEAN, CIFAR100_STD)
    with pytest.raises(ValueError):
        augment(x.float(), torch.tensor([0, 1]), CIFAR100_MEAN, CIFAR100_STD)


def test_augment_is_fast():
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    v = sample_views(256, torch.Generator().manual_seed(0))
    for _ in range(3):
        augment(x, v, CIFAR100_MEAN, CIFAR100_STD)
    times = []
    for _ in range(11):
        t0 = time.perf_counter()
        augment(x, v, CIFAR100_MEAN, CIFAR100_STD)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[5] < 0.1  # about 1.5 ms on one idle core; loose to survive a busy CI machine


# --------------------------------------------------------------------------------------------------
# batch iterator
# --------------------------------------------------------------------------------------------------

N_FAKE = 103


@pytest.fixture(scope="module")
def fake_xy():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (N_FAKE, 3, 32, 32), generator=g, dtype=torch.int64).to(torch.uint8)
    y = torch.arange(N_FAKE) % 10
    return x, y


def _it(fake_xy, batch_size=16, **kw):
    x, y = fake_xy
    opts = dict(shuffle=True, drop_last=False, augment=True, mean=CIFAR100_MEAN, std=CIFAR100_STD, seed=0)
    opts.update(kw)
    return BatchIterator(x, y, batch_size, **opts)


def test_iterator_covers_every_sample_once(fake_xy):
    it = _it(fake_xy, batch_size=16, drop_last=False)
    batches = list(it)
    assert len(it) == len(batches) == 7
    assert [b.images.shape[0] for b in batches] == [16] * 6 + [7]
    idx = torch.cat([b.indices for b in batches])
    assert torch.equal(idx.sort().values, torch.arange(N_FAKE))
    assert not torch.equal(idx, torch.arange(N_FAKE))  # shuffled
    ordered = list(_it(fake_xy, batch_size=16, shuffle=False))
    assert torch.equal(torch.cat([b.indices for b in ordered]), torch.arange(N_FAKE))


def test_iterator_drop_last(fake_xy):
    it = _it(fake_xy, batch_size=16, drop_last=True)
    batches = list(it)
    assert len(it) == len(batches) == N_FAKE // 16
    assert all(b.images.shape == (16, 3, 32, 32) for b in batches)
    idx = torch.cat([b.indices for b in batches])
    assert idx.unique().numel() == idx.numel()
    assert len(_it(fake_xy, batch_size=200, drop_last=True)) == 0
    assert len(_it(fake_xy, batch_size=200, drop_last=False)) == 1


def test_iterator_determinism(fake_xy):
    a, b = _it(fake_xy), _it(fake_xy)
    for it in (a, b):
        it.set_epoch(3)
    for ba, bb in zip(a, b, strict=True):
        assert torch.equal(ba.indices, bb.indices) and torch.equal(ba.view_ids, bb.view_ids)
        assert torch.equal(ba.images, bb.images)
    a.set_epoch(4)
    first3 = torch.cat([x.indices for x in b])
    first4 = torch.cat([x.indices for x in a])
    assert not torch.equal(first3, first4)
    other_seed = _it(fake_xy, seed=1)
    other_seed.set_epoch(3)
    assert not torch.equal(torch.cat([x.indices for x in other_seed]), first3)


def test_iterator_views_independent_of_batch_size(fake_xy):
    def plan(bs):
        it = _it(fake_xy, batch_size=bs)
        it.set_epoch(2)
        bt = list(it)
        return torch.cat([x.indices for x in bt]), torch.cat([x.view_ids for x in bt])

    i7, v7 = plan(7)
    i32, v32 = plan(32)
    assert torch.equal(i7, i32) and torch.equal(v7, v32)


def test_iterator_batch_contents(fake_xy):
    x, y = fake_xy
    it = _it(fake_xy, batch_size=10)
    for batch in it:
        assert isinstance(batch, Batch)
        assert batch.indices.dtype == batch.labels.dtype == batch.view_ids.dtype == torch.int64
        assert batch.images.dtype == torch.float32 and batch.images.is_contiguous()
        assert torch.equal(y[batch.indices], batch.labels)
        assert batch.view_ids.device == x.device
        assert torch.equal(batch.images, augment(x[batch.indices], batch.view_ids, CIFAR100_MEAN, CIFAR100_STD))
    views = torch.cat([b.view_ids for b in it])
    assert views.unique().numel() > 50  # views vary across samples
    plain = _it(fake_xy, batch_size=10, augment=False)
    for batch in plain:
        assert batch.view_ids is None
        assert torch.equal(y[batch.indices], batch.labels)
        assert torch.equal(batch.images, normalize(x[batch.indices], CIFAR100_MEAN, CIFAR100_STD))


def test_iterator_validates(fake_xy):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            _it(fake_xy, batch_size=bad)
    x, y = fake_xy
    with pytest.raises(ValueError):
        BatchIterator(x, y[:-1], 8, shuffle=True, drop_last=False, augment=False, mean=CIFAR100_MEAN,
                      std=CIFAR100_STD)


def test_dataset_for_follows_the_data_folder_of_the_moment(tmp_path, monkeypatch):
    """The per-process dataset cache is keyed on the data folder: once a run loaded CIFAR-100 from one folder,
    pointing $CKD_DATA_DIR elsewhere loads from there, or fails when nothing is there (it once kept training on
    the first folder's data, which hid a missing dataset from a later command in the same process)."""
    from ckd_study.config import make_config
    from ckd_study.runs import dataset_for

    first, second = tmp_path / "first", tmp_path / "second"
    ref_first = _fake_cifar100(first / "cifar100")
    config = make_config("quick", method="ce", train_per_class=None, test_per_class=None)
    assert config.dataset == "cifar100"
    monkeypatch.setenv("CKD_DATA_DIR", str(first))
    loaded = dataset_for(config, torch.device("cpu"))
    np.testing.assert_array_equal(loaded.y_train.numpy(), ref_first["y_train"])

    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="CIFAR-100 not found"):
        dataset_for(config, torch.device("cpu"))

    _fake_cifar100(second / "cifar100", n_shards=3)
    monkeypatch.setenv("CKD_DATA_DIR", str(second))
    assert len(dataset_for(config, torch.device("cpu")).y_train) == 300
    assert dataset_for(config, torch.device("cpu"), data_root=first).y_train.numpy().tolist() == \
        ref_first["y_train"].tolist()
