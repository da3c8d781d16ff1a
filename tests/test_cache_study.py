"""benchmarks/cache_study_speedup.py on the smoke preset: the controlled live / cold / warm runs and the table
projection, end to end on tiny data. No timing is asserted, only what the numbers must satisfy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import cache_study_speedup as cs  # noqa: E402

from ckd_study import study  # noqa: E402
from ckd_study.runs import RunStore, run  # noqa: E402


def test_cache_study_on_the_smoke_main_table(tmp_path, capsys):
    store = RunStore(tmp_path / "results")
    entries = [e for e in study.experiment_configs("smoke", "main") if e.config.teacher is not None]
    with pytest.raises(SystemExit, match="make reproduce PRESET=smoke"):
        cs.main(["--preset", "smoke", "--results", str(store.root)])
    for e in entries:
        run(e.config, store=store, quiet=True)
    out = tmp_path / "cache_study.json"
    assert cs.main(["--preset", "smoke", "--results", str(store.root), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    c = result["controlled"]
    assert c["live"]["teacher_source"] == "live" and c["cold"]["teacher_source"] == c["warm"]["teacher_source"] == "cache"
    assert c["cold"]["teacher_cache_misses"] > 0 and c["warm"]["teacher_cache_misses"] == 0
    assert c["warm"]["teacher_cache_hits"] == c["cold"]["teacher_cache_hits"] + c["cold"]["teacher_cache_misses"]
    assert c["cold"]["final_sha256"] == c["warm"]["final_sha256"] != c["live"]["final_sha256"]
    assert result["controlled_checkpoint_equals_stored_run"] is True  # same config, same machine, same code
    assert result["controlled_teacher_equals_stored_run_teacher"] is True
    assert result["versions"]["torch"] == result["stored_run_versions"]["torch"]
    table = result["table"]
    assert table["distillation_runs"] == len(entries) == len(table["runs"])
    # one seed: the first cacheable run filled the cache (recorded by the runs themselves), the rest read it
    assert table["cold_runs"] == 1 and table["warm_runs"] == len(entries) - 1 and table["live_runs"] == 0
    assert all(r["how_known"] == "recorded" for r in table["runs"])
    assert table["runs"][0]["teacher"] == "cold"
    extra = c["live"]["train_time_s"] - c["warm"]["train_time_s"]
    warm = [r for r in table["runs"] if r["teacher"] == "warm"]
    assert all(r["projected_live_train_time_s"] == pytest.approx(r["train_time_s"] + extra) for r in warm)
    assert table["speedup"] == pytest.approx(table["train_time_s_projected_live"] / table["train_time_s_measured_cached"])
    assert "| warm |" in capsys.readouterr().out

    # Runs stored before the counters existed are classified by plan order: the first of each seed filled it.
    for e in entries:
        path = store.run_dir(e.config.run_id) / "summary.json"
        summary = json.loads(path.read_text())
        for key in ("teacher_cache_hits", "teacher_cache_misses"):
            summary.pop(key)
        path.write_text(json.dumps(summary))
    rows = cs.stored_table(entries, store, "smoke")
    assert [r["teacher"] for r in rows] == ["cold"] + ["warm"] * (len(entries) - 1)
    assert all(r["how_known"] == "plan order" for r in rows)
