"""The time-boxed campaign on the smoke preset: it stops cleanly at its time limit, exports the paused run's
checkpoint in committable parts, resumes (also from a fresh clone that has only those parts) and finishes with
the same weights as runs trained without interruption; one campaign process at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckd_study.campaign import Campaign, CampaignError, _campaign_lock, parse_pair, plan_campaign, run_campaign
from ckd_study.config import ConfigError, RunConfig
from ckd_study.runs import RunStore, next_epoch_seconds, run, time_for_another_epoch
from ckd_study.study import MissingRunsError, main as study_main

METHODS = ("kd", "ce")


def test_plan_is_the_teacher_then_the_students_in_order():
    configs = plan_campaign("paper", ("resnet56", "resnet20"), precision="fp32")
    teacher = configs[0]
    assert (teacher.student, teacher.method, teacher.teacher, teacher.epochs) == ("resnet56", "ce", None, 240)
    assert [c.method for c in configs[1:]] == ["kd", "ckd", "dkd", "ce", "crd", "dcd", "kd_ls", "mcld", "dcd_kd"]
    for c in configs[1:]:
        assert c.student == "resnet20" and c.epochs == 240 and c.batch_size == 64 and c.base_lr == 0.05
        assert c.milestones == (150, 180, 210) and c.precision == "fp32"
        assert c.teacher is None if c.method == "ce" else c.teacher.run_id == teacher.run_id
    assert configs[3].method_options["beta"] == 2.0  # DKD's released beta for resnet56 -> resnet20
    assert parse_pair("resnet56-resnet20") == ("resnet56", "resnet20")
    with pytest.raises(ConfigError, match="TEACHER-STUDENT"):
        parse_pair("resnet56")


def _epochs(*seconds):
    return [{"epoch": i + 1, "epoch_time_s": s - 10.0, "eval_time_s": 10.0} for i, s in enumerate(seconds)]


def test_the_next_epoch_is_estimated_from_the_median_of_recent_epochs():
    # A resumed run whose last recorded epoch was stretched by a pause (1,000 s instead of ~100 s) still trains
    # in a 30-min box: the median of the last three epochs is the estimate, not the last epoch.
    paused_once = _epochs(100, 104, 1000)
    assert next_epoch_seconds(paused_once) == 104
    assert time_for_another_epoch(paused_once, stop_at=1000.0 + 1800.0, now=1000.0)
    # Two slow epochs in a row move it: the machine really got slower.
    slower = _epochs(100, 900, 1000)
    assert next_epoch_seconds(slower) == 900
    assert not time_for_another_epoch(slower, stop_at=1000.0 + 900.0, now=1000.0)
    # Only the last three count; the margin is 10 % + 5 s.
    assert next_epoch_seconds(_epochs(5000, 5000, 100, 100, 100)) == 100
    assert time_for_another_epoch(_epochs(100), stop_at=115.5, now=0.0)
    assert not time_for_another_epoch(_epochs(100), stop_at=114.5, now=0.0)
    # No deadline, or nothing to estimate from: train.
    assert time_for_another_epoch([], stop_at=0.0, now=1.0) and time_for_another_epoch(paused_once, None)
    assert next_epoch_seconds([]) is None


def test_campaign_stops_at_its_time_limit_resumes_from_committed_parts_and_finishes(tmp_path):
    store = RunStore(tmp_path / "campaign")
    campaign = Campaign.open(store, "smoke", methods=METHODS)
    lines: list[str] = []
    # A time box shorter than the 5 s safety margin: every run pauses after its first epoch.
    first = run_campaign(campaign, store, minutes=0.01, out=lines.append)
    teacher_id = campaign.configs[0].run_id
    assert first["paused"] == teacher_id and not first["finished"]
    assert [r["status"] for r in first["rows"]] == ["interrupted", "new", "new"]
    assert first["rows"][0]["epochs_done"] == 1
    assert any(f"paused {teacher_id} after epoch 1/2" in line for line in lines)
    log = (campaign.folder / "campaign.log").read_text()
    assert "paused" in log and "epoch 1/2" in log
    manifest = json.loads((store.inflight_dir(teacher_id) / "manifest.json").read_text())
    assert manifest["epoch"] == 1 and manifest["parts"] == ["latest.pt.part00"]

    # A fresh clone: the local checkpoint is gone, only the committed parts remain.
    (store.run_dir(teacher_id) / "checkpoints" / "latest.pt").unlink()
    second = run_campaign(Campaign.open(store, "smoke", methods=METHODS), store, minutes=30, out=lines.append)
    assert second["finished"] and second["paused"] is None
    assert [r["status"] for r in second["rows"]] == ["finished"] * 3
    assert not store.inflight_dir(teacher_id).exists(), "a finished run keeps no in-flight checkpoint"
    assert [m["epoch"] for m in store.metrics(teacher_id)] == [1, 2]

    # The same runs without interruption end with the same weights.
    plain = RunStore(tmp_path / "plain")
    for config in campaign.configs:
        assert run(config, store=plain, quiet=True)["final_sha256"] == store.summary(config.run_id)["final_sha256"]

    # Started again when everything is done: nothing is trained.
    third = run_campaign(Campaign.open(store, "smoke", methods=METHODS), store, minutes=1, out=lines.append)
    assert third["finished"] and not any("run 1/3" in line for line in lines[-6:])


def test_a_second_campaign_process_is_refused_and_the_plan_is_frozen(tmp_path):
    store = RunStore(tmp_path / "campaign")
    campaign = Campaign.open(store, "smoke", methods=METHODS, precision="fp32")
    with _campaign_lock(campaign, campaign.folder / "campaign.log"):
        with pytest.raises(CampaignError, match="already running"):
            run_campaign(campaign, store, minutes=1, out=lambda line: None)
    with pytest.raises(CampaignError, match="planned at precision fp32"):
        Campaign.open(store, "smoke", methods=METHODS, precision="bf16")
    with pytest.raises(CampaignError, match="planned with methods kd,ce"):
        Campaign.open(store, "smoke", methods=("ckd",))
    # Without flags, a later start continues the frozen plan (whatever auto would resolve to now).
    assert [c.run_id for c in Campaign.open(store, "smoke", methods=METHODS).configs] == \
        [c.run_id for c in campaign.configs]


def test_campaign_cli_status_and_errors(tmp_path, capsys):
    results = str(tmp_path / "results")
    assert study_main(["campaign", "--preset", "smoke", "--methods", "kd", "--results-dir", results, "--status"]) == 0
    out = capsys.readouterr().out
    assert "campaign smoke-resnet14-resnet8-s0" in out and out.count(" new ") == 2
    assert study_main(["campaign", "--preset", "smoke", "--pair", "resnet14", "--results-dir", results]) == 1
    assert "TEACHER-STUDENT" in capsys.readouterr().err


def test_an_interrupted_campaign_exports_its_last_saved_epoch(tmp_path, monkeypatch):
    """Ctrl-C (or the SIGTERM the CLI turns into one) in the middle of an epoch: the last saved epoch is exported
    in committable parts before the campaign stops, and the next start resumes from it."""
    import ckd_study.campaign as campaign_module

    store = RunStore(tmp_path)
    campaign = Campaign.open(store, "smoke", methods=("ce",))
    teacher_id = campaign.configs[0].run_id

    def interrupting_run(config, **kwargs):
        def hook(trainer, epoch, step):
            if epoch == 2:
                raise KeyboardInterrupt
        return run(config, step_hook=hook, **kwargs)

    monkeypatch.setattr(campaign_module, "run", interrupting_run)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_campaign(campaign, store, minutes=30, out=lines.append)
    assert any(f"interrupted {teacher_id}" in line and "exported" in line for line in lines)
    assert json.loads((store.inflight_dir(teacher_id) / "manifest.json").read_text())["epoch"] == 1
    monkeypatch.setattr(campaign_module, "run", run)
    (store.run_dir(teacher_id) / "checkpoints" / "latest.pt").unlink()  # a fresh clone: only the parts remain
    assert run_campaign(Campaign.open(store, "smoke", methods=("ce",)), store, minutes=30, out=lines.append)["finished"]
    attempts = [json.loads(line) for line in (store.run_dir(teacher_id) / "attempts.jsonl").read_text().splitlines()]
    assert [a["start_epoch"] for a in attempts] == [0, 1]


def test_a_background_campaign_stops_on_sigint(tmp_path):
    """`campaign ... &` from a script starts with SIGINT ignored (POSIX shells do that to background jobs):
    `kill -INT` still stops it as Ctrl-C would (the last saved epoch exported, a non-zero exit), instead of
    being dropped while the campaign trains on."""
    import os
    import signal
    import subprocess
    import sys

    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "ckd_study", "campaign", "--preset", "smoke", "--methods", "ce",
           "--results-dir", str(results), "--minutes", "30"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    first = proc.stdout.readline() + proc.stdout.readline()  # its signal handlers are in place; a run starts
    assert "campaign smoke" in first and "run 1/2" in first, first
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, first + rest
    # where the signal lands decides the message (inside the run: "interrupted <run id> ..."), never whether
    assert "interrupted" in rest or "stopped by SIGINT" in rest, rest
    assert "campaign finished" not in rest, rest
    campaign = Campaign.open(RunStore(results), "smoke", methods=("ce",))
    assert not all(r["status"] == "finished" for r in campaign.status_rows(RunStore(results)))


def test_campaign_report_puts_measured_beside_published(tmp_path, monkeypatch):
    """The report's numbers come from the run records: last/best top-1, Δ against the published number (a fake
    published row for the smoke pair, so that Δ and the 0.5 pp flag are checked), hours = the epochs' times."""
    import ckd_study.published as published
    from ckd_study.campaign import report_campaign

    store = RunStore(tmp_path / "results")
    campaign = Campaign.open(store, "smoke", methods=METHODS)
    run_campaign(campaign, store, minutes=30, out=lambda line: None)
    teacher, kd, ce = (store.summary(c.run_id) for c in campaign.configs)
    fake = {"teacher": teacher["last_top1"] + 0.25, "kd": kd["last_top1"] - 3.0}
    monkeypatch.setitem(published.PUBLISHED, ("resnet14", "resnet8"), fake)
    import ckd_study.analysis as analysis

    drawn = {}
    plot_line_panels = analysis.plot_line_panels

    def recording_panels(panels, path_stem, **kwargs):
        drawn[Path(path_stem).name] = panels
        return plot_line_panels(panels, path_stem, **kwargs)

    monkeypatch.setattr(analysis, "plot_line_panels", recording_panels)
    report = report_campaign(campaign, store, tmp_path / "figures")
    rows = {r["run id"]: r for _, r in report["table"].iterrows()}
    t, k, c = (rows[cfg.run_id] for cfg in campaign.configs)
    assert t["last-epoch top-1 (%)"] == f"{teacher['last_top1']:.2f}" and t["status"] == "finished"
    assert t["Δ last − published (pp)"] == "-0.25" and t["investigate"] == ""
    assert k["Δ last − published (pp)"] == "+3.00" and k["investigate"] == "yes"
    assert c["published (%)"] == "–" and c["Δ last − published (pp)"] == "–"
    assert k["best-epoch top-1 (%)"] == f"{kd['best_top1']:.2f} (epoch {kd['best_epoch']})"
    hours = sum(m["epoch_time_s"] + m["eval_time_s"] for m in store.metrics(campaign.configs[1].run_id)) / 3600
    assert k["hours here"] == f"{hours:.1f}"
    # The smoke recipe decays the lr after epoch 2 (milestones (2,)): the test top-1 of epoch 2 is "before".
    kd_metrics = store.metrics(campaign.configs[1].run_id)
    assert campaign.configs[1].milestones == (2,)
    assert k["top-1 before 1st lr decay (%)"] == f"{kd_metrics[1]['test_top1']:.2f} (epoch 2)"
    curves = report["curves"]
    assert len(curves) == sum(cfg.epochs for cfg in campaign.configs)
    # The curves figure: every epoch of every run; no zoomed panel, as no smoke run trains past its lr decay.
    (full,) = drawn["reproduction_resnet14-resnet8_curves"]
    assert full["data"].equals(curves)
    # The loss terms each run logged, per epoch, for the investigation of a row far from its published number.
    terms = report["loss_terms"]
    kd_terms = terms[terms["run"] == "KD"]
    assert set(kd_terms["term"]) == {"train_ce", "train_kd", "train_loss"}
    for _, row in kd_terms.iterrows():
        assert row["value"] == kd_metrics[row["epoch"] - 1][row["term"]]
    assert set(terms[terms["run"] == "teacher (resnet14)"]["term"]) == {"train_ce", "train_loss"}
    assert (tmp_path / "figures" / "reproduction_resnet14-resnet8_loss_terms.png").exists()
    assert (tmp_path / "figures" / "reproduction_resnet14-resnet8_curves.png").exists()
    md = (tmp_path / "figures" / "reproduction_resnet14-resnet8.md").read_text()
    assert "never tuned or selected" in md and "0.5 pp" in md
    threads = {json.loads(line)["torch_threads"] for cfg in campaign.configs
               for line in (store.run_dir(cfg.run_id) / "attempts.jsonl").read_text().splitlines()}
    assert len(threads) == 1 and f"(cpu, {threads.pop()} thread" in md


