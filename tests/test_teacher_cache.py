"""The exact teacher-output cache: float16-exact lookups, persistence, and run results independent of warmth."""

from __future__ import annotations

import shutil

import pytest
import torch

from ckd_study.config import make_config
from ckd_study.data import NUM_VIEWS, Batch, BatchIterator, augment, load_dataset, sample_views
from ckd_study.models import ModelOutput, create_model
from ckd_study import teacher_cache
from ckd_study.runs import RunStore, precompute_teacher_cache, run
from ckd_study.teacher_cache import (CANONICAL_BATCH, CachedTeacher, TeacherOutputCache, cache_path,
                                     cached_teacher_source, canonical_outputs)
from ckd_study.train import DeviceSetup, LiveTeacher


def _compute_key(config) -> str:
    """The teacher-cache key of a CPU run of ``config`` (precision and memory format)."""
    return DeviceSetup.for_device("cpu", config.precision).compute_key


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = load_dataset("digits").subset(6, 2)
    teacher = create_model("resnet14", data.num_classes).eval()
    # float32: the exactness checks compare with a plain float32 forward (auto is bf16 on a CPU with native bf16)
    dev = DeviceSetup.for_device("cpu", "fp32")
    return data, teacher, dev


def _batch(data, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=g)[:n]
    views = sample_views(n, g)
    images = augment(data.x_train[idx], views, data.mean, data.std)
    return Batch(images, data.y_train[idx], idx, views)


def _fp16_close(cached, live):
    # float16 has an 11-bit significand: relative rounding error at most 2^-11
    assert torch.all((cached - live).abs() <= live.abs() * 2.0**-11 + 1e-6)


def test_cache_matches_live_teacher_within_float16_rounding(setup):
    data, teacher, dev = setup
    live = LiveTeacher(teacher, dev)
    cache = TeacherOutputCache(len(data.x_train), {"logits": teacher.num_classes, "pooled": teacher.pooled_dim})
    cached = CachedTeacher(live, cache)
    batch = _batch(data)
    first = cached(batch)
    reference = live(batch)
    _fp16_close(first.logits, reference.logits)
    _fp16_close(first.pooled, reference.pooled)
    assert cache.misses == len(batch.indices) and cache.hits == 0
    second = cached(batch)
    assert cache.hits == len(batch.indices)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.pooled, second.pooled)
    # A batch mixing cached and new views: hits and misses are served consistently.
    mixed = _batch(data, n=20, seed=1)
    out = cached(mixed)
    _fp16_close(out.logits, live(mixed).logits)


def test_unaugmented_batches_fall_back_to_the_live_teacher(setup):
    data, teacher, dev = setup
    live = LiveTeacher(teacher, dev)
    cache = TeacherOutputCache(len(data.x_train), {"logits": teacher.num_classes, "pooled": teacher.pooled_dim})
    b = _batch(data)
    out = CachedTeacher(live, cache)(Batch(b.images, b.labels, b.indices, None))
    assert torch.equal(out.logits, live(b).logits) and cache.filled.sum() == 0


def test_methods_reading_feature_maps_get_no_cache(setup, tmp_path):
    data, teacher, dev = setup
    live = LiveTeacher(teacher, dev)
    summary = {"final_sha256": "ab" * 32}
    assert cached_teacher_source(live, {"feats"}, summary, data, dev, RunStore(tmp_path)) is None
    assert isinstance(cached_teacher_source(live, {"logits"}, summary, data, dev, RunStore(tmp_path)), CachedTeacher)


def test_fill_all_covers_every_view_exactly(setup):
    data, teacher, dev = setup
    small = data.subset(1, 1)
    cache = TeacherOutputCache(len(small.x_train), {"logits": teacher.num_classes, "pooled": teacher.pooled_dim})
    cache.fill_all(LiveTeacher(teacher, dev), small, batch_size=7)
    assert cache.coverage == 1.0
    idx = torch.tensor([3, 7, 0])
    views = torch.tensor([0, 161, 85])
    with torch.no_grad():
        live = teacher(augment(small.x_train[idx], views, small.mean, small.std))
    _fp16_close(cache.get(cache.keys(idx, views))["logits"], live.logits)


