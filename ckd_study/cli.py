"""``python -m ckd_study``: the one command line of the project.

Runs: train, cache-teacher, import-teacher, list, show, models, methods (this module). The study: reproduce,
figures, plan, strip, campaign, launch (``ckd_study.study.cli``, which this entry point hands them to; the
older spelling ``python -m ckd_study.study <command>`` still works).

Examples::

    python -m ckd_study train --preset quick --method ckd
    python -m ckd_study train --preset quick --method kd --teacher resnet32 --student resnet8 --seed 1
    python -m ckd_study train --preset smoke --method ckd --option temperature=0.5 --option anchor=both
    python -m ckd_study train --config results/runs/<run-id>/config.json
    python -m ckd_study cache-teacher --preset paper --teacher resnet32x4 --student resnet8x4
    python -m ckd_study import-teacher cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth --model resnet56
    python -m ckd_study list
    python -m ckd_study show <run-id>
    python -m ckd_study plan --preset quick
    python -m ckd_study reproduce --preset quick
    python -m ckd_study campaign --preset paper --pair resnet56-resnet20 --minutes 150
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import (PRECISIONS, RECIPES, SCHEDULES, ConfigError, RunConfig, available_presets, make_config,
                     setting_label)
from .data import available_datasets
from .methods import MethodError, available_methods, build_options, method_class
from .models import available_models, create_model


def _parse_value(text: str) -> Any:
    """Option values: JSON when it parses (numbers, true/false/null, lists), else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value.strip())


