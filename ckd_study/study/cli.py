"""The study's commands: reproduce, figures, plan, strip, campaign, launch (``python -m ckd_study <command>``;
``python -m ckd_study.study <command>`` is the same)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..campaign import CAMPAIGN_METHODS
from ..config import PRECISIONS, ConfigError, available_presets
from ..methods import MethodError
from ..runs import RunError
from .builders import plan, rebuild_figures
from .grids import NOTEBOOKS, MissingRunsError
from .notebooks import reproduce, strip_notebook
from .collect import _store  # noqa: F401

def _campaign_command(args: argparse.Namespace) -> int:
    from ..campaign import Campaign, CampaignError, format_status, parse_pair, run_campaign

    store = _store(args.results_dir)
    methods = tuple(args.methods.split(",")) if args.methods else CAMPAIGN_METHODS
    try:
        if args.study:
            # the study's runs are its grids (data): the flags that pick one pair's runs do not apply
            clash = [flag for flag, value in (("--pair", args.pair), ("--methods", args.methods),
                                              ("--seed", args.seed != 0 or None), ("--precision", args.precision),
                                              ("--report", args.report or None)) if value]
            if clash:
                raise CampaignError(f"--study trains every run of the preset's notebooks as its grids define them; "
                                    f"drop {', '.join(clash)} (the tables and figures: `python -m ckd_study "
                                    f"reproduce --preset {args.preset}` once it has finished)")
            campaign = Campaign.open_study(store, args.preset)
        else:
            pair = parse_pair(args.pair) if args.pair else None
            campaign = Campaign.open(store, args.preset, pair, methods, args.seed, args.precision, args.device)
        if args.status:
            print(f"campaign {campaign.name} ({campaign.folder})")
            print(format_status(campaign.status_rows(store)))
            return 0
        if args.report:
            from ..campaign import report_campaign
            from .collect import figures_dir_for

            report = report_campaign(campaign, store, figures_dir_for(args.preset, args.figures_dir))
            print(report["table"].drop(columns=["run id"]).to_string(index=False))
            print("wrote " + ", ".join(str(p) for files in report["files"] for p in files.values())
                  + ("" if report["figure"] is None else ", " + ", ".join(str(p) for p in report["figure"].values())))
            return 0
        import signal

        def terminated(signum, frame):  # a job scheduler's or a session's SIGTERM: stop as Ctrl-C would
            raise KeyboardInterrupt(f"campaign stopped by {signal.Signals(signum).name}; rerun the same command "
                                    f"to continue")

        # `campaign ... &` from a script starts with SIGINT ignored (POSIX shells do that to background jobs),
        # so `kill -INT` would be silently dropped; a campaign stops on it like on Ctrl-C wherever it runs.
        previous = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            result = run_campaign(campaign, store, minutes=args.minutes, device=args.device,
                                  data_root=args.data_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (CampaignError, ConfigError, MethodError, RunError) as exc:
        print(f"campaign: {exc}", file=sys.stderr)
        return 1
    return 0 if result["finished"] or result["paused"] else 1


def _launch_command(args: argparse.Namespace) -> int:
    from ..launch import (LaunchError, SlurmOptions, format_status, launch_local, launch_plan, launch_slurm,
                          launch_status, wait_for)

    store = _store(args.results_dir)
    configs = launch_plan(args.preset)
    if args.status:
        print(format_status(launch_status(args.preset, store, configs)))
        return 0
    try:
        if args.executor == "local":
            outcome = launch_local(configs, store, args.preset, workers=args.workers, device=args.device,
                                   data_root=args.data_dir, threads=args.threads)
            failed = [r for r, o in outcome.items() if o.startswith(("failed", "skipped"))]
            print(f"launch {args.preset}: {len(configs) - len(failed)} of {len(configs)} runs finished"
                  + (f"; {len(failed)} failed or skipped (`launch --status` shows why)" if failed else ""))
            return 1 if failed else 0
        extra = dict(item.split("=", 1) if "=" in item else (item, True) for item in args.sbatch or [])
        overrides = {"partition": args.partition, "account": args.account, "time_min": args.time,
                     "gpus_per_job": args.gpus_per_job, "cpus_per_job": args.cpus_per_job, "mem": args.mem,
                     "max_parallel": args.max_parallel}
        if args.slurm_config:
            options = SlurmOptions.from_file(args.slurm_config, **overrides)
            options.extra.update(extra)
        else:
            options = SlurmOptions(**{k: v for k, v in overrides.items() if v is not None}, extra=extra)
        launch_slurm(configs, store, args.preset, options, device=args.device, data_root=args.data_dir)
        if args.wait:
            rows = wait_for(configs, store, args.preset, timeout_s=args.wait)
            print(format_status(rows))
            return 0 if all(r["state"] == "finished" for r in rows) else 1
        print(f"follow with: python -m ckd_study launch --preset {args.preset} --status"
              + (f" --results-dir {args.results_dir}" if args.results_dir else ""))
        return 0
    except (LaunchError, ConfigError, RunError) as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """The study's commands: user errors print one message (``--debug``: the traceback), as in
    ``python -m ckd_study``."""
    from ..cli import report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    return report_errors(lambda: _main([a for a in argv if a != "--debug"]), debug)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckd_study", epilog="--debug: show tracebacks",
                                     description="Run the study's notebooks, rebuild its tables and figures.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", choices=available_presets(), required=True)
        p.add_argument("--results-dir", default=None, help="results store (default: $CKD_RESULTS_DIR or results/)")
        p.add_argument("--figures-dir", default=None,
                       help="base folder of tables/figures (default: $CKD_FIGURES_DIR or figures/); "
                            "files go to <base>/<preset>/")
        p.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None, help="these notebooks only")

    rep = sub.add_parser("reproduce", help="execute every notebook with papermill into reports/<preset>/")
    common(rep)
    rep.add_argument("--reports-dir", default=None, help="default: reports/")
    rep.add_argument("--kernel", default=None, help="Jupyter kernel (default: the current interpreter)")
    fig = sub.add_parser("figures", help="rebuild every table and figure from the store, without training")
    common(fig)
    pl = sub.add_parser("plan", help="list the runs of every notebook and their status")
    pl.add_argument("--preset", choices=available_presets(), required=True)
    pl.add_argument("--results-dir", default=None)
    st = sub.add_parser("strip", help="remove outputs and execution counts from notebooks")
    st.add_argument("notebooks", nargs="+", type=Path)
    cam = sub.add_parser("campaign", help="train a teacher and its students (or, --study, a preset's whole study "
                                          "plan) one after another in a time box; rerun to continue (see "
                                          "ckd_study/campaign.py)")
    cam.add_argument("--preset", choices=available_presets(), required=True)
    cam.add_argument("--pair", default=None, metavar="TEACHER-STUDENT",
                     help="e.g. resnet56-resnet20 (default: the preset's pair)")
    cam.add_argument("--minutes", type=float, default=150.0, help="time box; stops after a saved epoch (default 150)")
    cam.add_argument("--methods", default=None,
                     help=f"comma-separated students in order (default: {','.join(CAMPAIGN_METHODS)})")
    cam.add_argument("--seed", type=int, default=0)
    cam.add_argument("--precision", choices=PRECISIONS, default=None,
                     help="of every run, when the campaign is first planned (default auto)")
    cam.add_argument("--device", default=None)
    cam.add_argument("--data-dir", default=None)
    cam.add_argument("--results-dir", default=None)
    cam.add_argument("--study", action="store_true",
                     help="train every run of the preset's seven notebooks (its study plan, teachers first) "
                          "instead of one pair's teacher and students; then `reproduce` builds the tables")
    cam.add_argument("--status", action="store_true", help="print where the campaign stands and exit")
    cam.add_argument("--report", action="store_true",
                     help="write the campaign's tables (measured beside published, hours) and learning curves to "
                          "<figures>/<preset>/ from the store, and exit")
    cam.add_argument("--figures-dir", default=None, help="base folder of the report (default: figures/)")
    la = sub.add_parser("launch", help="train every run of a preset's plan with local workers or as SLURM jobs "
                                       "(see ckd_study/launch.py); rerun to continue")
    la.add_argument("--preset", choices=available_presets(), required=True)
    la.add_argument("--executor", choices=("local", "slurm"), default="local")
    la.add_argument("--status", action="store_true", help="print each run's state and exit")
    la.add_argument("--results-dir", default=None,
                    help="results store (default: $CKD_RESULTS_DIR or results/); with slurm on a filesystem every "
                         "node mounts at the same path")
    la.add_argument("--data-dir", default=None, help="dataset root seen by the workers (default: $CKD_DATA_DIR)")
    la.add_argument("--device", default=None, help="default: one worker per GPU when CUDA is there, else cpu")
    loc = la.add_argument_group("local executor")
    loc.add_argument("--workers", type=int, default=None, help="worker processes (default: one per GPU, or 1)")
    loc.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: cores // workers)")
    sl = la.add_argument_group("slurm executor")
    sl.add_argument("--slurm-config", default=None, help="TOML file of SlurmOptions keys (flags override it)")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--account", default=None)
    sl.add_argument("--time", type=int, default=None, help="time limit per job in minutes (default 1440)")
    sl.add_argument("--gpus-per-job", type=int, default=None, help="default 0 (CPU jobs)")
    sl.add_argument("--cpus-per-job", type=int, default=None)
    sl.add_argument("--mem", default=None, help="e.g. 16G")
    sl.add_argument("--max-parallel", type=int, default=None, help="array parallelism (default 64)")
    sl.add_argument("--sbatch", action="append", metavar="KEY[=VALUE]",
                    help="extra sbatch option, repeatable (e.g. --sbatch qos=high; a bare KEY is a flag)")
    sl.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                    help="wait for the jobs (at most SECONDS), then print the status")
    args = parser.parse_args(argv)
    if args.command == "launch":
        return _launch_command(args)

    if args.command == "campaign":
        return _campaign_command(args)

    if args.command == "strip":
        for path in args.notebooks:
            print(f"{'stripped' if strip_notebook(path) else 'clean   '} {path}")
        return 0
    if args.command == "plan":
        import pandas as pd

        frame = plan(args.preset, args.results_dir)
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
            print(frame[["notebook", "run_id", "setting", "new", "status"]].to_string(index=False))
        counts = frame.groupby("notebook", sort=False).agg(runs=("run_id", "size"), new=("new", "sum"))
        print("\nruns per notebook (new = not needed by an earlier notebook):")
        print(counts.to_string())
        print(f"distinct runs: {frame['run_id'].nunique()}, finished: "
              f"{(frame.drop_duplicates('run_id')['status'] == 'finished').sum()}")
        return 0
    if args.command == "figures":
        try:
            results = rebuild_figures(args.preset, store=args.results_dir, figures_dir=args.figures_dir,
                                      only=args.only)
        except MissingRunsError as exc:
            print(f"figures: {exc}", file=sys.stderr)
            return 1
        for name, result in results.items():
            print(f"{name}: " + ", ".join(str(p) for p in result.files))
        return 0
    reproduce(args.preset, results_dir=args.results_dir, figures_dir=args.figures_dir,
              reports_dir=args.reports_dir, only=args.only, kernel=args.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