def test_save_merge_and_corrupt_file(setup, tmp_path):
    data, teacher, dev = setup
    dims = {"logits": teacher.num_classes, "pooled": teacher.pooled_dim}
    a = TeacherOutputCache(len(data.x_train), dims)
    CachedTeacher(LiveTeacher(teacher, dev), a)(_batch(data, seed=3))
    path = tmp_path / "cache.pt"
    a.save(path)
    b = TeacherOutputCache(len(data.x_train), dims)
    CachedTeacher(LiveTeacher(teacher, dev), b)(_batch(data, seed=4))
    b.save(path)  # merges a's entries from disk
    c = TeacherOutputCache(len(data.x_train), dims)
    assert c.merge_from(path)
    assert torch.equal(c.filled, a.filled | b.filled)
    keys = a.filled.nonzero().squeeze(1)
    assert torch.equal(c.values["logits"][keys], a.values["logits"][keys])
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilt"):
        assert not TeacherOutputCache(len(data.x_train), dims).merge_from(path)
    assert NUM_VIEWS == 162


def test_cached_values_do_not_depend_on_how_misses_were_grouped(setup):
    """The same views, filled through batches of different sizes and compositions (one by one, in an odd
    split, all at once, through fill_all): bit-identical cached values, because every value comes from a
    teacher call of exactly CANONICAL_BATCH images."""
    data, teacher, dev = setup
    live = LiveTeacher(teacher, dev)
    dims = {"logits": teacher.num_classes, "pooled": teacher.pooled_dim}
    batch = _batch(data, n=40, seed=7)
    keys = TeacherOutputCache.keys(batch.indices, batch.view_ids)
    groupings = {"all at once": [slice(0, 40)], "5 + 35": [slice(0, 5), slice(5, 40)],
                 "one by one": [slice(i, i + 1) for i in range(40)]}
    tables = {}
    for name, parts in groupings.items():
        cache = TeacherOutputCache(len(data.x_train), dims)
        cached = CachedTeacher(live, cache)
        for part in parts:
            cached(Batch(batch.images[part], batch.labels[part], batch.indices[part], batch.view_ids[part]))
        tables[name] = cache.get(keys)
    full = TeacherOutputCache(len(data.x_train), dims)
    full.fill_all(live, data, batch_size=100)  # augments 100 at a time: canonical calls of 64 + 36 padded
    tables["fill_all"] = full.get(keys)
    for name, values in tables.items():
        for out in ("logits", "pooled"):
            assert torch.equal(values[out], tables["all at once"][out]), (name, out)
    assert CANONICAL_BATCH == 64


def _epoch_batches(data, batch_size, epoch, seed=0):
    batches = BatchIterator(data.x_train, data.y_train, batch_size, shuffle=True, drop_last=False, augment=True,
                            mean=data.mean, std=data.std, seed=seed)
    batches.set_epoch(epoch)
    return batches