def _milestones(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated whole epochs, e.g. 150,180,210; got {text!r}") from None


def _common_flags(defaults: bool) -> argparse.ArgumentParser:
    """Flags every command takes, before or after the command's name (the top level keeps the defaults)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results-dir", default=None if defaults else argparse.SUPPRESS,
                        help="results store (default: $CKD_RESULTS_DIR or results/)")
    common.add_argument("--debug", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="show the full traceback of an error")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ckd_study", parents=[_common_flags(True)],
                                     description="Contrastive knowledge distillation study on CIFAR-100.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,cache-teacher,import-teacher,list,show,models,methods,"
                                        + ",".join(STUDY_COMMANDS) + "}")
    common = _common_flags(False)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:  # every command takes the common flags too
        return sub.add_parser(name, parents=[common], **kwargs)

    _add_run_arguments(command("train", help="train a teacher (method ce) or a distillation run"))
    cache = command(
        "cache-teacher", help="precompute the exact teacher-output cache (all 162 views of every training image)",
        description="Fill the exact teacher-output cache of a config's teacher and training set for every view, "
                    "training the teacher first if needed. Takes the flags of `train`; the cache depends only "
                    "on the teacher and the training set, so any distillation method selects the same cache "
                    "(default kd). Runs also fill it lazily on their own; an interrupted precompute continues.")
    _add_run_arguments(cache)

    imp = command(
        "import-teacher", help="store a standard teacher checkpoint (RepDistiller/mdistiller/CKD) as a teacher run",
        description="Load FILE (a dict with 'model' or 'state_dict', or a bare state dict; 'module.' prefixes are "
                    "stripped) strictly into --model, measure its test accuracy, and store it as the finished "
                    "teacher run that `train` with the same --preset/--device/--precision would otherwise train.")
    imp.add_argument("file", type=Path)
    imp.add_argument("--model", required=True, choices=available_models(), metavar="MODEL",
                     help=f"zoo model of the checkpoint; one of: {', '.join(available_models())}")
    imp.add_argument("--preset", choices=available_presets(), default="paper", help="default: paper")
    imp.add_argument("--precision", choices=PRECISIONS, default=None, help="as you will pass to train (default auto)")
    imp.add_argument("--device", help="as you will pass to train (default: cuda when available)")
    imp.add_argument("--data-dir", help="dataset root (default: $CKD_DATA_DIR or data/)")

    command("list", help="runs in the store with their status and headline metrics")
    show = command("show", help="a run's config, summary and last epochs")
    show.add_argument("run_id")
    command("models", help="the model zoo with parameter counts")
    command("methods", help="the methods and their options with defaults")
    for name, text in STUDY_COMMANDS.items():  # listed here, parsed by the study's own parser (see main)
        sub.add_parser(name, help=f"{text} (`python -m ckd_study {name} --help`)", add_help=False)
    return parser


def _add_run_arguments(train: argparse.ArgumentParser) -> None:
    """The flags that pick a run's config (and where and how it runs)."""
    train.add_argument("--config", type=Path, help="a config.json (as stored in a run folder); flags override it")
    train.add_argument("--preset", choices=available_presets(), default=None, help="config defaults (default: paper)")
    train.add_argument("--dataset", choices=available_datasets())
    train.add_argument("--student", choices=available_models(), metavar="MODEL",
                       help=f"student model; one of: {', '.join(available_models())}")
    train.add_argument("--teacher", choices=available_models(), metavar="MODEL",
                       help="teacher model (trained with the preset's teacher recipe if no finished run exists)")
    train.add_argument("--teacher-run", metavar="RUN_ID", help="use the teacher of a stored run (by run id)")
    train.add_argument("--method", choices=available_methods(), default=None,
                       help=f"default ce; one of: {', '.join(available_methods())}")
    train.add_argument("--recipe", choices=list(RECIPES), default=None,
                       help="a student budget other than the preset's, e.g. ckd_released (480 epochs, cosine, "
                            "the released per-pair batch size at the paper preset)")
    train.add_argument("--teacher-epochs", type=int, help="epochs of the teacher recipe (default: the preset's)")
    train.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a method option, e.g. temperature=0.5 (repeatable; `methods` lists them)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--schedule", choices=SCHEDULES)
    train.add_argument("--milestones", type=_milestones, metavar="E1,E2,...")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--train-per-class", type=int)
    train.add_argument("--test-per-class", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--deterministic", action="store_true", default=None)
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the student")
    train.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="network compute precision (default auto: bf16 on CUDA and on CPUs with native bf16 "
                            "except Intel without AMX, else fp32; losses are float32 either way); part of the run id")
    train.add_argument("--drop-last", action="store_true", default=None,
                       help="drop the last partial batch of each epoch (DCD's release; default: keep it, as the "
                            "released KD trainers do)")
    train.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false", default=None)
    train.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    train.add_argument("--data-dir", help="dataset root (default: $CKD_DATA_DIR or data/)")
    train.add_argument("--wait", action="store_true", help="wait for another process training the same run")
    train.add_argument("--wait-timeout", type=float, default=None, metavar="SECONDS",
                       help="with --wait: give up after this long")
    train.add_argument("--retrain", action="store_true",
                       help="train the run again from scratch, moving its old folder aside (corrupt weights or "
                            "records); nothing is deleted")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and run id, train nothing")


_FLAG_FIELDS = ("dataset", "student", "epochs", "batch_size", "lr", "schedule", "milestones", "weight_decay",
                "seed", "train_per_class", "test_per_class", "eval_every", "deterministic", "compile",
                "teacher_cache", "precision", "drop_last")


def config_from_args(args: argparse.Namespace, store) -> RunConfig:
    overrides = {k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k) is not None}
    options = dict(args.option)
    if args.config is not None:
        if args.preset is not None:
            raise ConfigError("give either --config or --preset, not both")
        try:
            data = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--config {args.config}: cannot read it as JSON ({exc})") from exc
        base = RunConfig.from_dict(data.get("config", data))
        if args.method is not None:
            overrides["method"] = args.method
        merged = {**base.method_options, **options} if overrides.get("method", base.method) == base.method else options
        from .config import resolve

        return resolve(base.replace(method_options=merged, **overrides), args.device)
    method = args.method or "ce"
    teacher: Any = args.teacher
    if args.teacher_run:
        teacher = store.config(args.teacher_run)
    if teacher is not None and not method_class(method).needs_teacher:
        raise ConfigError(f"--teacher/--teacher-run: method {method!r} trains without a teacher; "
                          f"pick a distillation method with --method ({', '.join(m for m in available_methods() if m != 'ce')})")
    teacher_overrides = {"epochs": args.teacher_epochs} if args.teacher_epochs is not None else None
    if teacher_overrides and not isinstance(teacher, (str, type(None))):
        raise ConfigError("--teacher-epochs applies to a teacher trained from the preset, not to --teacher-run")
    return make_config(args.preset or "paper", method=method, teacher=teacher, method_options=options,
                       teacher_overrides=teacher_overrides, device=args.device, recipe=args.recipe, **overrides)


