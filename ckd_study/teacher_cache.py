"""Exact teacher-output cache.

The standard augmentation has exactly 162 views per image (9×9 crop offsets × 2 flips, ``data.NUM_VIEWS``).
The frozen teacher in eval mode maps each (sample, view) to fixed outputs, so its logits and pooled features
can be computed once and looked up by ``sample * 162 + view`` instead of running the teacher every step.

Values are stored in float16, on disk and on the training device. A file on disk carries a checksum per block of
``CHECK_BLOCK`` entries; a block that fails it on load is dropped (and recomputed when needed) and the file is
rewritten, so a damaged cache never becomes a silent wrong number. Every lookup returns the float16-rounded
values, whether they were cached before or computed on a miss, and every value is computed the same way: in a
teacher call of exactly ``CANONICAL_BATCH`` images (the missing views of a batch, zero-padded; kernels can
round the last float32 bit differently at different batch sizes, which could flip a float16 rounding). So a
run's result does not depend on how warm the cache was, which run filled it, or whether the run was killed and
resumed (tested); it differs from the live teacher only by float16 rounding (tested).

Filling is lazy by default: a batch with misses runs the teacher on its missing views, in calls of
``CANONICAL_BATCH`` (at the study's batch size of 64, never more than the live teacher), and runs that share
a teacher and a seed (every method of a table) see the same views, so after the first run they never run the
teacher. A call's spare slots (where a partly cached batch would pad with zeros) compute the next uncached
views of the epoch's order instead (``begin_epoch``: the order and views of an epoch are fixed by its seed),
so a partly warm cache costs about one call per 64 new views rather than one per batch; each value is still
computed in a call of exactly ``CANONICAL_BATCH`` images, so nothing else changes.
:meth:`TeacherOutputCache.fill_all` precomputes all 162 views (``ckd_study.runs.precompute_teacher_cache``,
``python -m ckd_study cache-teacher``; worth it before a grid of long runs: 240 epochs meet about 125 of the 162
views of each image anyway). Anything the cache cannot serve (no augmentation views, methods that read feature
maps) falls back to the live teacher.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import Callable

import torch

from .data import NUM_VIEWS, Batch, ImageDataset, augment, decode_views
from .models import ModelOutput
from .train import TeacherSource

CACHEABLE = frozenset({"logits", "pooled"})
CACHE_FORMAT = 3  # 2: values computed in canonical batches; 3: per-block checksums (older files are rebuilt)
CHECK_BLOCK = 1 << 16  # entries per checksum block: a corrupt block costs at most this many recomputed views
CANONICAL_BATCH = 64  # every cached value comes from a teacher call of exactly this many images
LOOKAHEAD = 16 * CANONICAL_BATCH  # how far ahead in the epoch's order a call looks for views to fill spare slots


def canonical_outputs(forward, images: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """``forward(chunk)`` (a teacher call returning a ModelOutput) on ``images`` in chunks of exactly
    ``CANONICAL_BATCH`` images, the last one zero-padded; returns float32 outputs ``names`` for ``images``."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(images), CANONICAL_BATCH):
        chunk = images[start:start + CANONICAL_BATCH]
        real = len(chunk)
        if real < CANONICAL_BATCH:
            chunk = torch.cat([chunk, chunk.new_zeros((CANONICAL_BATCH - real, *chunk.shape[1:]))])
        out = forward(chunk)
        for name in names:
            parts[name].append(getattr(out, name)[:real].float())
    return {name: torch.cat(values) for name, values in parts.items()}


def block_checksums(keys: torch.Tensor, values: dict[str, torch.Tensor], block: int = CHECK_BLOCK) -> list[str]:
    """A blake2b digest of every ``block`` entries (their keys and every value table's rows, in name order):
    what a cache file stores beside its values, and checks on load."""
    keys = keys.cpu()
    digests = []
    for start in range(0, len(keys), block):
        h = hashlib.blake2b(digest_size=16)
        h.update(keys[start:start + block].numpy().tobytes())
        for name in sorted(values):
            h.update(values[name][start:start + block].cpu().numpy().tobytes())
        digests.append(h.hexdigest())
    return digests


