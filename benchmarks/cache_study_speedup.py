#!/usr/bin/env python
"""The teacher cache across a multi-run study: what the quick preset's main table cost with and without it.

Reads the stored runs of a preset's main table (``make reproduce PRESET=quick`` trains them, with the cache
on, the default) and trains one more run if it is missing: the same config as the table's KD seed-0 run but
with ``teacher_cache=False`` (the live teacher every step). It then reports, per distillation run, the
training images/s and time, whether the run was the one that filled the cache (the first distillation run
of the study meets every view for the first time; it runs the teacher on those misses only), and the
projected cost of the whole table with the live teacher.

Usage: python benchmarks/cache_study_speedup.py [--preset quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckd_study import study  # noqa: E402
from ckd_study.runs import RunStore, atomic_write_json, run  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    store = RunStore()
    entries = [e for e in study.experiment_configs(args.preset, "main") if e.config.teacher is not None]
    rows = []
    for e in entries:
        s = store.summary(e.config.run_id)
        if s is None:
            print(f"missing run {e.config.run_id}: run `make reproduce PRESET={args.preset}` first", file=sys.stderr)
            return 1
        env = json.loads((store.run_dir(e.config.run_id) / "environment.json").read_text())
        rows.append({"run_id": s["run_id"], "method": s["method"], "seed": s["seed"], "teacher_cache": True,
                     "images_per_s": s["images_per_s"], "train_time_s": s["train_time_s"],
                     "finished": (store.run_dir(e.config.run_id) / "summary.json").stat().st_mtime,
                     "torch_threads": env["torch_threads"]})
    rows.sort(key=lambda r: r["finished"])
    rows[0]["note"] = "first distillation run: filled the cache (teacher ran on its misses)"
    kd0 = next(e.config for e in entries if e.config.method == "kd" and e.config.seed == 0)
    live_cfg = kd0.replace(teacher_cache=False)
    live = run(live_cfg, store=store)
    cached_kd0 = store.summary(kd0.run_id)
    warm = [r for r in rows[1:]]
    warm_ips = sum(r["images_per_s"] for r in warm) / len(warm)
    per_run_images = cached_kd0["images_per_s"] * cached_kd0["train_time_s"]
    live_total = len(rows) * per_run_images / live["images_per_s"]
    actual_total = sum(r["train_time_s"] for r in rows)
    result = {
        "preset": args.preset,
        "distillation_runs": len(rows),
        "live_teacher_run": {"run_id": live["run_id"], "images_per_s": live["images_per_s"],
                             "train_time_s": live["train_time_s"]},
        "cold_cache_run": {k: rows[0][k] for k in ("run_id", "images_per_s", "train_time_s")},
        "warm_cache_mean_images_per_s": warm_ips,
        "speedup_warm_vs_live": warm_ips / live["images_per_s"],
        "speedup_cold_vs_live": rows[0]["images_per_s"] / live["images_per_s"],
        "table_train_time_s_cached": actual_total,
        "table_train_time_s_live_projected": live_total,
        "table_speedup": live_total / actual_total,
        "runs": rows,
    }
    print(f"| run | method | seed | images/s | train time (s) | note |\n|---|---|---|---|---|---|")
    print(f"| {live['run_id']} | {live_cfg.method} (live teacher) | {live_cfg.seed} | {live['images_per_s']:.0f} | "
          f"{live['train_time_s']:.1f} | teacher_cache=False |")
    for r in rows:
        print(f"| {r['run_id']} | {r['method']} | {r['seed']} | {r['images_per_s']:.0f} | {r['train_time_s']:.1f} | "
              f"{r.get('note', 'warm cache')} |")
    print(f"\nwarm cache {warm_ips:.0f} img/s vs live teacher {live['images_per_s']:.0f} img/s: "
          f"{result['speedup_warm_vs_live']:.2f}x; the whole table's training took {actual_total:.0f} s, "
          f"projected {live_total:.0f} s with the live teacher ({result['table_speedup']:.2f}x)")
    path = args.json or HERE / "results" / f"cache_study_{args.preset}.json"
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