def cmd_train(args, store) -> int:
    from .runs import run

    config = config_from_args(args, store)
    print(f"run id: {config.run_id}")
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    status = "new" if args.retrain else store.status(config.run_id)
    if status == "finished":
        print("already finished: read from the store, not trained again")
    elif status == "interrupted" or store.inflight_dir(config.run_id).exists():
        done = len(store.metrics(config.run_id))
        print(f"resuming from its last checkpoint (epoch {done}/{config.epochs})")
    summary = run(config, store=store, device=args.device, quiet=args.quiet, wait=args.wait, data_root=args.data_dir,
                  wait_timeout=args.wait_timeout, retrain=args.retrain)
    print(f"finished {summary['run_id']}: last top-1 {summary['last_top1']:.2f}%, best {summary['best_top1']:.2f}% "
          f"(epoch {summary['best_epoch']}), {summary['wall_time_s']:.0f} s, {summary['images_per_s']:.0f} img/s")
    print(f"stored in {store.run_dir(summary['run_id'])}")
    return 0


def cmd_cache_teacher(args, store) -> int:
    from .runs import precompute_teacher_cache, teacher_of

    if args.method is None:
        args.method = "kd"  # any distillation method: the cache depends only on the teacher and the training set
    config = config_from_args(args, store)
    teacher = teacher_of(config)
    print(f"teacher run id: {teacher.run_id}")
    if args.dry_run:
        print(json.dumps(teacher.to_dict(), indent=2))
        return 0
    result = precompute_teacher_cache(config, store=store, device=args.device, quiet=args.quiet, wait=args.wait,
                                      data_root=args.data_dir)
    print(f"teacher cache of {result['teacher_run_id']}: {result['coverage']:.1%} of {result['image_views']:,} "
          f"image-views filled ({result['computed']:,} computed now, {result['seconds']:.0f} s on "
          f"{result['device']})")
    print(f"stored in {result['cache_path']}")
    return 0


def cmd_import_teacher(args, store) -> int:
    from .teachers import accuracy_note, import_teacher

    summary = import_teacher(args.file, args.model, preset=args.preset, store=store, device=args.device,
                             precision=args.precision, data_root=args.data_dir)
    note, off = accuracy_note(summary)
    print(f"imported {args.file.name} ({summary['imported']['format']}) as teacher run {summary['run_id']}: {note}")
    if off:
        print(f"warning: the measured accuracy is more than 1 pp from the published one: check the file, --model "
              f"and the dataset", file=sys.stderr)
    print(f"stored in {store.run_dir(summary['run_id'])}; `train --preset {args.preset} --teacher {args.model}` "
          f"distils from it")
    return 0


def cmd_list(args, store) -> int:
    if store.root.exists() and not store.root.is_dir():
        raise ConfigError(f"results dir {store.root} is a file, not a folder: pass --results-dir (or set "
                          f"$CKD_RESULTS_DIR) to the folder that holds runs/")
    ids = store.run_ids()
    if not ids:
        print(f"no runs in {store.root / 'runs'}")
        return 0
    print(f"{'run id':<58} {'status':<11} {'preset':<6} {'prec':<4} {'epochs':>6} {'last top1':>9} {'best top1':>9}"
          f"  setting (what differs from the preset's default run)")
    for run_id in ids:
        try:
            cfg = store.config(run_id)
            summary = store.summary(run_id) or {}
            last = summary.get("last_top1")
            best = summary.get("best_top1")
            print(f"{run_id:<58} {store.status(run_id):<11} {cfg.preset:<6} {cfg.precision:<4} {cfg.epochs:>6} "
                  f"{'' if last is None else f'{last:.2f}':>9} {'' if best is None else f'{best:.2f}':>9}"
                  f"  {setting_label(cfg) or '-'}")
        except Exception as exc:  # one broken run must not hide the others
            print(f"{run_id:<58} unreadable ({exc})")
    return 0


