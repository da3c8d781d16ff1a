"""Size the `medium` preset from the measured speed: time a resnet20 training step on full CIFAR-100 (the
`medium` student, CE, no teacher: with the exact teacher cache a distillation step costs about the same) and
project the preset's whole plan (`launch_plan("medium")`) from it.

    python benchmarks/bench_medium_cost.py                 # -> benchmarks/results/medium_cost_<device>.json
    python benchmarks/bench_medium_cost.py --tag xeon_2026-12-04   # -> ..._<device>_<tag>.json (another machine)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckd_study.config import make_config  # noqa: E402
from ckd_study.cost import measure_training_cost  # noqa: E402
from ckd_study.launch import launch_plan  # noqa: E402
from ckd_study.runs import RunStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="", help="suffix of the record's file name (keeps other machines' records)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = make_config("medium", method="ce", seed=0)
    record = measure_training_cost(config, RunStore(ROOT / "results"), steps=args.steps, warmup=3)
    plan = launch_plan("medium")
    students = [c for c in plan if c.preset == "medium"]  # all but the reused paper-recipe teacher (CE included)
    student_epochs = sum(c.epochs for c in students)
    record.update(plan_runs=len(plan), plan_student_runs=len(students),
                  plan_student_epochs=student_epochs,
                  projected_training_hours=student_epochs * record["seconds_per_epoch"] / 3600,
                  note="training steps only (evaluation and the one-off teacher-cache fill come on top); the "
                       "teacher is the paper recipe's resnet56, trained by the CPU reproduction, not counted")
    out = ROOT / "benchmarks" / "results" / f"medium_cost_{record['device']}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