def test_curve_panels_zoom_on_the_epochs_after_the_first_lr_decay():
    """The second panel of the learning-curve figure holds exactly the epochs trained after the first decay."""
    import pandas as pd

    from ckd_study.campaign import _curve_panels

    frame = pd.DataFrame([{"run": run, "epoch": e, "test_top1": 0.1 * e} for run, n in (("T", 6), ("KD", 4))
                          for e in range(1, n + 1)])
    full, late = _curve_panels(frame, 3)
    assert full["data"].equals(frame)
    assert list(zip(late["data"]["run"], late["data"]["epoch"])) == [("T", 4), ("T", 5), ("T", 6), ("KD", 4)]
    assert "epochs 4–" in late["title"]
    assert len(_curve_panels(frame, 6)) == 1 and len(_curve_panels(frame, None)) == 1


def _reusing_preset(monkeypatch) -> str:
    """A smoke-sized preset whose students distil from the smoke preset's teacher run (as medium reuses the paper
    recipe's), with a small study grid: a teacher of another preset, the student alone and three students."""
    import dataclasses

    from ckd_study.config import PRESETS
    from ckd_study.study.grids import STUDY

    monkeypatch.setitem(PRESETS, "smoke_reuse", {**PRESETS["smoke"], "teacher_preset": "smoke"})
    monkeypatch.setitem(STUDY, "smoke_reuse", dataclasses.replace(
        STUDY["smoke"], main_methods=("ce", "kd"), batch_sizes=(16,), batch_size_methods=("kd",),
        temperatures=(1.0,), dcd_fixed_temperatures=(), mcld_grid=(), ckd_terms=(), ckd_extra_variants=(),
        ckd_anchor_negatives=(), temperature_control=False, analysis_methods=("ce", "kd"), recipe_rows=()))
    return "smoke_reuse"


