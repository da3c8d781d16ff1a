"""What a new user meets first: one-line CLI errors (no traceback, exit 1, the path or value named), data found
from notebooks/, one run id per setting, the common flags after the command, runs that say what they reuse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ckd_study import cli
from ckd_study.config import make_config
from ckd_study.data import default_data_root
from ckd_study.methods import MethodError
from ckd_study.runs import RunInProgressError, RunStore, run_lock

REPO = Path(__file__).resolve().parent.parent


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_missing_dataset_is_one_message_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path / "nowhere"))
    results = tmp_path / "results"
    code, _, err = _main(capsys, "train", "--preset", "quick", "--method", "kd", "--results-dir", str(results))
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: CIFAR-100 not found") and str(tmp_path / "nowhere") in err
    assert "CKD_DATA_DIR" in err and "--debug" in err
    assert not (results / "runs").exists() or not any((results / "runs").iterdir()), "no half-made run folder"
    with pytest.raises(Exception, match="CIFAR-100 not found"):
        cli.main(["train", "--preset", "quick", "--results-dir", str(results), "--debug"])


@pytest.mark.parametrize("argv, message", [
    (["--option", "temperature=true"], "option 'temperature': not a number: True"),
    (["--option", "temperature=abc"], "option 'temperature': not a number: 'abc'"),
    (["--option", "weight=Infinity"], "option 'weight': must be a finite number, got inf"),
    (["--option", "weight=NaN"], "must be a finite number, got nan"),
])
def test_bad_option_values_are_named(tmp_path, capsys, argv, message):
    code, _, err = _main(capsys, "train", "--preset", "smoke", "--method", "ckd", "--dry-run",
                         "--results-dir", str(tmp_path), *argv)
    assert code == 1 and message in err and "Traceback" not in err


def test_bad_milestones_name_the_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--preset", "smoke", "--milestones", "a,b"])
    assert exit_info.value.code == 2
    assert "comma-separated whole epochs, e.g. 150,180,210; got 'a,b'" in capsys.readouterr().err


def test_one_setting_one_run_id():
    default = make_config("smoke", method="ckd")
    assert default.method_options["temperature"] == 1.0
    for value in (1, 1.0):
        assert make_config("smoke", method="ckd", method_options={"temperature": value}).run_id == default.run_id
    assert make_config("smoke", method="dcd", method_options={"embed_dim": 128.0}).run_id == \
        make_config("smoke", method="dcd").run_id
    with pytest.raises(MethodError, match="not a whole number"):
        make_config("smoke", method="dcd", method_options={"embed_dim": 12.5})


def test_relative_data_dir_is_found_from_the_notebooks_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO / "notebooks")
    monkeypatch.setenv("CKD_DATA_DIR", "ckd_study")  # exists relative to the repo root, not to notebooks/
    assert default_data_root() == REPO / "ckd_study"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckd_study").mkdir()
    assert default_data_root() == Path("ckd_study")  # the current directory wins where it exists


def test_results_dir_and_debug_work_after_the_command(tmp_path, capsys):
    code, out, _ = _main(capsys, "list", "--results-dir", str(tmp_path / "empty"))
    assert code == 0 and str(tmp_path / "empty") in out
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--results-dir" in help_text and "--debug" in help_text and "--precision" in help_text


def test_finished_and_resumed_runs_say_so(tmp_path, capsys):
    results = str(tmp_path / "results")
    argv = ["train", "--preset", "smoke", "--epochs", "1", "--milestones", "1", "--quiet", "--results-dir", results]
    code, out, _ = _main(capsys, *argv)
    assert code == 0 and "already finished" not in out
    code, out, _ = _main(capsys, *argv)
    assert code == 0 and "already finished: read from the store, not trained again" in out


def test_lock_message_names_the_wait_flag(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunInProgressError, match="--wait"):
            with run_lock(tmp_path / "run"):
                pass


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cli.report_errors(interrupted, debug=False) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted; rerun the same command to resume from the last saved epoch"


def test_closed_output_pipe_is_not_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "ckd_study", "methods"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader left, as `| head` does
    err = proc.stderr.read().decode()
    # a hang guard only: a cold first import of torch beside a training run has taken minutes
    assert proc.wait(timeout=600) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_notebooks_open_with_the_project_kernel():
    import json

    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        spec = json.loads(path.read_text())["metadata"]["kernelspec"]
        assert spec == {"display_name": "Python (ckd-study)", "language": "python", "name": "ckd-study"}, path.name
    makefile = (REPO / "Makefile").read_text()
    assert '--name $(KERNEL) --display-name "Python (ckd-study)"' in makefile and "KERNEL ?= ckd-study" in makefile


def test_listings_say_what_sets_runs_apart(tmp_path, capsys):
    from ckd_study.config import setting_label, teacher_config
    from ckd_study.study import plan

    assert setting_label(make_config("quick", method="ckd")) == ""
    assert setting_label(teacher_config("quick")) == "(teacher recipe)"
    assert setting_label(make_config("quick", method="ckd", batch_size=128, lr=0.1,
                                     method_options={"terms": ["inter"]})) == "batch_size=128 lr=0.1 terms=[inter]"
    frame = plan("quick", tmp_path / "results")
    batch = frame[frame["notebook"] == "03_ablation_batch_size"]
    assert batch["setting"].str.contains("batch_size=").sum() >= 4  # the batch-size runs no longer all read '{}'
    inter = frame[frame["setting"] == "terms=[inter]"]
    assert len(inter) == 1 and inter["method"].iloc[0] == "ckd"


def test_bar_charts_start_at_zero(monkeypatch, tmp_path):
    import pandas as pd

    from ckd_study import analysis

    captured = {}
    monkeypatch.setattr(analysis, "save_figure", lambda fig, stem: captured.setdefault("fig", fig) and {})
    data = pd.DataFrame({"method": ["CE", "DKD"], "top1": [12.5, 20.5], "std": [0.4, 0.2]})
    analysis.plot_bars(data, label="method", value="top1", err="std", path_stem=tmp_path / "bars",
                       title="t", xlabel="x", reference={"KD": 15.2})
    lo, hi = captured["fig"].axes[0].get_xlim()
    assert lo == 0.0 and hi >= 20.7


def test_make_help_prints_no_make_syntax():
    proc = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "$(" not in proc.stdout and "reports/<preset>/" in proc.stdout


def test_figure_grids_have_no_empty_panels_and_one_seed_has_no_error_bars(monkeypatch, tmp_path):
    import numpy as np
    import pandas as pd
    from matplotlib.container import ErrorbarContainer

    from ckd_study import analysis

    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda fig, stem: figures.append(fig) or {})
    matrices = {f"m{i}": np.random.default_rng(i).random((5, 5)) for i in range(6)}
    analysis.plot_heatmaps(matrices, tmp_path / "h", title="t")
    panels = [ax for ax in figures[-1].axes if ax.images]
    assert len(panels) == 6 and all(ax.get_visible() for ax in figures[-1].axes)
    assert analysis._grid(6) == (2, 3) and analysis._grid(4) == (1, 4) and analysis._grid(7) == (2, 4)
    one_seed = pd.DataFrame({"t": [0.5, 1.0], "top1": [10.0, 12.0], "std": [float("nan")] * 2, "m": ["ckd"] * 2})
    analysis.plot_lines(one_seed, x="t", y="top1", hue="m", yerr="std", path_stem=tmp_path / "l", title="t",
                        xlabel="x", ylabel="y")
    assert not any(isinstance(c, ErrorbarContainer) for c in figures[-1].axes[0].containers)
    two_seeds = one_seed.assign(std=[0.3, 0.2])
    analysis.plot_lines(two_seeds, x="t", y="top1", hue="m", yerr="std", path_stem=tmp_path / "l2", title="t",
                        xlabel="x", ylabel="y")
    assert any(isinstance(c, ErrorbarContainer) for c in figures[-1].axes[0].containers)


def test_the_quick_teacher_weights_are_committed():
    """The README's example trains a quick student from a fresh clone: the quick teacher's weights must be there
    (and match the sha256 its summary recorded)."""
    from ckd_study.config import teacher_config

    store = RunStore(REPO / "results")
    config = teacher_config("quick")
    if store.summary(config.run_id) is None:
        pytest.skip("no committed quick teacher run")
    teacher = store.load_model(config.run_id)
    assert teacher.num_classes == 100 and type(teacher).__name__ == "CifarResNet"


def test_one_command_line_for_runs_and_the_study(tmp_path, capsys, monkeypatch):
    """`python -m ckd_study` takes the study's commands too (plan, figures, campaign, ...), with the same output
    and exit codes as `python -m ckd_study.study`, and lists them in its help."""
    from ckd_study.study import main as study_main

    monkeypatch.setenv("CKD_DATA_DIR", str(tmp_path / "nowhere"))
    results = str(tmp_path / "results")
    code, out, _ = _main(capsys, "plan", "--preset", "smoke", "--results-dir", results)
    assert code == study_main(["plan", "--preset", "smoke", "--results-dir", results]) == 0
    assert out == capsys.readouterr().out and "distinct runs:" in out
    code, _, err = _main(capsys, "campaign", "--preset", "smoke", "--pair", "resnet14", "--results-dir", results)
    assert code == 1 and "resnet14" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in cli.STUDY_COMMANDS) and "train" in listed
