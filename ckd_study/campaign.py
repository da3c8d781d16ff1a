"""Time-boxed, resumable training campaigns: a fixed list of long runs trained one after another.

A campaign is a teacher and its students under one preset (``plan_campaign``), e.g. the paper recipe's
resnet56 → resnet20 row. ``run_campaign(..., minutes=150)`` trains the next unfinished runs of the list, stops
cleanly after a saved epoch before its time is up, and continues from there when started again, on this machine
or on another one:

- the list is frozen when the campaign first starts (``<results>/campaigns/<name>/plan.json``: the resolved
  configs, so a later start on a machine whose ``precision="auto"`` resolves differently continues the same runs);
- a paused run's latest checkpoint is exported under ``<run>/inflight/`` in parts small enough to commit
  (``RunStore.export_inflight``); ``runs.run`` restores it on a fresh clone and removes it when the run finishes;
- one campaign process at a time (a lock in the campaign folder); every line it prints is also appended to
  ``<results>/campaigns/<name>/campaign.log``, so it can run in the background (``nohup ... &``).

A study campaign (``Campaign.open_study``) is the same time box over a preset's whole study plan (every run of
its seven notebooks, ``launch.launch_plan``), e.g. the ``medium`` ablations; ``make reproduce`` then builds the
tables and figures from the store. Its list is the current grid (written to ``plan.json`` as a record, not frozen:
the notebooks read the current grids), and runs of another preset that it reuses (``medium`` distils from the
``paper`` recipe's teacher) are never trained by it: it refuses to start until they are finished. After each run it
finishes it derives the t-SNE and correlation files of every finished analysed run (``study.derive_analysis``)
while the checkpoints are on this machine: they are not committed, the derived files are.

CLI: ``python -m ckd_study campaign --preset paper --pair resnet56-resnet20 --minutes 150``,
``python -m ckd_study campaign --preset medium --study --minutes 150``
(``--status`` prints where it stands without training).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .config import PRESETS, ConfigError, RunConfig, make_config, teacher_config
from .runs import (RunInProgressError, RunPaused, RunStore, atomic_write_json, next_epoch_seconds, read_json, run,
                   run_lock, utc_now)

# The students of a campaign, in the order they train (after the teacher); "ce" is the student alone.
CAMPAIGN_METHODS = ("kd", "ckd", "dkd", "ce", "crd", "dcd", "kd_ls", "mcld", "dcd_kd")


class CampaignError(RuntimeError):
    """A campaign cannot start as asked (another one runs, its frozen plan disagrees with the flags, ...)."""


def parse_pair(text: str) -> tuple[str, str]:
    """``"resnet56-resnet20"`` -> ``("resnet56", "resnet20")`` (model names contain ``_``, never ``-``)."""
    parts = text.split("-")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--pair takes TEACHER-STUDENT, e.g. resnet56-resnet20; got {text!r}")
    return parts[0], parts[1]


def campaign_name(preset: str, pair: tuple[str, str], seed: int = 0) -> str:
    return f"{preset}-{pair[0]}-{pair[1]}-s{seed}"


def study_campaign_name(preset: str) -> str:
    return f"{preset}-study"


def plan_campaign(preset: str, pair: tuple[str, str] | None = None, methods: Sequence[str] = CAMPAIGN_METHODS,
                  seed: int = 0, precision: str | None = None, device: str | None = None) -> list[RunConfig]:
    """The campaign's runs in training order: the teacher (the preset's teacher recipe, seed 0), then one
    student per method (``ce``: the student trained alone), each with the preset's recipe and the released
    per-pair defaults."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    teacher, student = pair or (PRESETS[preset]["teacher_student"], PRESETS[preset]["student"])
    extra = {"precision": precision} if precision else {}
    teacher_cfg = teacher_config(preset, teacher, device=device, **extra)
    configs = [teacher_cfg]
    for method in methods:
        if method == "ce":
            configs.append(make_config(preset, method="ce", student=student, seed=seed, device=device, **extra))
        else:
            configs.append(make_config(preset, method=method, teacher=teacher_cfg, student=student, seed=seed,
                                       device=device, **extra))
    return configs


