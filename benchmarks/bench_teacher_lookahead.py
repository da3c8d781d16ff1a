#!/usr/bin/env python
"""Teacher-cache cost per batch with a partly warm cache: spare call slots zero-padded vs filled by lookahead.

Usage:  python benchmarks/bench_teacher_lookahead.py [--teacher-run ce_resnet56_s0_55506ec4e5] [--results DIR]
            [--data-dir DIR] [--coverage 0.25,0.6] [--batches 120] [--threads 2] [--json PATH]

The paper campaign's students read the resnet56 teacher through ``teacher_cache.CachedTeacher``. Every teacher
call runs exactly ``CANONICAL_BATCH`` (64) images, so a batch of 64 with any miss used to cost a whole call,
however many of its views were cached: a partly warm cache saved nothing. With the epoch's order known
(``begin_epoch``), a call's spare slots compute the epoch's next uncached views instead. This times the teacher
source alone (augmentation, lookups, teacher calls; no student) over the first ``--batches`` batches of an epoch
of full CIFAR-100 at batch 64, with a random ``--coverage`` fraction of the (sample, view) table marked filled
(the same entries in both modes; the values are not read, so they need not be real), in fp32 as the campaign's
plan runs. The teacher's weights come from the results store (the committed paper-campaign teacher by default).
No test asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckd_study.data import NUM_VIEWS, BatchIterator, load_dataset  # noqa: E402
from ckd_study.runs import RunStore, cpu_name  # noqa: E402
from ckd_study.teacher_cache import CANONICAL_BATCH, CachedTeacher, TeacherOutputCache  # noqa: E402
from ckd_study.train import DeviceSetup, LiveTeacher  # noqa: E402


def time_source(live, data, dims, coverage: float, batches: int, lookahead: bool) -> dict:
    cache = TeacherOutputCache(len(data.x_train), dims)
    size = len(data.x_train) * NUM_VIEWS
    warm = torch.randperm(size, generator=torch.Generator().manual_seed(0))[:int(coverage * size)]
    cache.filled[warm] = True
    source = CachedTeacher(live, cache)
    epoch = BatchIterator(data.x_train, data.y_train, 64, shuffle=True, drop_last=False, augment=True,
                          mean=data.mean, std=data.std, seed=0)
    epoch.set_epoch(1)
    started = time.perf_counter()
    if lookahead:
        source.begin_epoch(epoch)
    for step, batch in enumerate(epoch):
        if step == batches:
            break
        source(batch)
    seconds = time.perf_counter() - started
    return {"coverage": coverage, "mode": "lookahead" if lookahead else "zero-padded", "batches": batches,
            "seconds": seconds, "seconds_per_batch": seconds / batches, "teacher_calls": cache.calls,
            "views_computed": cache.misses + cache.prefetched, "batch_misses": cache.misses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-run", default="ce_resnet56_s0_55506ec4e5")
    ap.add_argument("--results", type=Path, default=None, help="results store (default: $CKD_RESULTS_DIR or results/)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--coverage", default="0.25,0.6")
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = RunStore(args.results)
    setup = DeviceSetup.for_device("cpu", "fp32")
    live = LiveTeacher(setup.prepare_model(store.load_model(args.teacher_run)), setup)
    data = load_dataset("cifar100", args.data_dir)
    dims = {"logits": live.model.num_classes, "pooled": live.model.pooled_dim}
    rows = []
    for coverage in (float(c) for c in args.coverage.split(",")):
        for lookahead in (False, True):
            row = time_source(live, data, dims, coverage, args.batches, lookahead)
            rows.append(row)
            print(f"coverage {coverage:.2f} {row['mode']:>11}: {row['seconds_per_batch'] * 1e3:7.1f} ms/batch, "
                  f"{row['teacher_calls']} teacher calls for {row['views_computed']} views", flush=True)
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device_name": cpu_name(),
              "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "teacher_run": args.teacher_run, "compute_key": setup.compute_key, "batch_size": 64,
              "canonical_batch": CANONICAL_BATCH, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
