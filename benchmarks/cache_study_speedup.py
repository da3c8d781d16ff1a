#!/usr/bin/env python
"""The exact teacher-output cache across a multi-run study: a preset's main table with and without it.

Usage: python benchmarks/cache_study_speedup.py [--preset quick] [--results DIR] [--json PATH]

Needs the preset's main table in the results store (``make reproduce PRESET=quick`` trains it, cache on, the
default) and its teacher's checkpoint (``checkpoints/final.pt``, which stays local: run the teacher notebook or
``make reproduce`` once on this machine).

1. Controlled measurement, back to back in one invocation: the table's KD seed-0 config is trained three times
   in a scratch store holding a copy of the teacher run: ``live`` (``teacher_cache=False``: the teacher runs
   every step), ``cold`` (the cache starts empty: the teacher runs on every view it meets for the first time,
   the cache is saved at the end, as in the first distillation run of a study) and ``warm`` (the same config
   again over that cache: every lookup hits). Cold and warm must end with the same checkpoint (sha256): the
   cache's values do not depend on its warmth.
2. The stored table: its distillation runs' training times as ``make reproduce`` measured them (cache on),
   and the table's projected training time with the live teacher. The teacher's cost in a run does not depend
   on the method (same teacher, batch plan and epochs), so each run's live-teacher time is its measured time
   plus the controlled difference: ``live - warm`` for a run that read a warm cache, ``live - cold`` for one
   that filled it. Which runs filled it: the summary says (``teacher_cache_misses``) when the run recorded it;
   for older runs, the first cacheable run of each seed in plan order (the batch plan depends only on (seed,
   epoch), so runs of one seed look up the same views). Methods that need more than logits and pooled features
   run the live teacher either way and get no difference.

Output: a markdown table on stdout and ``benchmarks/results/cache_study_<preset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckd_study import study  # noqa: E402
from ckd_study.methods import method_class  # noqa: E402
from ckd_study.runs import (RunStore, atomic_write_json, cpu_name, environment_record,  # noqa: E402
                            read_json, run)
from ckd_study.teacher_cache import CACHEABLE  # noqa: E402
from ckd_study.train import DeviceSetup  # noqa: E402

SUMMARY_KEYS = ("run_id", "train_time_s", "wall_time_s", "images_per_s", "last_top1", "final_sha256",
                "teacher_sha256", "teacher_source", "teacher_cache_hits", "teacher_cache_misses",
                "teacher_cache_prefetched", "teacher_calls")


def cacheable(method: str) -> bool:
    return set(method_class(method).teacher_outputs) <= CACHEABLE


def controlled(config, store: RunStore, scratch: Path) -> dict:
    """Train ``config`` live, cold-cache and warm-cache, back to back, in a scratch store."""
    teacher_dir = store.run_dir(config.teacher.run_id)
    if not (teacher_dir / "checkpoints" / "final.pt").exists():
        raise SystemExit(f"the teacher run {config.teacher.run_id} has no checkpoint in {store.root}: train it "
                         f"(make reproduce PRESET={config.preset}, or notebooks/01_teachers.ipynb) on this machine")
    local = RunStore(scratch)
    shutil.copytree(teacher_dir, local.run_dir(config.teacher.run_id))
    out = {}
    for name, cfg in (("live", config.replace(teacher_cache=False)), ("cold", config), ("warm", config)):
        if name == "warm":  # the same run again, now over the cache the cold run saved
            shutil.rmtree(local.run_dir(cfg.run_id))
        print(f"[{name}] training {cfg.run_id} ...", file=sys.stderr, flush=True)
        summary = run(cfg, store=local, quiet=True)
        out[name] = {k: summary.get(k) for k in SUMMARY_KEYS}
    if out["cold"]["final_sha256"] != out["warm"]["final_sha256"]:
        raise SystemExit("cold- and warm-cache runs of one config ended with different checkpoints: "
                         "the cache is not exact; investigate before trusting any cached run")
    return out


def stored_table(entries, store: RunStore, preset: str) -> list[dict]:
    rows, cold_seeds = [], set()
    for e in entries:
        s = store.summary(e.config.run_id)
        if s is None:
            raise SystemExit(f"missing run {e.config.run_id}: run `make reproduce PRESET={preset}` first")
        row = {"run_id": s["run_id"], "method": s["method"], "seed": s["seed"],
               "train_time_s": s["train_time_s"], "images_per_s": s["images_per_s"],
               "cacheable": cacheable(s["method"]) and e.config.teacher_cache}
        if not row["cacheable"]:
            row["teacher"] = "live"
        elif "teacher_cache_misses" in s:  # recorded by the run itself
            # hits include views the run itself prefetched into spare call slots (recorded since 2026-12-06)
            prefetched = s.get("teacher_cache_prefetched", 0)
            computed, found = s["teacher_cache_misses"] + prefetched, s["teacher_cache_hits"] - prefetched
            row["teacher"] = "cold" if computed > found else "warm"
            row["how_known"] = "recorded"
        else:
            row["teacher"] = "warm" if e.config.seed in cold_seeds else "cold"
            row["how_known"] = "plan order"
        if row["teacher"] == "cold":
            cold_seeds.add(e.config.seed)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--results", type=Path, default=None, help="results store (default: $CKD_RESULTS_DIR or "
                                                                "results/)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    store = RunStore(args.results)
    entries = [e for e in study.experiment_configs(args.preset, "main") if e.config.teacher is not None]
    rows = stored_table(entries, store, args.preset)
    kd0 = next(e.config for e in entries if e.config.method == "kd" and e.config.seed == 0)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cache_study_") as tmp:
        measured = controlled(kd0, store, Path(tmp))
    t = {k: v["train_time_s"] for k, v in measured.items()}
    stored_kd0 = store.summary(kd0.run_id)
    # the table's own KD seed-0 run has the cold/warm runs' config: the same checkpoint when its teacher's weights
    # and the torch build are the same (other kernels round differently, and a retrained teacher differs too)
    same_as_stored = stored_kd0["final_sha256"] == measured["warm"]["final_sha256"]
    same_teacher = stored_kd0.get("teacher_sha256") == measured["warm"]["teacher_sha256"]
    stored_env = store.run_dir(kd0.run_id) / "environment.json"
    stored_versions = read_json(stored_env).get("versions") if stored_env.exists() else None
    extra = {"live": 0.0, "warm": t["live"] - t["warm"], "cold": t["live"] - t["cold"]}
    for row in rows:
        row["projected_live_train_time_s"] = row["train_time_s"] + extra[row["teacher"]]
    cached_total = sum(r["train_time_s"] for r in rows)
    live_total = sum(r["projected_live_train_time_s"] for r in rows)
    result = {
        "preset": args.preset,
        "device_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "controlled_config": kd0.run_id,
        "controlled": measured,
        "controlled_checkpoint_equals_stored_run": same_as_stored,
        "controlled_teacher_equals_stored_run_teacher": same_teacher,
        "versions": environment_record(DeviceSetup.for_device("cpu"))["versions"],
        "stored_run_versions": stored_versions,
        "speedup_warm_vs_live": t["live"] / t["warm"],
        "speedup_cold_vs_live": t["live"] / t["cold"],
        "teacher_seconds_per_run": t["live"] - t["warm"],
        "table": {
            "distillation_runs": len(rows),
            "cold_runs": sum(r["teacher"] == "cold" for r in rows),
            "warm_runs": sum(r["teacher"] == "warm" for r in rows),
            "live_runs": sum(r["teacher"] == "live" for r in rows),
            "train_time_s_measured_cached": cached_total,
            "train_time_s_projected_live": live_total,
            "speedup": live_total / cached_total,
            "runs": rows,
        },
        "wall_seconds": time.perf_counter() - started,
        "notes": [
            "train_time_s: the training steps of all epochs (no evaluation), as each run's summary records it",
            "the controlled runs are trained back to back in one invocation; the stored table's runs were "
            "trained earlier (make reproduce), so its projection mixes two sessions of the same machine",
        ],
    }
    print(f"## Teacher cache across the {args.preset} main table ({cpu_name()}, {os.cpu_count()} cores)\n")
    print("Controlled, back to back (" + kd0.run_id + "):\n")
    print("| teacher source | train time (s) | images/s | teacher forwards (misses) | top-1 | checkpoint |")
    print("|---|---|---|---|---|---|")
    for name, m in measured.items():
        misses = m.get("teacher_cache_misses")
        print(f"| {name} | {m['train_time_s']:.1f} | {m['images_per_s']:.0f} | "
              f"{'every step' if misses is None else misses} | {m['last_top1']:.2f} | {m['final_sha256'][:12]} |")
    print(f"\nThe stored table's run of this config ended with {'the same' if same_as_stored else 'a different'} "
          f"checkpoint ({stored_kd0['final_sha256'][:12]}), distilled from {'the same' if same_teacher else 'a different'}"
          f" teacher checkpoint ({str(stored_kd0.get('teacher_sha256'))[:12]}) with torch "
          f"{(stored_versions or {}).get('torch', 'unknown')} (here {torch.__version__}).")
    tb = result["table"]
    print(f"\nwarm cache vs live teacher: {result['speedup_warm_vs_live']:.2f}x; cold (filling) vs live: "
          f"{result['speedup_cold_vs_live']:.2f}x.")
    print(f"Stored table: {tb['distillation_runs']} distillation runs ({tb['cold_runs']} filled the cache, "
          f"{tb['warm_runs']} read it, {tb['live_runs']} live) trained in {cached_total:.0f} s; with the live "
          f"teacher ≈ {live_total:.0f} s ({tb['speedup']:.2f}x).")
    path = args.json or HERE / "results" / f"cache_study_{args.preset}.json"
    atomic_write_json(path, result)
    print(f"(wrote {path})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