@dataclass
class Campaign:
    """A frozen list of runs and the folder that holds its plan, log and lock."""

    name: str
    folder: Path
    configs: list[RunConfig]
    preset: str | None = None  # a study campaign's preset: its runs of other presets are reused, not trained

    def reused_runs(self) -> list[RunConfig]:
        """Runs of another preset that this (study) campaign distils from but never trains."""
        return [c for c in self.configs if self.preset is not None and c.preset != self.preset]

    @classmethod
    def open(cls, store: RunStore, preset: str, pair: tuple[str, str] | None = None,
             methods: Sequence[str] = CAMPAIGN_METHODS, seed: int = 0, precision: str | None = None,
             device: str | None = None) -> "Campaign":
        """The campaign of ``preset``/``pair``/``seed``: its frozen plan if it was started before (``precision``
        and ``methods`` must then agree with it), else a new plan, written to disk."""
        pair = pair or (PRESETS[preset]["teacher_student"], PRESETS[preset]["student"])
        name = campaign_name(preset, pair, seed)
        folder = store.root / "campaigns" / name
        path = folder / "plan.json"
        wanted = plan_campaign(preset, pair, methods, seed, precision, device)
        if path.exists():
            frozen = [RunConfig.from_dict(c) for c in read_json(path)["configs"]]
            if precision and any(c.precision != wanted[i].precision for i, c in enumerate(frozen[:len(wanted)])):
                raise CampaignError(
                    f"campaign {name} was planned at precision {frozen[0].precision} ({path}); its runs keep "
                    f"that precision on every machine. Drop --precision to continue it, or use another --results-dir "
                    f"for a campaign at {precision}")
            frozen_methods = [c.method for c in frozen[1:]]
            if list(methods) != frozen_methods:
                raise CampaignError(f"campaign {name} was planned with methods {','.join(frozen_methods)} ({path}); "
                                    f"drop --methods to continue it")
            return cls(name, folder, frozen)
        atomic_write_json(path, {"name": name, "preset": preset, "pair": list(pair), "seed": seed,
                                 "created": utc_now(), "run_ids": [c.run_id for c in wanted],
                                 "configs": [c.to_dict() for c in wanted]})
        return cls(name, folder, wanted)

    @classmethod
    def open_study(cls, store: RunStore, preset: str) -> "Campaign":
        """The campaign over ``preset``'s whole study plan (``launch_plan``: teachers first, each run once). The
        plan is rewritten to ``plan.json`` whenever the grids change (the notebooks read the current grids)."""
        from .launch import launch_plan

        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        configs = launch_plan(preset)
        name = study_campaign_name(preset)
        folder = store.root / "campaigns" / name
        path = folder / "plan.json"
        run_ids = [c.run_id for c in configs]
        if not path.exists() or read_json(path).get("run_ids") != run_ids:
            atomic_write_json(path, {"name": name, "preset": preset, "kind": "study", "planned": utc_now(),
                                     "run_ids": run_ids, "configs": [c.to_dict() for c in configs]})
        return cls(name, folder, configs, preset=preset)

    def status_rows(self, store: RunStore) -> list[dict]:
        """One row per run: its position, run id, status, epochs done and test top-1 (last / final)."""
        from .launch import _teacher_ids

        rows, teacher_ids = [], _teacher_ids(self.configs)
        for i, config in enumerate(self.configs):
            summary = store.summary(config.run_id)
            metrics = [] if summary else store.metrics(config.run_id)
            done = config.epochs if summary else (metrics[-1]["epoch"] if metrics else 0)
            per_epoch = next_epoch_seconds(metrics)
            role = "teacher" if i == 0 or config.run_id in teacher_ids else config.method
            rows.append({"position": i, "run_id": config.run_id, "method": role,
                         "status": store.status(config.run_id), "epochs_done": done, "epochs": config.epochs,
                         "last_top1": summary["last_top1"] if summary else
                         (metrics[-1].get("test_top1") if metrics else None),
                         "eta_s": None if per_epoch is None else (config.epochs - done) * per_epoch})
        return rows


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def format_status(rows: Sequence[dict]) -> str:
    lines = [f"{'#':>2} {'run id':<52} {'status':<11} {'epochs':>9} {'top-1':>7} {'ETA':>7}"]
    for r in rows:
        top1 = "" if r["last_top1"] is None else f"{r['last_top1']:.2f}"
        eta = "" if r["status"] == "finished" else _hours(r["eta_s"])
        lines.append(f"{r['position']:>2} {r['run_id']:<52} {r['status']:<11} "
                     f"{r['epochs_done']:>4}/{r['epochs']:<4} {top1:>7} {eta:>7}")
    return "\n".join(lines)