@pytest.mark.parametrize("warm_fraction", [0.0, 0.5])
def test_spare_call_slots_compute_the_epochs_next_views(warm_fraction):
    """Told the epoch's order (begin_epoch), a call fills the slots its batch's misses leave free with the next
    uncached views of the epoch: the epoch costs ceil(uncached / 64) teacher calls, not one per batch with a
    miss, and every value is bit-identical to a cache filled batch by batch without lookahead."""
    torch.manual_seed(0)
    data = load_dataset("digits").subset(30, 2)  # 300 training images: batches of 40, the last of 20
    teacher = create_model("resnet14", data.num_classes).eval()
    live = LiveTeacher(teacher, DeviceSetup.for_device("cpu", "fp32"))
    dims = {"logits": teacher.num_classes, "pooled": teacher.pooled_dim}
    order, views = _epoch_batches(data, 40, epoch=3).epoch_plan()
    epoch_keys = TeacherOutputCache.keys(order, views[order])
    warm = epoch_keys[torch.randperm(len(epoch_keys), generator=torch.Generator().manual_seed(1))
                      [:int(warm_fraction * len(epoch_keys))]]

    def filled_cache(lookahead: bool):
        cache = TeacherOutputCache(len(data.x_train), dims)
        source = CachedTeacher(live, cache)
        if len(warm):  # the same views warm in both caches, filled outside the epoch
            samples, view_ids = warm // NUM_VIEWS, warm % NUM_VIEWS
            cache.put(warm, canonical_outputs(live.forward_images,
                                              augment(data.x_train[samples], view_ids, data.mean, data.std), dims))
        batches = _epoch_batches(data, 40, epoch=3)
        if lookahead:
            source.begin_epoch(batches)
        for batch in batches:
            source(batch)
        return cache

    plain, ahead = filled_cache(False), filled_cache(True)
    uncached = len(epoch_keys) - len(warm)
    assert ahead.calls == -(-uncached // CANONICAL_BATCH)
    assert ahead.calls < plain.calls == len(_epoch_batches(data, 40, epoch=3))
    assert ahead.misses + ahead.prefetched == uncached == plain.misses and plain.prefetched == 0
    assert ahead.hits + ahead.misses == len(epoch_keys)
    assert bool(ahead.filled[epoch_keys].all()) and int(ahead.filled.sum()) == len(epoch_keys)
    for name in dims:
        assert torch.equal(ahead.get(epoch_keys)[name], plain.get(epoch_keys)[name]), name


def test_batches_off_the_announced_order_get_zero_padded_calls(setup):
    """Batches that are not the announced epoch's (another epoch's order) turn lookahead off: no view is
    prefetched, one call per batch, and the values are still those of the teacher."""
    data, teacher, dev = setup
    live = LiveTeacher(teacher, dev)
    dims = {"logits": teacher.num_classes, "pooled": teacher.pooled_dim}
    cache = TeacherOutputCache(len(data.x_train), dims)
    source = CachedTeacher(live, cache)
    source.begin_epoch(_epoch_batches(data, 8, epoch=0))
    other = list(_epoch_batches(data, 8, epoch=1))
    outputs = [source(batch) for batch in other]
    assert cache.prefetched == 0 and cache.calls == len(other)
    for batch, out in zip(other, outputs):
        _fp16_close(out.logits, live(batch).logits)


def test_canonical_outputs_pad_to_whole_calls():
    calls = []

    def forward(images):
        calls.append(len(images))
        return ModelOutput(logits=images.flatten(1)[:, :3] * 2, feats=[], preact_feats=[], pooled=images.flatten(1))

    images = torch.randn(70, 1, 2, 2)
    out = canonical_outputs(forward, images, ["logits", "pooled"])
    assert calls == [CANONICAL_BATCH, CANONICAL_BATCH]
    assert torch.equal(out["logits"], images.flatten(1)[:, :3] * 2) and out["pooled"].shape == (70, 4)


def test_run_results_do_not_depend_on_cache_warmth(tmp_path):
    cold = RunStore(tmp_path / "cold")
    config = make_config("smoke", method="kd", deterministic=True)
    first = run(config, store=cold, quiet=True)
    teacher_summary = cold.summary(config.teacher.run_id)
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    path = cache_path(cold.root, teacher_summary["final_sha256"], data, _compute_key(config))
    assert path.exists(), "the run stored the teacher outputs it computed"

    warm = RunStore(tmp_path / "warm")
    shutil.copytree(cold.run_dir(config.teacher.run_id), warm.run_dir(config.teacher.run_id))
    shutil.copytree(cold.root / "cache", warm.root / "cache")
    second = run(config, store=warm, quiet=True)
    assert second["final_sha256"] == first["final_sha256"]
    assert second["last_top1"] == first["last_top1"]
    # What the teacher source did is recorded: the cold run ran the teacher on its misses, the warm one never.
    views_seen = len(data.x_train) // config.batch_size * config.batch_size * config.epochs
    assert first["teacher_source"] == second["teacher_source"] == "cache"
    assert first["teacher_cache_misses"] > 0 and first["teacher_cache_hits"] + first["teacher_cache_misses"] == views_seen
    assert second["teacher_cache_misses"] == 0 and second["teacher_cache_hits"] == views_seen
    epochs = warm.metrics(config.run_id)
    assert [r["teacher_cache_misses"] for r in epochs] == [0] * config.epochs
    assert [r["teacher_calls"] for r in epochs] == [0] * config.epochs
    # The cold run filled spare call slots with the epoch's next views: whole calls, one per 64 new views.
    for r in cold.metrics(config.run_id):
        assert r["teacher_calls"] == -(-(r["teacher_cache_misses"] + r["teacher_cache_prefetched"]) // CANONICAL_BATCH)
        assert r["teacher_calls"] < len(data.x_train) // config.batch_size
    assert sum(r["teacher_cache_misses"] for r in cold.metrics(config.run_id)) == first["teacher_cache_misses"]

    # The same config without the cache distils from unrounded teacher outputs: a different run id, and
    # numbers that agree to within training noise (not asserted: they may differ in the last bits).
    live_cfg = config.replace(teacher_cache=False)
    assert live_cfg.run_id != config.run_id
    live = run(live_cfg, store=warm, quiet=True)
    assert live["status"] == "finished" and live["teacher_source"] == "live"
    assert "teacher_cache_hits" not in live and "teacher_cache_hits" not in warm.metrics(live_cfg.run_id)[-1]


SMALL = {"train_per_class": 6, "test_per_class": 2}  # 60 training images: 9,720 image-views to precompute


def _stored_table(path):
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return payload["keys"], payload["values"]


def test_precompute_fills_every_view_and_later_runs_only_read_it(tmp_path):
    config = make_config("smoke", method="kd", deterministic=True, **SMALL)
    lazy = RunStore(tmp_path / "lazy")
    reference = run(config, store=lazy, quiet=True)  # fills the cache lazily, with the views it meets
    pre = RunStore(tmp_path / "pre")
    shutil.copytree(lazy.run_dir(config.teacher.run_id), pre.run_dir(config.teacher.run_id))

    result = precompute_teacher_cache(config, store=pre, quiet=True)
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    assert result["image_views"] == len(data.x_train) * NUM_VIEWS
    assert result["cached_before"] == 0 and result["computed"] == result["image_views"] and result["coverage"] == 1.0
    keys, values = _stored_table(result["cache_path"])
    assert torch.equal(keys, torch.arange(result["image_views"]))
    # Bit for bit the values the lazy run computed for the views it met.
    lazy_keys, lazy_values = _stored_table(cache_path(lazy.root, reference["teacher_sha256"], data, _compute_key(config)))
    assert 0 < len(lazy_keys) < len(keys)
    for name in ("logits", "pooled"):
        assert torch.equal(values[name][lazy_keys], lazy_values[name])

    second = run(config, store=pre, quiet=True)
    assert second["teacher_cache_misses"] == 0 and second["teacher_cache_hits"] > 0
    assert second["final_sha256"] == reference["final_sha256"]
    again = precompute_teacher_cache(config, store=pre, quiet=True)
    assert again["computed"] == 0 and again["cached_before"] == again["image_views"]


def test_interrupted_precompute_continues_from_its_last_save(tmp_path, monkeypatch):
    config = make_config("smoke", method="kd", **SMALL)
    store = RunStore(tmp_path / "results")
    run(config.teacher, store=store, quiet=True)
    calls = []
    real = teacher_cache.canonical_outputs

    def dies_at_view_60(*args, **kwargs):  # the smoke training set is one augmentation chunk: one call a view
        calls.append(1)
        if len(calls) > 60:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "canonical_outputs", dies_at_view_60)
    with pytest.raises(KeyboardInterrupt):
        precompute_teacher_cache(config, store=store, quiet=True, save_every=25)
    monkeypatch.setattr(teacher_cache, "canonical_outputs", real)
    result = precompute_teacher_cache(config, store=store, quiet=True, save_every=25)
    per_view = result["image_views"] // NUM_VIEWS
    assert result["cached_before"] == 50 * per_view  # saved after views 25 and 50; views 51-60 were lost
    assert result["computed"] == (NUM_VIEWS - 50) * per_view and result["coverage"] == 1.0
    with pytest.raises(ValueError, match="save_every"):
        precompute_teacher_cache(config, store=store, save_every=0)


def test_an_interrupted_run_keeps_the_teacher_outputs_it_computed(tmp_path):
    """Ctrl-C or SIGTERM in the middle of a run: the teacher outputs computed so far are saved (a session's end
    would otherwise throw away hours of teacher forwards), exactly the views filled when it stopped."""
    store = RunStore(tmp_path)
    config = make_config("smoke", method="kd", deterministic=True)
    filled_at_stop = {}

    def stop(trainer, epoch, step):
        if epoch == 2 and step == 3:
            filled_at_stop["keys"] = trainer.teacher_source.cache.filled.nonzero().squeeze(1).clone()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, store=store, quiet=True, step_hook=stop)
    data = load_dataset("digits").subset(config.train_per_class, config.test_per_class, seed=0)
    path = cache_path(store.root, store.summary(config.teacher.run_id)["final_sha256"], data, _compute_key(config))
    assert path.exists(), "the interrupted run saved the teacher outputs it computed"
    keys, _ = _stored_table(path)
    assert len(filled_at_stop["keys"]) > len(data.x_train)  # all of epoch 1's views and some of epoch 2's
    assert torch.equal(keys.sort().values, filled_at_stop["keys"])
