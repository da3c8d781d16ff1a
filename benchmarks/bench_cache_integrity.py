#!/usr/bin/env python
"""What the teacher cache's per-block checksums cost: computing them (on save) and verifying them (on load).

Usage:  python benchmarks/bench_cache_integrity.py [--entries 1000000] [--logits 100] [--pooled 64] [--json PATH]

Builds a float16 table of ``--entries`` (sample, view) entries with the given logit and pooled widths (random
values: hashing speed does not depend on them), times ``teacher_cache.block_checksums`` over it (the work of a
save and of a load's verification), and the torch.save / torch.load of the same payload for scale, then
extrapolates per entry to a full CIFAR-100 table (50,000 images x 162 views). No test asserts timings.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckd_study.data import NUM_VIEWS  # noqa: E402
from ckd_study.runs import cpu_name  # noqa: E402
from ckd_study.teacher_cache import CHECK_BLOCK, block_checksums  # noqa: E402

FULL_ENTRIES = 50_000 * NUM_VIEWS


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--logits", type=int, default=100)
    ap.add_argument("--pooled", type=int, default=64, help="the teacher's pooled width (resnet56: 64)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    keys = torch.arange(args.entries, dtype=torch.int64)
    values = {"logits": torch.randn(args.entries, args.logits).half(),
              "pooled": torch.randn(args.entries, args.pooled).half()}
    nbytes = keys.numel() * 8 + sum(v.numel() * 2 for v in values.values())
    start = time.perf_counter()
    sums = block_checksums(keys, values)
    checksum_s = time.perf_counter() - start
    buffer = io.BytesIO()
    start = time.perf_counter()
    torch.save({"keys": keys, "values": values, "checksums": sums}, buffer)
    save_s = time.perf_counter() - start
    buffer.seek(0)
    start = time.perf_counter()
    torch.load(buffer, weights_only=True)
    load_s = time.perf_counter() - start
    scale = FULL_ENTRIES / args.entries
    report = {"benchmark": "bench_cache_integrity", "device_name": cpu_name(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "entries": args.entries, "dims": {"logits": args.logits,
                                                                            "pooled": args.pooled},
              "check_block": CHECK_BLOCK, "blocks": len(sums), "table_mb": nbytes / 2**20,
              "checksum_s": checksum_s, "checksum_mb_per_s": nbytes / 2**20 / checksum_s,
              "serialize_s": save_s, "deserialize_s": load_s,
              "full_table_entries": FULL_ENTRIES, "full_table_gb": nbytes * scale / 2**30,
              "full_table_checksum_s": checksum_s * scale, "full_table_load_s": load_s * scale,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{args.entries:,} entries ({report['table_mb']:.0f} MiB): checksums {checksum_s:.2f} s "
          f"({report['checksum_mb_per_s']:.0f} MiB/s), torch.save {save_s:.2f} s, torch.load {load_s:.2f} s; "
          f"full CIFAR-100 table ({report['full_table_gb']:.2f} GiB): checksums ≈ {report['full_table_checksum_s']:.1f} s, "
          f"load ≈ {report['full_table_load_s']:.1f} s")
    path = args.json or HERE / "results" / "bench_cache_integrity_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
