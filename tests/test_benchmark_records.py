"""benchmarks/RESULTS.md and the README quote the committed benchmark JSON files: their headline numbers must be
the ones the JSON files hold (no timing is measured here, only the record is checked against its data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _rows(markdown: str, first_cells: tuple[str, ...]) -> dict[str, list[str]]:
    """Table rows of ``markdown`` whose first cell is one of ``first_cells``, as lists of cells."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells[0] in first_cells:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def records():
    return (REPO / "benchmarks" / "RESULTS.md").read_text(), (REPO / "README.md").read_text()


def test_training_benchmark_table_quotes_its_json(records):
    results_md, readme = records
    bench = json.loads((RESULTS / "bench_training_cpu.json").read_text())
    variants = bench["variants"]
    rows = _rows(results_md.split("## 1b.")[0], tuple(variants))  # section 1 (1b re-measures the same variants)
    assert set(rows) == set(variants)
    for name, v in variants.items():
        assert rows[name][1] == f"{v['images_per_s']:.1f}", name
        assert rows[name][2] == f"{v['images_per_s'] / variants['reference']['images_per_s']:.2f}×", name
    ratio = f"{bench['ratios']['ours_cached/reference']:.2f}×"
    assert f"met, {ratio}" in results_md and f"**{ratio}**" in readme
    assert bench["target"]["threshold"] == 2.0 and bench["target"]["ratio"] >= 2.0 and bench["target"]["met"]
    assert bench["versions"]["torch"] in results_md  # the header names the torch build that was measured


def test_cache_study_table_quotes_its_json(records):
    results_md, readme = records
    study = json.loads((RESULTS / "cache_study_quick.json").read_text())
    labels = {"live": "live", "cold": "cold cache", "warm": "warm cache"}
    rows = _rows(results_md, tuple(labels.values()))
    for key, label in labels.items():
        m = study["controlled"][key]
        assert rows[label][1] == f"{m['train_time_s']:.1f}", key
        assert rows[label][2] == f"{m['images_per_s']:.0f}", key
        assert rows[label][5] == m["final_sha256"][:12], key
    warm, table = f"{study['speedup_warm_vs_live']:.2f}×", f"{study['table']['speedup']:.2f}×"
    assert f"**{warm}**" in results_md and f"**{table}**" in results_md
    assert f"({warm})" in readme and f"({table})" in readme


@pytest.mark.parametrize("name", ["bench_training_cpu_2026-11-29.json",
                                  "bench_training_cpu_resnet56-resnet20_2026-11-29.json",
                                  "bench_training_cpu_2026-11-29_channels_last.json",
                                  "bench_training_cpu_resnet56-resnet20_2026-11-29_channels_last.json"])
def test_remeasured_training_benchmark_quotes_its_json(records, name):
    """Sections 1b and 1d: the 2026-11-29 measurements (contiguous, then channels_last fp32) with the precision
    column and both CPU targets."""
    results_md, _ = records
    bench = json.loads((RESULTS / name).read_text())
    assert f"`benchmarks/results/{name}`" in results_md
    ref = bench["variants"]["reference"]["images_per_s"]
    for variant, v in bench["variants"].items():
        row = (f"| {variant} | {v['precision']} | {v['images_per_s']:.1f} | {v['images_per_s'] / ref:.2f}× | "
               f"{v['seconds_per_epoch_50k']:,.1f} | {v['projected_240_epochs_h']:.2f} |")
        assert row in results_md, row
    target = bench["target"]
    assert target["thresholds"] == {"ours_live": 2.0, "ours_cached": 5.0} and not target["met"]
    for variant, ratio in target["ratios"].items():
        assert f"{variant} / reference = {ratio:.2f}× (target ≥ {target['thresholds'][variant]:g}×)" in results_md


def test_memory_format_table_quotes_its_json(records):
    """Section 1c: fp32 contiguous vs channels_last per model, and the emulated-bf16 ratios, from their JSON."""
    results_md, _ = records
    section = results_md.split("## 1c.")[1].split("## 2.")[0]
    bench = json.loads((RESULTS / "bench_precision_cpu_2026-11-29.json").read_text())
    assert bench["variants"] == ["fp32", "fp32_channels_last"] and bench["threads"] == 2
    for r in bench["rows"]:
        row = (f"| {r['kind']} | {r['model']} | {r['fp32']:.1f} | {r['fp32_channels_last']:.1f} | "
               f"{r['fp32_channels_last_over_fp32']:.2f}× |")
        assert row in section, row
    # "never slower" is what the default rests on
    assert min(r["fp32_channels_last_over_fp32"] for r in bench["rows"]) >= 0.995
    bf16 = json.loads((RESULTS / "bench_precision_cpu_bf16_2026-11-29.json").read_text())
    train = {r["model"]: r["bf16_over_fp32"] for r in bf16["rows"] if r["kind"] == "train step"}
    prose = " ".join(section.split())
    assert f"{train['resnet20']:.2f}× (resnet20)" in prose and f"{train['resnet8']:.2f}× (resnet8)" in prose
    assert not bf16["cpu_native_bf16"] and bf16["auto_resolves_to"] == "fp32"