def cmd_show(args, store) -> int:
    cfg = store.config(args.run_id)
    print(f"run {args.run_id} ({store.status(args.run_id)}, precision {cfg.precision}) in {store.run_dir(args.run_id)}")
    print("config:", json.dumps(cfg.to_dict(), indent=2))
    summary = store.summary(args.run_id)
    if summary:
        print("summary:", json.dumps(summary, indent=2))
    metrics = store.metrics(args.run_id)
    for row in metrics[-5:]:
        print(json.dumps(row))
    return 0


def cmd_models(args, store) -> int:
    print(f"{'model':<14} {'params (100 classes)':>22} {'pooled dim':>10}")
    for name in available_models():
        model = create_model(name, 100)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<14} {n / 1e6:>20.2f} M {model.pooled_dim:>10}")
    return 0


def cmd_methods(args, store) -> int:
    for name in available_methods():
        cls = method_class(name)
        opts = build_options(name)
        print(f"{name}: {'needs a teacher' if cls.needs_teacher else 'no teacher'}")
        for f in dataclasses.fields(opts):
            print(f"    {f.name} = {getattr(opts, f.name)!r}")
    return 0


COMMANDS = {"train": cmd_train, "cache-teacher": cmd_cache_teacher, "import-teacher": cmd_import_teacher,
            "list": cmd_list, "show": cmd_show,
            "models": cmd_models, "methods": cmd_methods}


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem the user can fix: one line on stderr, exit code 1, no traceback."""
    from .campaign import CampaignError
    from .data import DatasetError, UnknownDatasetError
    from .runs import RunError
    from .study import StudyError
    from .train import NonFiniteLossError

    return (ConfigError, MethodError, RunError, DatasetError, UnknownDatasetError, CampaignError, StudyError,
            NonFiniteLossError, OSError)


def report_errors(run_command, debug: bool) -> int:
    """Run ``run_command()`` and turn user errors, Ctrl-C and a closed output pipe into one line and an exit
    code (1, 130, 0); ``debug`` re-raises them with their traceback."""
    try:
        code = run_command()
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `list | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(str(exc) or "interrupted; rerun the same command to resume from the last saved epoch", file=sys.stderr)
        return 130
    except user_errors() as exc:
        if debug:
            raise
        print(f"error: {str(exc) or type(exc).__name__}\n(--debug shows the traceback)", file=sys.stderr)
        return 1


# The study's commands (``ckd_study.study.cli``) and their one-line help.
STUDY_COMMANDS = {
    "reproduce": "execute every notebook of a preset with papermill",
    "figures": "rebuild a preset's tables and figures from the store, without training",
    "plan": "list the runs of every notebook and their status",
    "strip": "remove outputs and execution counts from notebooks",
    "campaign": "train a teacher and its students, or (--study) a preset's whole plan, in a time box",
    "launch": "train a preset's plan with local workers or as SLURM jobs",
}


def main(argv: Sequence[str] | None = None) -> int:
    from .runs import RunStore

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in STUDY_COMMANDS and all(a == "--debug" for a in argv[:argv.index(command)]):
        from .study.cli import main as study_main

        return study_main(argv)
    args = build_parser().parse_args(argv)
    return report_errors(lambda: COMMANDS[args.command](args, RunStore(args.results_dir)), args.debug)


if __name__ == "__main__":
    sys.exit(main())
