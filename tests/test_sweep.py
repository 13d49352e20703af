"""`pipeline sweep`: search spaces, grid/TPE/random through Optuna, resume, cooperating workers, the leaderboard and
best.pt, PCA-reduced features folded into the checkpoints, stacked trials. The trial loop (sweep/trials.py) and the
refit (sweep/refit.py) have files of their own."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FAST,
    SWEEP_QUICK,
    SWEEP_TRIAL,
    feature_cache,
    make_video,
    metric_rows,
    separable_videos,
    study_trials,
)
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_OK, EXIT_USAGE, app
from pipeline.data.sequences import segment_frames
from pipeline.data.splits import random_split
from pipeline.sweep.run import SweepError
from pipeline.sweep.space import PARAM_TYPES, SpaceError, parse_space
from pipeline.train_head.checkpoint import HeadCheckpoint, load_checkpoint
from pipeline.train_head.model import HeadDims, build_head

runner = CliRunner()
TRIAL, QUICK = SWEEP_TRIAL, SWEEP_QUICK


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return feature_cache(tmp_path_factory.mktemp("sweep") / "c.h5", separable_videos(per_class=6))


def val_list(cache: Path, path: Path) -> Path:
    """The val videos of the default split (random 0.2, seed 0), as a list file for `evaluate --list`."""
    c = pipeline.open_cache(cache)
    split = random_split(c.labels(), 0.2, 0)
    path.write_text("\n".join(split.val) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------- spaces
def test_space_file_and_inline_params(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "head: [lstm, gru, meanpool]\n"
        "hidden: [32, 64]\n"
        "lr: {low: 1e-4, high: 1.0e-2, log: true}\n"  # YAML reads 1e-4 as text: still a number here
        "layers: {low: 1, high: 3}\n"
        "dropout: {low: 0.0, high: 0.4, step: 0.1}\n"
        "clip_len: [8, null]\n"
        "class_weights: [true, false]\n"
        "epochs: 5\n"
    )
    space = parse_space(path, ["hidden=16,128", "weight-decay=0:0.1:0.05", "label_smoothing=0.1"])
    p = space.params
    assert p["head"].values == ("lstm", "gru", "meanpool") and p["hidden"].values == (16, 128)  # inline wins
    assert (p["lr"].kind, p["lr"].low, p["lr"].high, p["lr"].log) == ("float", 1e-4, 1e-2, True)
    assert (p["layers"].kind, p["layers"].low, p["layers"].high) == ("int", 1, 3)
    assert p["clip_len"].values == (8, None) and p["class_weights"].values == (True, False)
    assert space.fixed == {"epochs": 5, "label_smoothing": 0.1}
    assert p["dropout"].grid() == [0.0, 0.1, 0.2, 0.3, 0.4] and p["weight_decay"].grid() == [0.0, 0.05, 0.1]
    assert p["layers"].grid() == [1, 2, 3]
    with pytest.raises(SpaceError, match="lr: a log range has no grid"):
        space.grid()
    # the recorded (YAML) form reads back as the same space
    assert parse_space(space.to_dict()) == space
    # every train-head hyperparameter can be searched; the split and runtime settings cannot
    assert {
        "head",
        "hidden",
        "layers",
        "dropout",
        "activation",
        "sampling",
        "clip_len",
        "clip_stride",
        "eval_clips",
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "patience",
        "class_weights",
        "label_smoothing",
        "seed",
        "stages",
        "smoothing",
    } == set(PARAM_TYPES)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("hiden: [1, 2]", "unknown parameter 'hiden'; valid parameters: head, hidden, layers"),
        ("val_fraction: [0.1, 0.2]", "val_fraction is the same for every trial.*--val-fraction"),
        ("threads: [1, 2]", "threads is not a hyperparameter"),
        ("lr: {low: 0.01, high: 0.001}", "lr: the range's low \\(0.01\\) must be below its high"),
        ("lr: {low: 0, high: 0.1, log: true}", "lr: a log range needs low > 0"),
        ("lr: {low: 0.001, high: 0.1, stepp: 0.01}", "unknown range key 'stepp'"),
        ("hidden: {low: 8, high: 64, step: 0.5}", "hidden takes whole numbers, got 0.5"),
        ("hidden: [64, big]", "hidden takes whole numbers or none, got 'big'"),
        ("head: {low: 1, high: 2}", "head takes choices"),
        ("head: [lstm, transformer]", "--head must be one of"),
        ("dropout: [0.1, 1.5]", "--dropout must be in \\[0, 1\\), got 1.5"),
        ("hidden: [64, 64]", "the choice 64 is listed twice"),
        ("hidden: []", "empty list of choices"),
        ("class_weights: [true, maybe]", "class_weights takes true or false"),
        ("epochs: 3", "nothing varies"),
        ("[1, 2]", "expected a mapping of parameter names"),
    ],
)
def test_bad_spaces_are_refused_naming_the_file_and_the_parameter(tmp_path, entry, message):
    path = tmp_path / "space.yaml"
    path.write_text(entry + "\n")
    with pytest.raises(SpaceError, match=message) as e:
        parse_space(path)
    assert str(path) in str(e.value)


def test_bad_inline_params_and_flags_exit_with_usage_errors(cache, tmp_path):
    cases = [
        (["--param", "hidden=64"], "nothing varies"),
        (["--param", "lr=1e-2:1e-4:log"], "--param lr=1e-2:1e-4:log: lr: the range's low"),
        (["--param", "hidden:64"], "--param hidden:64: expected NAME=VALUES"),
        (["--param", "layers=1,2", "--space", str(tmp_path / "missing.yaml")], "missing.yaml: no such file"),
        (["--param", "lr=1e-4:1e-2:log", "--strategy", "grid"], "lr: a log range has no grid"),
        (["--param", "layers=1,2", "--strategy", "bayes"], "--strategy must be one of tpe, random, grid"),
        (["--param", "layers=1,2", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
        (["--param", "hidden"], "e.g. --param hidden=64,128,256 (choices)"),
        (["--param", "size=1,2"], "unknown parameter 'size'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["sweep", str(cache), "--out", str(tmp_path / "s"), *args], terminal_width=200)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "s" / "trials").exists()
    assert "docs/sweep.md" in " ".join(result.output.split())


def test_without_a_space_the_sweep_searches_the_documented_default(cache, tmp_path):
    out = tmp_path / "default"
    # a time budget spent while reading the cache: the space is shown and recorded, no trial runs
    result = runner.invoke(
        app, ["sweep", str(cache), "--out", str(out), "--trials", "20", "--timeout", "1e-9", "-q"], terminal_width=200
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "no --space or --param: searching the default space (docs/sweep.md)" in result.output
    for line in (
        "head in {lstm, gru, bilstm, attention, meanpool}",
        "hidden in {128, 256, 512}",
        "lr in {0.0003, 0.001, 0.003}",
        "dropout in [0, 0.5], step 0.1 (float)",
        "clip_len in {8, 16, 32, none}",
    ):
        assert line in result.output
    recorded = json.loads((out / "sweep.json").read_text())["space"]
    assert set(recorded) == {"head", "hidden", "lr", "dropout", "clip_len"} and recorded["clip_len"][-1] is None


def test_the_command_shows_no_third_party_warnings(cache, tmp_path):
    # two settings and three trials: the third draw repeats one (told, not trained), and Optuna's importance
    # evaluator warns about trials that tie
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "sweep",
            str(cache),
            "--out",
            str(tmp_path / "s"),
            "--trials",
            "3",
            "--param",
            "hidden=8,16",
            "--param",
            "epochs=2",
            "--threads",
            "2",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert "2 trials (2 complete)" in result.stdout
    assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------ grid, results
def test_grid_runs_every_combination_once_and_writes_the_leaderboard(cache, tmp_path):
    out = tmp_path / "grid"
    result = pipeline.sweep(
        cache,
        out,
        params=["hidden=8,16", "lr=0.001,0.01", "head=gru,meanpool", *TRIAL],
        strategy="grid",
        pruner="none",
        **{**QUICK, "plots": True},
    )
    combos = {(r["params"]["hidden"], r["params"]["lr"], r["params"]["head"]) for r in result.rows}
    assert len(result.rows) == 8 and combos == set(itertools.product([8, 16], [0.001, 0.01], ["gru", "meanpool"]))
    assert result.trials_here == 8 and result.counts() == {"complete": 8}

    # the leaderboard: best first, each row what its run folder says
    tops = [r["top1"] for r in result.rows]
    assert tops == sorted(tops, reverse=True)
    for r in result.rows:
        run = Path(r["run"])
        assert run == out / "trials" / f"{r['trial']:04d}"
        summary = json.loads((run / "summary.json").read_text())
        config = json.loads((run / "config.json").read_text())["train"]
        assert r["top1"] == summary["top1"] and r["val_loss"] == pytest.approx(summary["val_loss"])
        assert r["epochs_run"] == summary["epochs_run"] == 3 == len((run / "metrics.csv").read_text().split()) - 1
        assert {k: config[k] for k in ("hidden", "lr", "head", "epochs", "batch_size", "clip_len")} == {
            **r["params"],
            "epochs": 3,
            "batch_size": 8,
            "clip_len": 5,
        }
        assert (
            r["seconds"] > 0 and r["state"] == "complete" and {"best.pt", "last.pt"} <= {p.name for p in run.iterdir()}
        )
    rows = list(csv.DictReader((out / "leaderboard.csv").read_text().splitlines()))
    assert [int(r["trial"]) for r in rows] == [r["trial"] for r in result.rows]
    assert {"rank", "trial", "state", "top1", "epochs_run", "seconds", "hidden", "lr", "head"} <= set(rows[0])
    assert float(rows[0]["top1"]) == result.best["top1"] and rows[0]["hidden"] == str(result.best["params"]["hidden"])
    board = json.loads((out / "leaderboard.json").read_text())
    assert [r["trial"] for r in board["rows"]] == [r["trial"] for r in result.rows]
    assert board["space"]["hidden"] == [8, 16] and board["space"]["epochs"] == 3

    # best.pt is the best trial's best checkpoint; search.png shows the search
    best = load_checkpoint(out / "best.pt")
    assert best.config["train"]["hidden"] == result.best["params"]["hidden"]
    assert best.metrics["top1"] == result.best["top1"] == max(tops)
    assert (out / "search.png").stat().st_size > 0 and result.plot == out / "search.png"
    table = result.table()
    assert table.splitlines()[0].split()[:4] == ["#", "trial", "state", "top-1"] and len(table.splitlines()) == 9


# ---------------------------------------------------------------------------------------------- studies, workers
def test_resume_continues_the_study(cache, tmp_path):
    out = tmp_path / "resumed"
    params = ["hidden=8:32", "lr=1e-3:3e-2:log", *TRIAL]
    first = pipeline.sweep(cache, out, params=params, trials=2, strategy="random", **QUICK)
    assert [r["trial"] for r in sorted(first.rows, key=lambda r: r["trial"])] == [0, 1]
    with pytest.raises(SweepError, match="already has trials: pass --resume"):
        pipeline.sweep(cache, out, params=params, trials=4, strategy="random", **QUICK)
    with pytest.raises(SweepError, match="space"):
        pipeline.sweep(cache, out, params=["hidden=8:64", *params[1:]], trials=4, resume=True, **QUICK)
    # --resume alone takes the space recorded in the study
    second = pipeline.sweep(cache, out, trials=4, strategy="random", resume=True, **QUICK)
    assert second.trials_here == 2 and len(second.rows) == 4
    before = {r["trial"]: (r["params"], r["top1"]) for r in first.rows}
    after = {r["trial"]: (r["params"], r["top1"]) for r in second.rows}
    assert {k: after[k] for k in before} == before and sorted(after) == [0, 1, 2, 3]
    assert after[2][0] != after[0][0] and after[3][0] != after[1][0]  # new draws, not the first run's again
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002", "0003"]
    # a finished study runs nothing more
    third = pipeline.sweep(cache, out, trials=4, resume=True, **QUICK)
    assert third.trials_here == 0 and len(third.rows) == 4


def _worker(cache: Path, out: Path, storage: str, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "sweep",
        str(cache),
        "--out",
        str(out),
        "--storage",
        storage,
        "--study",
        "shared",
        "--resume",
        "--threads",
        "1",
        "--no-plots",
        "-q",
        "--param",
        "hidden=8:64",
        "--param",
        "lr=1e-3:3e-2:log",
        "--param",
        "head=gru,lstm",
        *extra,
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_worker_processes_share_one_study(cache, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # unpruned trials of about a second each: both workers are up before the work is done
    extra = [
        "--trials",
        "4",
        "--pruner",
        "none",
        "--param",
        "epochs=30",
        "--param",
        "batch_size=4",
        "--param",
        "clip_len=5",
    ]
    workers = [_worker(cache, tmp_path / "out", storage, *extra) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    import optuna

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert sorted(t.number for t in trials if not t.user_attrs.get("surplus")) == list(range(4)), outputs
    assert all(t.state.name == "COMPLETE" for t in trials if not t.user_attrs.get("surplus"))
    by_worker = {}
    for t in trials:
        if not t.user_attrs.get("surplus"):
            by_worker.setdefault(t.user_attrs["worker"], []).append(t.number)
    assert len(by_worker) == 2, by_worker  # both took part, each trial ran once
    assert sorted(n for ns in by_worker.values() for n in ns) == list(range(4))
    assert {p.name for p in (tmp_path / "out" / "trials").iterdir()} == {f"{n:04d}" for n in range(4)}
    for text in outputs:  # each worker prints the whole study's leaderboard at its end
        assert "sweep shared: best val top-1" in text and "4 trials" in text, text


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_running_trial(cache, tmp_path):
    storage = f"sqlite:///{tmp_path / 'kill.db'}"
    out = tmp_path / "out"
    endless = ["--param", "epochs=100000", "--param", "batch_size=8", "--param", "clip_len=5"]
    worker = _worker(cache, out, storage, "--trials", "1", *endless)
    metrics = out / "trials" / "0000" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().split()) > 2):
        if worker.poll() is not None:
            pytest.fail(f"the worker stopped before training:\n{worker.communicate()[0]}")
        assert time.time() < deadline, "the worker never started training"
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(3.2)  # its last heartbeat (stored to the second) is now older than the grace period below
    # The next worker finds the trial silent (short heartbeats here), fails it and retries its settings; the
    # retry runs until the time budget stops it.
    result = pipeline.sweep(
        cache,
        out,
        storage=storage,
        study="shared",
        resume=True,
        trials=1,
        timeout=1.5,
        heartbeat=1,
        grace=2,
        params=["hidden=8:64", "lr=1e-3:3e-2:log", "head=gru,lstm", *endless[1::2]],
        **QUICK,
    )
    import optuna

    killed, retry = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert killed.state.name == "FAIL" and "error" not in killed.user_attrs
    assert retry.system_attrs.get("failed_trial") == 0 and retry.params == killed.params
    assert retry.state.name == "PRUNED" and retry.user_attrs["stopped"] == "timeout"
    assert retry.user_attrs["worker"].endswith(f":{os.getpid()}") and result.trials_here == 1
    assert result.counts() == {"failed": 1, "pruned": 1} and result.best["trial"] == 1


# ------------------------------------------------------------------------------------------------ best.pt, CLI
def test_cli_sweep_and_its_best_checkpoint_in_evaluate(cache, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(
        app,
        [
            "sweep",
            str(cache),
            "--out",
            str(out),
            "--param",
            "hidden=8,16",
            "--param",
            "head=meanpool,gru",
            "--param",
            "lr=0.01",
            "--strategy",
            "grid",
            "--pruner",
            "none",
            "--threads",
            "2",
            "--no-plots",
            "-q",
            *[a for p in TRIAL for a in ("--param", p)],
        ],
        terminal_width=200,
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "sweep cli: best val top-1" in result.output and "4 trials (4 complete)" in result.output
    best = json.loads((out / "best.json").read_text())
    lines = [line.split() for line in result.output.splitlines()]
    header = lines.index(["#", "trial", "state", "top-1", "epochs", "sec", "hidden", "head"])
    assert lines[header + 1][:4] == ["1", str(best["trial"]), "complete", f"{best['top1']:.1%}"]
    listed = val_list(cache, tmp_path / "val.txt")
    result = runner.invoke(app, ["evaluate", str(out / "best.pt"), str(cache), "--list", str(listed), "--json", "-q"])
    assert result.exit_code == EXIT_OK, result.output
    metrics = json.loads(result.stdout)
    assert metrics["top1"] == best["top1"] and metrics["loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_help_lists_the_sweep_flags_and_stays_light():
    result = runner.invoke(app, ["sweep", "--help"], terminal_width=200)
    for flag in (
        "--space",
        "--param",
        "--trials",
        "--strategy",
        "--pruner",
        "--timeout",
        "--reduce-dim",
        "--refit",
        "--stack",
        "--storage",
        "--study",
        "--resume",
        "--val-fraction",
    ):
        assert flag in result.output
    text = " ".join(line.strip("│ ") for line in result.output.splitlines())
    for shown in (
        "[default: every combination (grid), else 20]",
        "[default: 3 with --reduce-dim]",
        "[default: all CPU cores (decode and reader workers use one each)]",
    ):
        assert shown in " ".join(text.split()), shown  # written defaults survive the help's markup
    probe = (
        "import sys, pipeline, pipeline.cli; pipeline.SweepConfig; "
        "assert not {'torch', 'optuna', 'yaml'} & set(sys.modules), 'heavy import'"
    )
    assert subprocess.run([sys.executable, "-c", probe], check=False, timeout=60).returncode == 0


# ------------------------------------------------------------------------------------------------------ reduction
@pytest.mark.parametrize("head", ["lstm", "meanpool", "attention"])
def test_folding_the_pca_gives_the_same_logits_on_the_full_features(head):
    from pipeline.data.sequences import RamStore
    from pipeline.data.synthetic import synthetic_spec
    from pipeline.sweep.reduce import fit_pca, fold_reduction, reduce_store

    torch.manual_seed(0)
    rows = (torch.randn(3000, 48) @ torch.randn(48, 48) + 1.0).numpy().astype(np.float16)
    store = RamStore([f"v{i}" for i in range(60)], rows, np.full(60, 50))
    reduction = fit_pca(store, np.arange(40), 6)  # fit on the first 40 videos only
    assert reduction.components.shape == (48, 6) and 0 < reduction.explained < 1
    reduced = reduce_store(store, reduction)
    # z = ((x - mean) / scale) P with P orthonormal: the standardised rows' top directions
    standardised = (torch.from_numpy(rows[:50].astype(np.float64)) - reduction.mean) / reduction.scale
    assert torch.allclose(reduction.components.T @ reduction.components, torch.eye(6, dtype=torch.float64), atol=1e-5)
    torch.testing.assert_close(reduced.data[:50], (standardised @ reduction.components).float(), rtol=1e-4, atol=1e-4)
    dims = HeadDims(head=head, in_dim=6, num_classes=3, hidden=32, layers=1, dropout=0.2, activation="gelu")
    small = build_head(dims)
    small.proj[0].set_stats(reduced.data.mean(0), reduced.data.std(0))
    ckpt = HeadCheckpoint(
        dims=dims,
        state_dict=small.state_dict(),
        classes=["a", "b", "c"],
        feature_spec=synthetic_spec(48),
        feature_dtype="float16",
        clip_len=None,
        clip_stride=1,
        eval_clips=0,
    )
    folded = fold_reduction(ckpt, reduction)
    assert folded.dims.in_dim == 48 and folded.config["reduction"]["dim"] == 6
    x, lengths = torch.from_numpy(rows[:100].astype(np.float32)).view(2, 50, 48), torch.tensor([50, 37])
    with torch.inference_mode():
        want = small.eval()(reduced.data[:100].view(2, 50, 6), lengths)
        got = folded.model()(x, lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_reduced_sweep_checkpoints_take_the_full_features_in_evaluate_and_predict(tmp_path):
    videos = tmp_path / "videos"
    for c, shift in (("a", 0), ("b", 40)):
        for k in range(4):
            make_video(videos / c / f"{k}.avi", 3, offset=shift + 7 * k)
    assert pipeline.extract_videos([videos], tmp_path / "c.h5", **FAST).ok
    cache = tmp_path / "c.h5"
    dim = pipeline.open_cache(cache).spec.dim
    out = tmp_path / "reduced"
    result = pipeline.sweep(
        cache,
        out,
        params=["head=meanpool,gru", "hidden=8", "epochs=3", "batch_size=4", "clip_len=2", "lr=0.01"],
        strategy="grid",
        reduce_dim=4,
        pruner="none",
        refit=0,
        **QUICK,
    )
    assert result.counts() == {"complete": 2} and result.refit is None
    assert json.loads((out / "sweep.json").read_text())["data"]["reduce_dim"] == 4
    best = load_checkpoint(out / "best.pt")
    assert best.dims.in_dim == dim and best.config["reduction"]["dim"] == 4
    assert best.config["reduction"]["from_dim"] == dim and best.feature_spec == pipeline.open_cache(cache).spec
    run = Path(result.best["run"])
    assert json.loads((run / "config.json").read_text())["reduction"]["dim"] == 4
    # evaluate (full features, folded PCA) reproduces what the trial measured on the reduced rows
    report = pipeline.evaluate(out / "best.pt", cache, keys_list=val_list(cache, tmp_path / "val.txt"), progress=False)
    summary = json.loads((run / "summary.json").read_text())
    assert report.metrics["top1"] == summary["top1"]
    assert report.metrics["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    # predict extracts new copies of the videos and classifies them with the folded head
    paths = [videos / "a" / "0.avi", videos / "b" / "3.avi"]
    preds = pipeline.predict(
        out / "best.pt", paths, tmp_path / "p.csv", cache=tmp_path / "pred.h5", workers=0, progress=False
    )
    model, c = best.model(), pipeline.open_cache(cache)
    assert best.sampling == "segments" and best.clip_len == 2  # scored on the centres of 2 segments
    for p, key in zip(preds.predictions, ["a/0.avi", "b/3.avi"], strict=True):
        rows = segment_frames(np.array([c.num_frames(key)]), 2, 1)[0]
        x = torch.from_numpy(c.features(key)[rows].astype(np.float32))[None]
        with torch.inference_mode():
            probs = torch.softmax(model(x, torch.tensor([x.shape[1]])), 1)[0]
        label, prob = p.top[0]
        assert label == best.classes[int(probs.argmax())] and prob == pytest.approx(float(probs.max()), abs=1e-5)


# ------------------------------------------------------------------------------------------------ stacked trials
def test_stacked_heads_train_as_they_would_alone(cache, tmp_path):
    from pipeline.config import Runtime, TrainConfig
    from pipeline.data.labelled import load_labelled
    from pipeline.sweep.stack import stack_key, train_stack

    shared = {
        "head": "meanpool",
        "hidden": 16,
        "epochs": 4,
        "batch_size": 8,
        "clip_len": 5,
        "patience": 0,
        "plots": False,
        "overwrite": True,
        "runtime": Runtime(progress=False, threads=2),
    }
    own = [
        {"lr": 1e-3, "dropout": 0.3},
        {"lr": 1e-2, "dropout": 0.0, "label_smoothing": 0.1},
        {"lr": 3e-2, "dropout": 0.5, "weight_decay": 0.1},
    ]
    configs = [TrainConfig(out=tmp_path / f"stacked{i}", **shared, **o) for i, o in enumerate(own)]
    assert len({stack_key(c) for c in configs}) == 1
    assert stack_key(TrainConfig(out=tmp_path, **{**shared, "hidden": 32})) != stack_key(configs[0])
    assert stack_key(TrainConfig(out=tmp_path, **{**shared, "head": "gru"})) is None

    def stop_at_2(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # not an Exception: the stack does not swallow it

    data = load_labelled(cache, configs[0])
    with pytest.raises(KeyboardInterrupt):
        train_stack(data, configs, torch.device("cpu"), [None, stop_at_2, None])

    class Stop(Exception):
        pass

    def stop(row):
        if row["epoch"] == 2:
            raise Stop

    results = train_stack(data, configs, torch.device("cpu"), [None, stop, None])
    assert isinstance(results[1], Stop) and len(metric_rows(configs[1].out)) == 2  # only that head stopped
    for i, o in enumerate(own):
        alone = pipeline.train_head(cache, tmp_path / f"alone{i}", **shared, **o)
        a, s = metric_rows(alone.out), metric_rows(configs[i].out)
        assert len(a) == 4 and len(s) == (2 if i == 1 else 4)
        for ra, rs in zip(a, s):  # same seed, same batches, same dropout masks: the same run up to rounding
            for k in ("train_loss", "train_acc", "val_loss", "val_top1"):
                assert float(rs[k]) == pytest.approx(float(ra[k]), rel=1e-4, abs=1e-6), (i, k, ra, rs)
        if i != 1:
            assert results[i].summary["top1"] == alone.summary["top1"]
            w_alone = load_checkpoint(alone.out / "last.pt").state_dict
            w_stack = load_checkpoint(configs[i].out / "last.pt").state_dict
            for k, v in w_alone.items():
                torch.testing.assert_close(w_stack[k], v, rtol=1e-4, atol=1e-5)


def test_a_grid_sweep_stacks_mean_pool_trials_with_the_same_results(cache, tmp_path):
    params = ["head=meanpool,gru", "lr=0.001,0.01,0.03", "hidden=16", *TRIAL]
    stacked = pipeline.sweep(cache, tmp_path / "stacked", params=params, strategy="grid", pruner="none", **QUICK)
    alone = pipeline.sweep(cache, tmp_path / "alone", params=params, strategy="grid", pruner="none", stack=1, **QUICK)
    stacks = {
        tuple(t.user_attrs["stack"]) for t in study_trials(tmp_path / "stacked") if t.params["head"] == "meanpool"
    }
    assert len(stacks) == 1 and len(next(iter(stacks))) == 3  # the three mean-pool trials: one model
    assert all("stack" not in t.user_attrs for t in study_trials(tmp_path / "stacked") if t.params["head"] == "gru")
    assert all("stack" not in t.user_attrs for t in study_trials(tmp_path / "alone"))
    by_params = {(r["params"]["head"], r["params"]["lr"]): r for r in alone.rows}
    assert len(stacked.rows) == len(alone.rows) == 6
    for r in stacked.rows:
        a = by_params[(r["params"]["head"], r["params"]["lr"])]
        assert r["top1"] == a["top1"] and r["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
