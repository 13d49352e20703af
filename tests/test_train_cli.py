"""`pipeline train-head` and `pipeline evaluate` from the command line: outputs, and errors that name the flag."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import feature_cache, separable_videos
from typer.testing import CliRunner

from pipeline.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, app
from pipeline.train_head.checkpoint import FORMAT_NAME

runner = CliRunner()
TINY = [
    "--hidden",
    "16",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--clip-len",
    "5",
    "--no-plots",
    "--threads",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return feature_cache(tmp_path_factory.mktemp("cli") / "c.h5", separable_videos(per_class=6))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def test_help_is_instant_and_lists_the_stage_two_commands():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    for command in ("train-head", "evaluate", "predict"):
        assert command in result.stdout
    probe = "import sys, pipeline, pipeline.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0
    result = invoke("train-head", "--help")
    for flag in (
        "--head",
        "--hidden",
        "--clip-len",
        "--eval-clips",
        "--val-fraction",
        "--group-regex",
        "--train-list",
        "--memory",
        "--patience",
        "--label-smoothing",
        "--class-weights",
    ):
        assert flag in result.output


def test_train_then_evaluate(cache, tmp_path):
    result = invoke("train-head", cache, "--out", tmp_path / "run", "--head", "gru", *TINY)
    assert result.exit_code == EXIT_OK, result.output
    assert "gru: val top-1" in result.output and str(tmp_path / "run") in result.output
    assert {"best.pt", "last.pt", "metrics.csv", "summary.json", "config.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }
    result = invoke("evaluate", tmp_path / "run" / "best.pt", cache, "--out", tmp_path / "eval", "--eval-clips", "0")
    assert result.exit_code == EXIT_OK, result.output
    assert "top-1" in result.output and "class2" in result.output
    scored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scored["videos"] + scored["trained_on"]["videos"] == 18  # held-out videos scored, training ones apart
    result = invoke("evaluate", tmp_path / "run" / "best.pt", cache, "--json", "--quiet")
    assert result.exit_code == EXIT_OK
    metrics = json.loads(result.stdout)
    assert metrics["classes"] == ["class0", "class1", "class2"] and len(metrics["confusion_matrix"]) == 3


def test_progress_in_a_log_is_a_few_lines_ending_with_the_last_epoch(cache, tmp_path):
    """stderr to a file or a CI console (not a terminal): the epoch bar is not redrawn ten times a second."""
    args = [*TINY[: TINY.index("--epochs")], "--epochs", "80", "--patience", "0", *TINY[TINY.index("--batch-size") :]]
    args.remove("--quiet")
    command = [sys.executable, "-m", "pipeline", "train-head", str(cache), "--out", str(tmp_path / "run"), *args]
    t = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    assert result.returncode == EXIT_OK, result.stderr
    draws = re.findall(r"(\d+)/80 \[", result.stderr)  # each drawing of the bar: "lstm: 100%|...| 80/80 [00:02<..."
    assert draws and draws[-1] == "80", result.stderr  # the last state is written when the bar closes
    assert len(draws) <= 3, f"{len(draws)} drawings of the bar in a {seconds:.1f} s run"


def test_evaluate_refuses_other_features_and_unsafe_checkpoints(cache, tmp_path):
    assert invoke("train-head", cache, "--out", tmp_path / "run", *TINY).exit_code == EXIT_OK
    other = feature_cache(tmp_path / "other.h5", separable_videos(per_class=2), backbone="efficientnet_b0")
    result = invoke("evaluate", tmp_path / "run" / "best.pt", other)
    assert result.exit_code == EXIT_ERROR
    assert "efficientnet_b0" in result.output and "synthetic" in result.output and "other.h5" in result.output

    class Payload:
        def __reduce__(self):
            return (print, ("this must never print",))

    torch.save({"format": FORMAT_NAME, "payload": Payload()}, tmp_path / "evil.pt")
    result = invoke("evaluate", tmp_path / "evil.pt", cache)
    assert result.exit_code == EXIT_ERROR and "refusing" in result.output
    assert "this must never print" not in result.output


def _lists(tmp_path, train: list[str], val: list[str]):
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(val) + "\n")
    return ["--train-list", tmp_path / "train.txt", "--val-list", tmp_path / "val.txt"]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--head", "transformer"], "--head"),
        (["--sampling", "random"], "--sampling"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--memory", "gpu"], "--memory"),
        (["--dropout", "1"], "--dropout"),
        (["--group-regex", "(unclosed"], "--group-regex"),
        (["--split", "cache"], "--split cache"),  # the cache records no split column
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(cache, tmp_path, args, flag):
    result = invoke("train-head", cache, "--out", tmp_path / "run", *TINY, *args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert flag in result.output


def test_an_empty_split_is_refused(cache, tmp_path):
    lists = _lists(tmp_path, [f"class{c}/vid_{k:03d}.mp4" for c in range(3) for k in range(6)], ["nothing/here.mp4"])
    result = invoke("train-head", cache, "--out", tmp_path / "run", *TINY, *lists)
    assert result.exit_code == EXIT_USAGE and "val split is empty" in result.output


def test_a_class_missing_from_train_is_refused(cache, tmp_path):
    train = [f"class{c}/vid_{k:03d}.mp4" for c in (0, 1) for k in range(4)]
    val = [f"class{c}/vid_{k:03d}.mp4" for c in (0, 1, 2) for k in (4, 5)]
    result = invoke("train-head", cache, "--out", tmp_path / "run", *TINY, *_lists(tmp_path, train, val))
    assert result.exit_code == EXIT_USAGE
    assert "missing from the train split: class2" in result.output


def test_a_missing_cache_is_an_error(tmp_path):
    result = invoke("train-head", tmp_path / "nope.h5", "--out", tmp_path / "run")
    assert result.exit_code == EXIT_ERROR and "nope.h5" in result.output


def test_a_run_folder_is_not_replaced_without_overwrite(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(classes=2, per_class=6))
    out = tmp_path / "run"
    args = [
        "train-head",
        str(cache),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--batch-size",
        "4",
        "--clip-len",
        "4",
        "--threads",
        "2",
        "--quiet",
    ]
    assert runner.invoke(app, args + ["--plots"]).exit_code == 0
    first = (out / "best.pt").read_bytes()
    assert (out / "curves.png").exists() or not _has_matplotlib()
    again = runner.invoke(app, args + ["--seed", "1"])
    assert again.exit_code == 1
    assert f"{out} already holds a run" in again.output and "--overwrite" in again.output
    assert (out / "best.pt").read_bytes() == first  # nothing of the first run was touched
    replaced = runner.invoke(app, args + ["--seed", "1", "--overwrite", "--no-plots"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "best.pt").read_bytes() != first
    assert not (out / "curves.png").exists()  # no file of the old run is left to be taken for the new one's


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_evaluate_keeps_the_heads_training_videos_apart(tmp_path):
    cache = feature_cache(tmp_path / "c.h5", separable_videos(classes=2, per_class=10))
    run = tmp_path / "run"
    assert (
        runner.invoke(
            app,
            [
                "train-head",
                str(cache),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--hidden",
                "8",
                "--clip-len",
                "4",
                "--threads",
                "2",
                "--quiet",
                "--no-plots",
            ],
        ).exit_code
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    split = (run / "split.csv").read_text()
    n_train = split.count(",train")
    assert n_train > 0 and summary["videos"] == 20 - n_train
    result = runner.invoke(app, ["evaluate", str(run / "best.pt"), str(cache), "--json", "--quiet"])
    report = json.loads(result.output)
    # the score is the held-out videos' (the run's own val score), the training videos are reported apart
    assert report["videos"] == summary["videos"] and report["top1"] == summary["top1"]
    assert report["trained_on"]["videos"] == n_train
    text = runner.invoke(app, ["evaluate", str(run / "best.pt"), str(cache), "--quiet"]).output
    assert "held-out videos" in text and f"{n_train} videos the head was trained on" in text


def test_zero_flag_commands_pick_their_own_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    feature_cache(tmp_path / "clips.h5", separable_videos(classes=2, per_class=6))
    args = ["--epochs", "1", "--hidden", "8", "--threads", "2", "--quiet", "--no-plots"]
    first = runner.invoke(app, ["train-head", "clips.h5", *args])
    second = runner.invoke(app, ["train-head", "clips.h5", *args])
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    # a new run never lands in an old one's folder
    assert (tmp_path / "runs" / "clips-lstm" / "best.pt").exists() and "runs/clips-lstm-2" in second.output
    assert (tmp_path / "runs" / "clips-lstm-2" / "best.pt").exists()
