#!/usr/bin/env python
"""Train-step speed per precision: fp32 eager, fp32 channels_last and bf16 autocast + channels_last, per zoo model.

Usage:  python benchmarks/bench_precision.py [--models resnet20,resnet56,...] [--batch-size 64] [--steps 9]
            [--threads N] [--device cpu] [--json PATH]

One train step = forward + CE + backward + SGD on a random batch of 32x32 images (the speed of a step does not
depend on the values), timed as the median of ``--steps`` steps after 2 warm-up steps, for each model in each
precision, set up by ``ckd_study.train.DeviceSetup`` as a run would. The teacher-forward rows time a forward pass
under no_grad, as the live teacher runs. It also records what ``precision="auto"`` resolves to on this machine
and whether the CPU computes bf16 natively (``ckd_study.config.cpu_has_native_bf16``): without it, bf16 is
emulated and slower than fp32, which is why ``auto`` then picks fp32. No test asserts timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckd_study.config import cpu_bf16_flags, cpu_has_native_bf16, resolve_precision  # noqa: E402
from ckd_study.models import create_model  # noqa: E402
from ckd_study.runs import cpu_name  # noqa: E402
from ckd_study.train import DeviceSetup  # noqa: E402

# (label, precision, channels_last override or None for the setup's own choice)
VARIANTS = (("fp32", "fp32", None), ("fp32_channels_last", "fp32", True), ("bf16", "bf16", None))


def images_per_s(model_name: str, precision: str, *, device: str, batch_size: int, steps: int,
                 train: bool, channels_last: bool | None = None) -> float:
    setup = DeviceSetup.for_device(device, precision)
    if channels_last is not None:
        setup = dataclasses.replace(setup, channels_last=channels_last)
    torch.manual_seed(0)
    model = setup.prepare_model(create_model(model_name, 100))
    model.train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = setup.prepare_images(torch.randn(batch_size, 3, 32, 32, device=setup.device))
    labels = torch.randint(0, 100, (batch_size,), device=setup.device)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        if train:
            with setup.autocast():
                out = model(images)
            loss = F.cross_entropy(out.logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad(), setup.autocast():
                model(images)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[2:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--models", default="resnet8x4,resnet20,resnet56,wrn_16_2,wrn_40_2")
    ap.add_argument("--teachers", default="resnet32x4,resnet56,wrn_40_2", help="forward-only rows")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                    help="which of fp32, fp32_channels_last, bf16 to time (bf16 is slow where it is emulated)")
    args = ap.parse_args(argv)
    wanted = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
    if unknown or "fp32" not in wanted:
        ap.error(f"--variants: fp32 (the baseline) and any of {', '.join(v[0] for v in VARIANTS)}; got {unknown}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for kind, names in (("train step", args.models), ("teacher forward", args.teachers)):
        for name in [n for n in names.split(",") if n]:
            row = {"model": name, "kind": kind}
            for label, precision, channels_last in VARIANTS:
                if label in wanted:
                    row[label] = images_per_s(name, precision, device=args.device, batch_size=args.batch_size,
                                              steps=args.steps, train=kind == "train step",
                                              channels_last=channels_last)
            line = f"{kind:<15} {name:<11} fp32 {row['fp32']:8.1f} img/s"
            for label in (w for w in wanted if w != "fp32"):
                row[f"{label}_over_fp32"] = row[label] / row["fp32"]
                line += f"   {label} {row[label]:8.1f} (x{row[f'{label}_over_fp32']:.2f})"
            print(line, flush=True)
            rows.append(row)
    report = {"benchmark": "bench_precision", "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
              "cpu_native_bf16": cpu_has_native_bf16(),
              "cpu_bf16_flags": cpu_bf16_flags(),
              "auto_resolves_to": resolve_precision("auto", args.device),
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "batch_size": args.batch_size,
              "steps": args.steps, "variants": wanted, "torch": torch.__version__,
              "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = args.json or HERE / "results" / f"bench_precision_{args.device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"auto resolves to {report['auto_resolves_to']} here (native CPU bf16: {report['cpu_native_bf16']}); "
          f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