def test_a_study_campaign_trains_the_whole_plan_reuses_the_other_presets_teacher_and_resumes(tmp_path, monkeypatch):
    from ckd_study.launch import launch_plan

    preset = _reusing_preset(monkeypatch)
    store = RunStore(tmp_path / "study")
    campaign = Campaign.open_study(store, preset)
    plan = launch_plan(preset)
    assert [c.run_id for c in campaign.configs] == [c.run_id for c in plan]
    teacher = campaign.configs[0]
    assert teacher.preset == "smoke" and [c.run_id for c in campaign.reused_runs()] == [teacher.run_id]
    assert [c.method for c in campaign.configs[1:]] == ["ce", "kd", "ckd", "dcd"]
    assert json.loads((campaign.folder / "plan.json").read_text())["run_ids"] == [c.run_id for c in plan]

    # The teacher belongs to the smoke recipe's own campaign: the study campaign refuses to start without it ...
    with pytest.raises(CampaignError, match="campaign --preset smoke --pair resnet14-resnet8"):
        run_campaign(campaign, store, minutes=30, out=lambda line: None)
    assert store.status(teacher.run_id) == "new"
    run(teacher, store=store, quiet=True)
    teacher_attempts = len(store.attempts(teacher.run_id))

    # ... and with it, trains the rest in its time box (each run pauses after one epoch in this one) and resumes.
    lines: list[str] = []
    first = run_campaign(campaign, store, minutes=0.01, out=lines.append)
    assert first["paused"] == campaign.configs[1].run_id and not first["finished"]
    assert [r["status"] for r in first["rows"]] == ["finished", "interrupted", "new", "new", "new"]
    assert first["rows"][0]["method"] == "teacher"
    second = run_campaign(Campaign.open_study(store, preset), store, minutes=30, out=lines.append)
    assert second["finished"] and [r["status"] for r in second["rows"]] == ["finished"] * 5
    assert len(store.attempts(teacher.run_id)) == teacher_attempts, "the reused teacher was never retrained"
    assert not any(f"run 1/5: {teacher.run_id}" in line for line in lines)
    # The same students as the plan trained on their own: the campaign adds no setting of its own.
    for config in campaign.configs[1:]:
        stored = json.loads((store.run_dir(config.run_id) / "config.json").read_text())
        assert RunConfig.from_dict(stored["config"]) == config

    # After each finished run it derived the t-SNE and correlation files (checkpoints are not committed): with
    # every checkpoint gone, notebooks 06 and 07 still build from those files alone.
    from ckd_study import study

    assert any("t-SNE/correlation files" in line for line in lines)
    # A lost derived file is recomputed from the checkpoints, and only that one; present files are left alone.
    folder = study.analysis_dir_for(store, preset)
    kd = next(c for c in campaign.configs if c.method == "kd")
    kd_metrics = next(folder.glob(f"correlation/metrics_{kd.run_id}_*.json"))
    kept = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and p != kd_metrics}
    kd_metrics.unlink()
    assert study.derive_analysis(preset, store=store, verbose=False) == [kd_metrics] and kd_metrics.exists()
    assert study.derive_analysis(preset, store=store, verbose=False) == []
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    for checkpoint in store.root.glob("runs/*/checkpoints/*.pt"):
        checkpoint.unlink()
    analysed = {c.run_id for c in campaign.configs if c.method in ("ce", "kd") or c is teacher}
    tsne = study.build_tsne(preset, train=False, store=store, figures_dir=tmp_path / "figures", verbose=False)
    assert set(tsne.table["run id"]) == analysed
    correlation = study.build_correlation(preset, train=False, store=store, figures_dir=tmp_path / "figures",
                                          verbose=False)
    assert set(correlation.table["run id"]) == analysed - {teacher.run_id}
    # ... and a derived file lost with its checkpoint is an error naming the run and the way out, not a gap.
    next(folder.glob(f"tsne/{kd.run_id}_*.csv")).unlink()
    kd_metrics.unlink()
    for build in (study.build_tsne, study.build_correlation):
        with pytest.raises(MissingRunsError, match=r"(?s)cannot be computed.*checkpoint .* is missing") as err:
            build(preset, train=False, store=store, figures_dir=tmp_path / "figures", verbose=False)
        assert err.value.run_ids == [kd.run_id]
    assert study.derive_analysis(preset, store=store, verbose=False) == []


def test_study_campaign_cli_rejects_the_pair_flags_and_prints_its_status(tmp_path, capsys, monkeypatch):
    results = str(tmp_path / "results")
    assert study_main(["campaign", "--preset", "smoke", "--study", "--methods", "kd", "--results-dir", results]) == 1
    err = capsys.readouterr().err
    assert "drop --methods" in err and "reproduce --preset smoke" in err
    assert study_main(["campaign", "--preset", "smoke", "--study", "--results-dir", results, "--status"]) == 0
    out = capsys.readouterr().out
    from ckd_study.launch import launch_plan

    assert "campaign smoke-study" in out and out.count(" new ") == len(launch_plan("smoke"))
    # medium reuses the CPU reproduction's teacher: in an empty store its campaign names the command to run first
    assert study_main(["campaign", "--preset", "medium", "--study", "--results-dir", results, "--minutes", "1"]) == 1
    assert "--preset paper --pair resnet56-resnet20" in capsys.readouterr().err