def run_campaign(campaign: Campaign, store: RunStore, *, minutes: float, device: str | None = None,
                 data_root: str | Path | None = None, out: Callable[[str], None] = print) -> dict:
    """Train the campaign's unfinished runs in order until done or ``minutes`` are nearly up.

    Stops only after a saved epoch, when the next epoch (the median of the run's recent epochs) would not end in
    time; the paused run's checkpoint is exported in committable parts. Returns ``{"finished": bool, "paused":
    run id or None, "rows": status rows}``. A second process on the same campaign raises :class:`CampaignError`.
    """
    if minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {minutes!r}")
    stop_at = time.time() + 60.0 * minutes
    log_path = campaign.folder / "campaign.log"

    def say(line: str) -> None:
        line = f"[{utc_now()}] {line}"
        out(line)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as fh:
            fh.write(line + "\n")

    _require_reused_runs(campaign, store)
    with _campaign_lock(campaign, log_path):
        say(f"campaign {campaign.name}: {len(campaign.configs)} runs, time box {minutes:g} min, store {store.root}")
        paused = None
        epoch_seconds: list[float] = []

        def on_epoch(config: RunConfig, record: dict) -> None:
            seconds = record["epoch_time_s"] + record.get("eval_time_s", 0.0)
            epoch_seconds.append(seconds)
            # the ETA from the median of recent epochs, as the time box decides (one slow epoch does not skew it)
            eta = (config.epochs - record["epoch"]) * (next_epoch_seconds(store.metrics(config.run_id)) or seconds)
            top1 = record.get("test_top1")
            say(f"{config.run_id} epoch {record['epoch']}/{config.epochs}: "
                f"test top-1 {'-' if top1 is None else f'{top1:.2f}%'}, {seconds:.0f} s/epoch, "
                f"run ETA {_hours(eta)}, time box left {_hours(stop_at - time.time())}")

        for i, config in enumerate(campaign.configs):
            if store.summary(config.run_id) is not None:  # reused runs too: _require_reused_runs saw them finished
                continue
            # A new run has no epoch time yet: the previous run's last epoch is the estimate.
            if epoch_seconds and time.time() + 1.1 * epoch_seconds[-1] + 5.0 > stop_at:
                paused = config.run_id
                say(f"not starting {config.run_id}: too little of the time box left")
                break
            say(f"run {i + 1}/{len(campaign.configs)}: {config.run_id} ({config.method}, {config.epochs} epochs, "
                f"precision {config.precision})")
            try:
                summary = run(config, store=store, device=device, quiet=True, data_root=data_root,
                              stop_at=stop_at, on_epoch=on_epoch)
            except RunPaused as exc:
                paused = exc.run_id
                files = store.export_inflight(exc.run_id)
                say(f"paused {exc.run_id} after epoch {exc.epoch}/{exc.epochs}; in-flight checkpoint exported to "
                    f"{files[0].parent} ({len(files) - 1} parts): commit it with the run's records; rerun the same "
                    f"command to continue")
                break
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the last saved epoch committable, then stop
                latest = store.run_dir(config.run_id) / "checkpoints" / "latest.pt"
                if latest.exists():
                    files = store.export_inflight(config.run_id)
                    say(f"interrupted {config.run_id} in an epoch; its last saved epoch is exported to "
                        f"{files[0].parent} ({len(files) - 1} parts): commit it; rerun the same command to continue")
                else:
                    say(f"interrupted {config.run_id} before its first saved epoch")
                raise
            say(f"finished {config.run_id}: last top-1 {summary['last_top1']:.2f}%, best {summary['best_top1']:.2f}% "
                f"(epoch {summary['best_epoch']}), {summary['wall_time_s'] / 3600:.2f} h")
            if config.teacher is None and i == 0:
                say(f"teacher weights: git add -f {store.run_dir(config.run_id) / 'checkpoints' / 'final.pt'}")
            if campaign.preset is not None:
                _derive_study_analysis(campaign.preset, store, device, data_root, say)
        rows = campaign.status_rows(store)
        finished = all(r["status"] == "finished" for r in rows)
        say("campaign finished" if finished else "campaign stopped; status:")
        for line in format_status(rows).splitlines():
            say(line)
        return {"finished": finished, "paused": paused, "rows": rows}