class TeacherOutputCache:
    """Dense float16 table of teacher outputs for ``num_samples × 162`` views, with a filled mask."""

    def __init__(self, num_samples: int, dims: dict[str, int], device: torch.device | str = "cpu") -> None:
        self.num_samples = num_samples
        self.dims = dict(dims)
        self.device = torch.device(device)
        size = num_samples * NUM_VIEWS
        self.values = {name: torch.zeros(size, dim, dtype=torch.float16, device=self.device)
                       for name, dim in self.dims.items()}
        self.filled = torch.zeros(size, dtype=torch.bool, device=self.device)
        self.hits = 0  # batch views found filled (including views prefetched earlier in the epoch)
        self.misses = 0  # batch views the teacher had to compute for their own batch
        self.prefetched = 0  # upcoming views computed in a call's spare slots
        self.calls = 0  # teacher calls of CANONICAL_BATCH images: the cost

    @staticmethod
    def keys(indices: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        return indices * NUM_VIEWS + view_ids.to(indices.device)

    @property
    def coverage(self) -> float:
        return float(self.filled.float().mean())

    def get(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: table[keys].float() for name, table in self.values.items()}

    def put(self, keys: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        for name, table in self.values.items():
            table[keys] = outputs[name].to(torch.float16)
        self.filled[keys] = True

    # -- disk: only the filled entries, merged with what is on disk, with per-block checksums ----------
    def save(self, path: Path) -> None:
        from .files import atomic_write_bytes

        if path.exists():
            self.merge_from(path)
        keys = self.filled.nonzero().squeeze(1).cpu()
        values = {n: t[keys.to(t.device)].cpu() for n, t in self.values.items()}
        payload = {"format": CACHE_FORMAT, "num_samples": self.num_samples, "dims": self.dims, "keys": keys,
                   "values": values, "check_block": CHECK_BLOCK, "checksums": block_checksums(keys, values)}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def merge_from(self, path: Path) -> bool:
        """Load the entries stored at ``path`` whose block checksum verifies. An unreadable or incompatible file
        is ignored, and the entries of a block that fails its checksum are dropped (the file holds derived
        data: what is dropped is recomputed when needed), each with a warning. Returns False when the file
        was not used whole (the caller rewrites it)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            ok = (payload.get("format") == CACHE_FORMAT and payload["num_samples"] == self.num_samples
                  and payload["dims"] == self.dims)
        except Exception as exc:  # corrupt cache files are rebuilt, never fatal
            warnings.warn(f"teacher cache {path} is unreadable ({exc}); it will be rebuilt", stacklevel=2)
            return False
        if not ok:
            warnings.warn(f"teacher cache {path} does not fit this teacher/dataset; it will be rebuilt", stacklevel=2)
            return False
        keys, values = payload["keys"], payload["values"]
        block = payload["check_block"]
        stored = payload["checksums"]
        actual = block_checksums(keys, values, block)
        good = torch.ones(len(keys), dtype=torch.bool)
        bad_blocks = [i for i, (a, b) in enumerate(zip(actual, stored)) if a != b] + \
            list(range(len(stored), len(actual)))
        for i in bad_blocks:
            good[i * block:(i + 1) * block] = False
        if bad_blocks:
            warnings.warn(f"teacher cache {path}: {len(bad_blocks)} of {len(actual)} blocks failed their checksum; "
                          f"their {int((~good).sum())} entries were dropped and will be recomputed", stacklevel=2)
        keys = keys[good].to(self.device)
        self.put(keys, {n: v[good].to(self.device) for n, v in values.items()})
        return not bad_blocks

    @torch.no_grad()
    def fill_all(self, live, data: ImageDataset, batch_size: int = 1024,
                 on_view: Callable[[int], None] | None = None) -> int:
        """Precompute all 162 views of every training image with ``live`` (a ``train.LiveTeacher``), skipping
        what is filled already; returns how many image-views were computed. ``batch_size`` images are augmented
        at a time, the teacher runs in calls of ``CANONICAL_BATCH``; ``on_view(view)`` is called after each view
        is complete (progress, saving)."""
        computed = 0
        for view in range(NUM_VIEWS):
            for start in range(0, self.num_samples, batch_size):
                idx = torch.arange(start, min(start + batch_size, self.num_samples), device=self.device)
                views = torch.full_like(idx, view)
                keys = self.keys(idx, views)
                if bool(self.filled[keys].all()):
                    continue
                images = augment(data.x_train[idx.to(data.x_train.device)], views.to(data.x_train.device),
                                 data.mean, data.std)
                self.put(keys, canonical_outputs(live.forward_images, images, self.dims))
                computed += len(keys)
            if on_view is not None:
                on_view(view)
        return computed


class CachedTeacher(TeacherSource):
    """A teacher source that serves logits and pooled features from a :class:`TeacherOutputCache`."""

    kind = "cache"

    def __init__(self, live, cache: TeacherOutputCache, path: Path | None = None) -> None:
        self.live = live
        self.cache = cache
        self.path = path
        self._order: torch.Tensor | None = None  # keys of the epoch's views in batch order (begin_epoch)
        self._cursor = 0
        self._images = None  # (uint8 images, mean, std) that the epoch's views are cut from

    def begin_epoch(self, batches) -> None:
        """Read the epoch's sample order and views from the batch iterator (a ``data.BatchIterator`` after
        ``set_epoch``), so that spare call slots can compute the views its next batches will ask for."""
        self._order, self._cursor = None, 0
        if not getattr(batches, "augment", False):
            return
        order, views = batches.epoch_plan()
        self._order = self.cache.keys(order, views[order]).to(self.cache.device)
        self._images = (batches.x, batches.mean, batches.std)

    def _upcoming(self, keys: torch.Tensor) -> torch.Tensor | None:
        """Keys of the views after this batch in the epoch's order, or None when the batch is not the one the
        order expects next (batches drawn some other way): then spare slots are padded with zeros."""
        if self._order is None:
            return None
        end = self._cursor + len(keys)
        if not torch.equal(self._order[self._cursor:end], keys):
            self._order = None
            return None
        self._cursor = end
        return self._order[end:end + LOOKAHEAD]

    @torch.no_grad()
    def __call__(self, batch: Batch) -> ModelOutput:
        if batch.view_ids is None:
            return self.live(batch)
        keys = self.cache.keys(batch.indices, batch.view_ids)
        upcoming = self._upcoming(keys)
        hit = self.cache.filled[keys]
        n_hit = int(hit.sum())
        self.cache.hits += n_hit
        if n_hit < len(keys):
            miss = ~hit
            self.cache.misses += len(keys) - n_hit
            todo, images = keys[miss], batch.images[miss]
            spare = -len(todo) % CANONICAL_BATCH
            if spare and upcoming is not None:
                extra = upcoming[~self.cache.filled[upcoming]][:spare]
                if len(extra):
                    x, mean, std = self._images
                    samples, views = (extra // NUM_VIEWS).to(x.device), (extra % NUM_VIEWS).to(x.device)
                    todo = torch.cat([todo, extra])
                    images = torch.cat([images, augment(x[samples], views, mean, std).to(images.device)])
                    self.cache.prefetched += len(extra)
            self.cache.put(todo, canonical_outputs(self.live.forward_images, images, self.cache.dims))
            self.cache.calls += math.ceil(len(todo) / CANONICAL_BATCH)
        values = self.cache.get(keys)
        return ModelOutput(logits=values["logits"], feats=[], preact_feats=[], pooled=values["pooled"])

    def counters(self) -> dict[str, int]:
        """Running totals the Trainer turns into per-epoch metrics (``teacher_cache_hits`` / ``_misses`` /
        ``_prefetched`` and ``teacher_calls``: the views first computed are misses + prefetched, the cost is
        calls × CANONICAL_BATCH teacher images)."""
        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_prefetched": self.cache.prefetched, "calls": self.cache.calls}

    def save(self) -> None:
        if self.path is not None:
            self.cache.save(self.path)


def cache_path(store_root: Path, teacher_sha256: str, data: ImageDataset, compute_key: str) -> Path:
    """One file per teacher weights, training set and way the values were computed (``DeviceSetup.compute_key``:
    precision and memory format; bf16 and fp32, or two memory formats, give teacher outputs that differ, and a
    run must read the ones its own setup would compute)."""
    key = hashlib.sha256(f"{data.name}|{len(data.x_train)}|views{NUM_VIEWS}".encode()).hexdigest()[:12]
    return store_root / "cache" / f"teacher-{teacher_sha256[:16]}-data-{key}-{compute_key}.pt"


def cached_teacher_source(live, needed_outputs, teacher_summary, data: ImageDataset, setup, store):
    """A :class:`CachedTeacher` when the method reads only cacheable outputs, else None (live teacher)."""
    if not set(needed_outputs) <= CACHEABLE:
        return None
    model = live.model
    dims = {"logits": model.num_classes, "pooled": model.pooled_dim}
    cache = TeacherOutputCache(len(data.x_train), dims, setup.device)
    path = cache_path(store.root, teacher_summary["final_sha256"], data, setup.compute_key)
    if path.exists() and not cache.merge_from(path):
        try:  # rewrite a damaged file now, so no later run meets it
            cache.save(path)
        except OSError as exc:
            warnings.warn(f"could not rewrite the teacher cache {path} ({exc})", stacklevel=2)
    return CachedTeacher(live, cache, path)


__all__ = ["TeacherOutputCache", "CachedTeacher", "cached_teacher_source", "cache_path", "canonical_outputs",
           "CANONICAL_BATCH", "decode_views"]