def test_xeon_bf16_table_quotes_its_json(records):
    """Section 1e: the Intel Xeon (AVX512-BF16, no AMX visible) where ``auto`` picks bf16 and bf16 was slower,
    every row from its JSON, and the claim "slower in every row" checked against the data."""
    results_md, _ = records
    section = results_md.split("## 1e.")[1].split("\n## ")[0]
    rows = 0
    for run in ("a", "b"):
        bench = json.loads((RESULTS / f"bench_precision_cpu_xeon_2026-12-03_{run}.json").read_text())
        assert bench["cpu_native_bf16"] and bench["auto_resolves_to"] == "bf16" and bench["threads"] == 2
        for r in bench["rows"]:
            row = (f"| {r['kind']} | {r['model']} | {run} | {r['fp32']:.1f} | {r['fp32_channels_last']:.1f} | "
                   f"{r['bf16']:.1f} | {r['bf16_over_fp32']:.2f}× |")
            assert row in section, row
            assert r["bf16"] < min(r["fp32"], r["fp32_channels_last"]), row
            rows += 1
    assert section.count("| train step |") + section.count("| teacher forward |") == rows


def _assert_quotes_faster_bf16_rows(section: str, bench: dict) -> None:
    """Every row of a bench_precision record is in ``section``'s table (and no other row), bf16 faster in each."""
    for r in bench["rows"]:
        row = (f"| {r['kind']} | {r['model']} | {r['fp32']:.1f} | {r['fp32_channels_last']:.1f} | "
               f"{r['bf16']:.1f} | {r['bf16_over_fp32']:.2f}× |")
        assert row in section, row
        assert r["bf16"] > max(r["fp32"], r["fp32_channels_last"]), row
    assert section.count("| train step |") + section.count("| teacher forward |") == len(bench["rows"])


def test_xeon_amx_bf16_table_quotes_its_json(records):
    """Section 1g: the Intel Xeon with AMX-BF16 where bf16 was faster, every row from its JSON, the claim
    "faster in every row" checked against the data, and ``auto``'s rule agreeing with both Xeon records."""
    from ckd_study.config import bf16_expected_faster

    results_md, _ = records
    section = results_md.split("## 1g.")[1].split("\n## ")[0]
    bench = json.loads((RESULTS / "bench_precision_cpu_xeon_amx_2026-12-06.json").read_text())
    assert bench["cpu_native_bf16"] and bench["threads"] == 2
    _assert_quotes_faster_bf16_rows(section, bench)
    # the rule behind auto, applied to the flags each record's section names
    assert bf16_expected_faster(True, {"GenuineIntel", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert not bf16_expected_faster(True, {"GenuineIntel", "avx512_bf16"})


def test_epyc_zen4_bf16_table_quotes_its_json(records):
    """Section 1h: the AMD EPYC (Zen 4, AVX512-BF16, no AMX) where bf16 was faster, every row from its JSON, the
    claim "faster in every row" and the quoted gain ranges checked against the data, and ``auto``'s rule picking
    bf16 for that CPU's flags."""
    from ckd_study.config import bf16_expected_faster

    results_md, _ = records
    section = results_md.split("## 1h.")[1].split("\n## ")[0]
    bench = json.loads((RESULTS / "bench_precision_cpu_epyc_zen4_2026-12-06.json").read_text())
    assert bench["cpu_native_bf16"] and bench["auto_resolves_to"] == "bf16" and bench["threads"] == 2
    assert bench["cpu_bf16_flags"] == ["avx512_bf16"]
    _assert_quotes_faster_bf16_rows(section, bench)
    for kind, words in (("train step", "train steps gained"), ("teacher forward", "teacher forwards")):
        gains = [r["bf16_over_fp32"] for r in bench["rows"] if r["kind"] == kind]
        quoted = f"{min(gains):.2f}–{max(gains):.2f}×"
        assert quoted in section.split(words)[1][:40], (kind, quoted)
    assert bf16_expected_faster(True, {"AuthenticAMD", "avx512_bf16"})


def test_teacher_lookahead_table_quotes_its_json(records):
    """Section 6: every row of the lookahead table from its JSON; lookahead made fewer calls and took less time
    at both coverages, and the quoted per-epoch savings follow from the ms-per-batch rows at 782 batches."""
    results_md, _ = records
    section = results_md.split("## 6.")[1].split("\n## ")[0]
    bench = json.loads((RESULTS / "bench_teacher_lookahead_cpu_epyc_zen4_2026-12-06.json").read_text())
    assert bench["compute_key"] == "fp32-channels_last" and bench["threads"] == 2 and bench["batch_size"] == 64
    rows = {(r["coverage"], r["mode"]): r for r in bench["rows"]}
    for r in bench["rows"]:
        line = (f"| {round(100 * r['coverage'])} % | {r['mode']} | {1e3 * r['seconds_per_batch']:.1f} | "
                f"{r['teacher_calls']} | {r['views_computed']} |")
        assert line in section, line
    savings = []
    for coverage in sorted({c for c, _ in rows}):
        plain, ahead = rows[(coverage, "zero-padded")], rows[(coverage, "lookahead")]
        assert ahead["teacher_calls"] < plain["teacher_calls"] == plain["batches"]
        assert ahead["seconds"] < plain["seconds"]
        savings.append(round(782 * (plain["seconds_per_batch"] - ahead["seconds_per_batch"])))
    assert f"{savings[0]} s less teacher time an epoch at 25 % coverage and {savings[1]} s at 60 %" in section