def _derive_study_analysis(preset: str, store: RunStore, device: str | None, data_root: str | Path | None,
                           say: Callable[[str], None]) -> None:
    """After a study campaign's run: the t-SNE and correlation files of every finished analysed run, computed
    while its checkpoint is on this machine (checkpoints are not committed; these small files are). A failure
    is logged and training goes on: `make reproduce` derives them later if the checkpoint is still there."""
    from .study import derive_analysis

    try:
        written = derive_analysis(preset, store=store, device=device, data_root=data_root, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the analysis must never stop the training campaign
        say(f"could not derive the t-SNE/correlation files: {type(exc).__name__}: {exc}")
        return
    if written:
        say(f"derived {len(written)} t-SNE/correlation files under {written[0].parent.parent}: commit them")


def _require_reused_runs(campaign: Campaign, store: RunStore) -> None:
    """A study campaign reuses runs of another preset (medium: the paper recipe's teacher) and never trains them:
    before it starts, every one of them must be finished, else the error names the command that trains it."""
    for config in campaign.reused_runs():
        if store.summary(config.run_id) is not None:
            continue
        student = next((c.student for c in campaign.configs
                        if c.teacher is not None and c.teacher.run_id == config.run_id), None)
        how = (f": `python -m ckd_study campaign --preset {config.preset} --pair {config.student}-{student}`"
               if student else "")
        raise CampaignError(
            f"campaign {campaign.name} reuses run {config.run_id} of preset {config.preset!r} "
            f"({store.status(config.run_id)}), which it does not train; finish that run first{how}")


@contextmanager
def _campaign_lock(campaign: Campaign, log_path: Path) -> Iterator[None]:
    try:
        lock = run_lock(campaign.folder)
        lock.__enter__()
    except RunInProgressError as exc:
        raise CampaignError(f"campaign {campaign.name} is already running ({exc}); wait for it, or follow "
                            f"{log_path}") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------------------
# The report: measured beside published, hours, learning curves
# ---------------------------------------------------------------------------------------------------------
# |measured − published| above this (pp) marks a finished row for investigation (issue: CPU reproduction).
INVESTIGATE_PP = 0.5


def report_campaign(campaign: Campaign, store: RunStore, figures_dir: str | Path) -> dict[str, Any]:
    """Tables and the learning-curve figure of a campaign, from the store: per run its status, last-epoch and
    best-epoch test top-1 beside the published number (methods.md §5) and Δ = last − published, the hours it
    took here (its epochs' train + eval time, all attempts), and a flag where a finished run is more than
    :data:`INVESTIGATE_PP` pp from its published number. Unfinished runs show the epochs done and their latest
    top-1 (never a final number). Writes ``<figures_dir>/reproduction_<teacher>-<student>{.csv,.md}`` and
    ``..._curves{.png,.pdf}``; returns ``{"table", "curves", "files"}``."""
    import pandas as pd

    from . import analysis
    from .published import PUBLISHED
    from .study.grids import METHOD_LABELS  # the study's own method labels (imported here: study imports us)

    teacher_cfg = campaign.configs[0]
    student = campaign.configs[1].student if len(campaign.configs) > 1 else None
    pair = (teacher_cfg.student, student)
    published = PUBLISHED.get(pair, {})
    stem = f"reproduction_{pair[0]}-{pair[1]}"
    out = Path(figures_dir)
    rows, curves, terms = [], [], []
    for i, config in enumerate(campaign.configs):
        key = "teacher" if i == 0 else config.method
        label = f"teacher ({config.student})" if i == 0 else METHOD_LABELS.get(config.method, config.method)
        summary = store.summary(config.run_id)
        metrics = store.metrics(config.run_id)
        hours = sum(m["epoch_time_s"] + m.get("eval_time_s", 0.0) for m in metrics) / 3600
        done = metrics[-1]["epoch"] if metrics else 0
        last = summary["last_top1"] if summary else None
        best = summary["best_top1"] if summary else None
        pub = published.get(key)
        delta = last - pub if last is not None and pub is not None else None
        status = "finished" if summary else (f"{done}/{config.epochs} epochs" if done else "not started")
        decay = _before_first_decay(config, metrics)
        rows.append({"run": label, "run id": config.run_id, "status": status,
                     "last-epoch top-1 (%)": analysis.format_number(last),
                     "best-epoch top-1 (%)": analysis.format_number(best) + (
                         f" (epoch {summary['best_epoch']})" if summary else ""),
                     "latest test top-1 (%)": analysis.format_number(
                         metrics[-1].get("test_top1") if metrics and not summary else None),
                     "top-1 before 1st lr decay (%)": "–" if decay is None else
                     f"{decay[1]:.2f} (epoch {decay[0]})",
                     "published (%)": analysis.format_number(pub),
                     "Δ last − published (pp)": analysis.format_number(delta, signed=True),
                     "hours here": analysis.format_number(hours if metrics else None, digits=1),
                     "investigate": "yes" if delta is not None and abs(delta) > INVESTIGATE_PP else ""})
        curves += [{"run": label, "epoch": m["epoch"], "test_top1": m["test_top1"]}
                   for m in metrics if m.get("test_top1") is not None]
        term_keys = _loss_term_keys(metrics)  # once per run, not once per metric entry
        terms += [{"run": label, "epoch": m["epoch"], "term": name, "value": value}
                  for m in metrics for name, value in m.items() if name in term_keys]
    table = pd.DataFrame(rows)
    machine = _machine_of(store, campaign)
    caption = (f"Reproduction of the published {pair[0]} → {pair[1]} row (methods.md §5) at the '{teacher_cfg.preset}' "
               f"recipe ({campaign.configs[-1].epochs} epochs, batch {campaign.configs[-1].batch_size}, seed "
               f"{campaign.configs[-1].seed}, {teacher_cfg.precision}) on {machine}. Measured, never tuned or selected: "
               f"one seed per run. Δ: last-epoch top-1 minus the published number; rows more than {INVESTIGATE_PP} pp "
               f"away are marked for investigation. Hours: the run's train + evaluation time, summed over its "
               f"attempts on the machines named. "
               f"Unfinished runs show their latest test top-1 only. CKD and MCLD publish no citable number.")
    files = [analysis.save_table(table, out / stem, caption=caption)]
    curve_frame = pd.DataFrame(curves, columns=["run", "epoch", "test_top1"])
    analysis.write_csv(curve_frame, out / f"{stem}_curves.csv")
    figure = None
    if len(curve_frame):
        decays = [e for e in map(_first_decay_epoch, campaign.configs) if e is not None]
        panels = _curve_panels(curve_frame, min(decays) if decays else None)
        figure = analysis.plot_line_panels(panels, out / f"{stem}_curves",
                                           title=f"{pair[0]} → {pair[1]}, preset {teacher_cfg.preset}: "
                                                 f"test top-1 per epoch")
    # What a row more than INVESTIGATE_PP away is looked at with: each run's training loss terms per epoch.
    term_frame = pd.DataFrame(terms, columns=["run", "epoch", "term", "value"])
    files.append({"loss_terms_csv": analysis.write_csv(term_frame, out / f"{stem}_loss_terms.csv")})
    if len(term_frame):
        panels = [dict(data=group, x="epoch", y="value", hue="term", xlabel="epoch", ylabel="training loss term",
                       title=run_label) for run_label, group in term_frame.groupby("run", sort=False)]
        title = (f"{pair[0]} → {pair[1]}, preset {teacher_cfg.preset}: training loss terms per epoch (epoch means "
                 f"of the weighted terms the loop summed)")
        files.append(analysis.plot_line_panels(panels, out / f"{stem}_loss_terms", title=title))
    return {"table": table, "curves": curve_frame, "loss_terms": term_frame, "figure": figure, "files": files}


def _loss_term_keys(metrics: Sequence[dict]) -> set[str]:
    """The per-epoch training loss terms a run logged (``train_<term>`` and their sum ``train_loss``), not its
    training accuracy."""
    return {k for m in metrics for k in m if k.startswith("train_") and k != "train_top1"}


def _curve_panels(curve_frame, first_decay: int | None) -> list[dict[str, Any]]:
    """The learning-curve figure's panels: every epoch of every run, then (once a run has trained past it) the
    epochs after the first lr decay alone, where the runs differ by tenths of a pp that the full 10–75 % scale
    hides."""
    panel = dict(x="epoch", y="test_top1", hue="run", xlabel="epoch", ylabel="test top-1 (%)")
    panels = [dict(panel, data=curve_frame, title="all epochs")]
    late = curve_frame[curve_frame["epoch"] > first_decay] if first_decay is not None else curve_frame[:0]
    if len(late):
        panels.append(dict(panel, data=late, title=f"after the first lr decay (epochs {first_decay + 1}–)"))
    return panels


def _first_decay_epoch(config: RunConfig) -> int | None:
    """The last epoch trained at the initial learning rate of a step schedule (None for other schedules or when
    the first milestone lies past the run's end)."""
    if config.schedule != "step" or not config.milestones or config.milestones[0] > config.epochs:
        return None
    return config.milestones[0]


def _before_first_decay(config: RunConfig, metrics: Sequence[dict]) -> tuple[int, float] | None:
    """(epoch, test top-1) at the last epoch before the step schedule's first learning-rate decay, once trained
    (None for other schedules or before then): where a curve's shape first shows a recipe difference."""
    epoch = _first_decay_epoch(config)
    if epoch is None:
        return None
    top1 = next((m.get("test_top1") for m in metrics if m["epoch"] == epoch), None)
    return None if top1 is None else (epoch, top1)


def _machine_of(store: RunStore, campaign: Campaign) -> str:
    """The CPUs/GPUs the campaign's runs trained on, from every attempt's environment record (a resumed run may
    have used another thread count or machine), e.g. ``AMD EPYC (cpu, 1–2 threads)``."""
    machines: dict[tuple[str, str], set[int]] = {}
    for config in campaign.configs:
        for env in store.attempts(config.run_id):
            device = str(env.get("device", "?"))
            threads = machines.setdefault((str(env.get("device_name", device)), device), set())
            if device.startswith("cpu") and env.get("torch_threads"):
                threads.add(int(env["torch_threads"]))
    parts = []
    for (name, device), threads in machines.items():
        low, high = (min(threads), max(threads)) if threads else (None, None)
        if low is None:
            count = ""
        elif low == high:
            count = f", {low} thread" + ("s" if low > 1 else "")
        else:
            count = f", {low}–{high} threads"
        parts.append(f"{name} ({device}{count})")
    return ", ".join(parts) or "no machine yet"
