"""Heads that label frames (--target frames): per-row labels from a folder or a segments CSV, the run folder and its
segmentation metrics, checkpoints that record what they label, evaluate and sweep."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import feature_cache, segment_videos, write_label_folder
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.data.splits import SplitError
from pipeline.train_head.checkpoint import load_checkpoint
from pipeline.train_head.evaluate import evaluate_checkpoint
from pipeline.train_head.train import train_head

FRAME_HEAD = dict(hidden=32, epochs=15, batch_size=4, lr=1e-2, patience=0, progress=False, plots=False, threads=2)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A cache of 16 videos made of segments of 3 classes, and a folder of their per-frame labels."""
    root = tmp_path_factory.mktemp("segmented")
    videos, labels = segment_videos(seed=0)
    cache = feature_cache(root / "cache.h5", videos)
    return cache, write_label_folder(root / "groundTruth", labels), labels


@pytest.mark.parametrize("head", ["tcn", "bilstm"])
def test_frame_head_learns_segments_and_writes_its_run(segmented, tmp_path, head):
    cache, gt, labels = segmented
    result = train_head(cache, tmp_path / head, head=head, frame_labels=gt, layers=3, stages=2, **FRAME_HEAD)
    s = result.summary
    assert s["target"] == "frames" and s["metric"] == "f1@50"
    # Rows show their class through noise: a trained head labels most of them right and finds the segments.
    assert s["acc"] > 0.8 and s["f1@50"] > 0.5 and s["edit"] > 0.5
    assert {r["key"] for r in s["per_video"]} <= set(labels) and len(s["per_video"]) == s["split"]["val"]
    assert s["frames"] == sum(len(labels[r["key"]]) for r in s["per_video"])

    with open(tmp_path / head / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_edit", "val_f1@10", "val_f1@25",
        "val_f1@50", "lr", "train_seconds", "val_seconds",
    ]  # fmt: skip
    best = max(rows, key=lambda r: (float(r["val_f1@50"]), -float(r["val_loss"])))
    assert s["best_epoch"] == int(best["epoch"])

    ckpt = load_checkpoint(tmp_path / head / "best.pt")
    assert ckpt.target == "frames" and ckpt.classes == ["act0", "act1", "act2"]
    assert ckpt.metrics["f1@50"] == pytest.approx(float(best["val_f1@50"]), abs=1e-5)
    assert "top1" not in ckpt.metrics


def test_best_epoch_follows_the_chosen_metric(segmented, tmp_path):
    cache, gt, _ = segmented
    s = train_head(cache, tmp_path, head="gru", frame_labels=gt, metric="edit", **{**FRAME_HEAD, "epochs": 6}).summary
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: (float(r["val_edit"]), -float(r["val_loss"])))
    assert s["metric"] == "edit" and s["best_epoch"] == int(best["epoch"])


def test_segments_csv_with_background_in_seconds(tmp_path):
    videos, labels = segment_videos(seed=1, videos=10)
    cache = feature_cache(tmp_path / "cache.h5", videos)
    # Only act1 and act2 are written as segments (start, end in seconds at 25 rows/s); act0 rows are uncovered.
    with open(tmp_path / "segments.csv", "w") as f:
        f.write("key,start,end,label\n")
        for key, rows in labels.items():
            rows = np.array(rows)
            change = np.flatnonzero(rows[1:] != rows[:-1]) + 1
            for start, end in zip(np.r_[0, change], np.r_[change, len(rows)]):
                if rows[start] != "act0":
                    f.write(f"{key},{start / 25:.2f},{end / 25:.2f},{rows[start]}\n")
    options = dict(frame_labels=tmp_path / "segments.csv", head="tcn", layers=3, stages=2, **FRAME_HEAD)
    with pytest.raises(SplitError, match="--label-units"):
        train_head(cache, tmp_path / "run0", **options)
    with pytest.raises(SplitError, match="--background"):
        train_head(cache, tmp_path / "run0", label_units="seconds", **options)
    s = train_head(cache, tmp_path / "run", label_units="seconds", background="idle", **options).summary
    assert s["classes"] == ["act1", "act2", "idle"] and s["background"] == ["idle"]
    assert s["acc"] > 0.8
    assert load_checkpoint(tmp_path / "run" / "best.pt").background == "idle"


def test_frame_settings_are_checked_with_their_flags(segmented, tmp_path):
    cache, gt, _ = segmented
    with pytest.raises(ValueError, match="--target frames needs per-frame labels"):
        train_head(cache, tmp_path, target="frames", **FRAME_HEAD)
    with pytest.raises(ValueError, match="--sampling segments"):
        train_head(cache, tmp_path, frame_labels=gt, sampling="segments", **FRAME_HEAD)
    with pytest.raises(ValueError, match="--metric"):
        train_head(cache, tmp_path, frame_labels=gt, metric="top1", **FRAME_HEAD)
    with pytest.raises(ValueError, match="--clip-stride"):
        train_head(cache, tmp_path, frame_labels=gt, clip_stride=2, **FRAME_HEAD)


def test_crop_windows_train_and_whole_videos_evaluate(segmented, tmp_path):
    cache, gt, labels = segmented
    s = train_head(
        cache, tmp_path, head="lstm", frame_labels=gt, sampling="crop", clip_len=12, **{**FRAME_HEAD, "epochs": 8}
    ).summary
    assert s["eval"] == "every row of whole videos"
    assert s["frames"] == sum(len(labels[r["key"]]) for r in s["per_video"])  # every val row scored


def test_evaluate_frames_and_refusals(segmented, tmp_path):
    cache, gt, labels = segmented
    train_head(cache, tmp_path / "tcn", head="tcn", frame_labels=gt, layers=3, stages=2, **FRAME_HEAD)
    ckpt = tmp_path / "tcn" / "best.pt"
    report = evaluate_checkpoint(ckpt, cache, frame_labels=gt, out=tmp_path / "eval", progress=False)
    # The cache is the training cache: its train videos are scored apart, the val ones are the held-out score.
    summary = json.loads((tmp_path / "tcn" / "summary.json").read_text())
    assert report.metrics["videos"] == summary["split"]["val"]
    assert report.metrics["f1@50"] == pytest.approx(summary["f1@50"], abs=1e-6)
    assert report.seen["videos"] == summary["split"]["train"]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["target"] == "frames" and saved["acc"] == pytest.approx(report.metrics["acc"])

    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", str(ckpt), str(cache), "-q"])
    assert r.exit_code == 2 and "labels frames" in r.output and "--frame-labels" in r.output
    r = runner.invoke(app, ["evaluate", str(ckpt), str(cache), "--frame-labels", str(gt), "-q"])
    assert r.exit_code == 0, r.output
    assert "F1@50" in r.output and "edit" in r.output
    with pytest.raises(ValueError, match="labels frames: finetune trains heads that label whole videos"):
        pipeline.finetune([tmp_path], ckpt, tmp_path / "ft", progress=False)


def test_video_head_refuses_frame_labels(tiny_run, tmp_path):
    cache, run = tiny_run
    gt = write_label_folder(tmp_path / "gt", {})
    r = CliRunner().invoke(app, ["evaluate", str(run / "best.pt"), str(cache), "--frame-labels", str(gt), "-q"])
    assert r.exit_code == 2 and "labels whole videos" in r.output


def test_cli_train_head_with_frame_labels(segmented, tmp_path):
    cache, gt, _ = segmented
    args = ["train-head", str(cache), "--frame-labels", str(gt), "--head", "gru", "--hidden", "32", "--epochs", "3"]
    r = CliRunner().invoke(app, [*args, "--batch-size", "4", "-o", str(tmp_path / "run"), "-q", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "val frame acc" in r.output and "F1@50" in r.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert config["target"] == "frames" and config["sampling"] == "whole" and config["batch_size"] == 4


def test_sweep_frames_ranks_by_f1(segmented, tmp_path):
    pytest.importorskip("optuna")
    from pipeline.sweep.run import sweep

    cache, gt, _ = segmented
    result = sweep(
        cache,
        tmp_path / "sweep",
        frame_labels=gt,
        params=["head=gru,meanpool", "hidden=32", "epochs=4", "batch_size=4", "lr=0.01"],
        strategy="grid",
        progress=False,
        plots=False,
    )
    assert result.metric == "f1@50" and len(result.rows) == 2
    rows = result.rows
    assert rows[0]["f1@50"] >= rows[1]["f1@50"] and "top1" not in rows[0]
    with open(tmp_path / "sweep" / "leaderboard.csv") as f:
        header = next(csv.reader(f))
    assert header[3:8] == ["f1@50", "acc", "edit", "f1@10", "f1@25"]
    assert load_checkpoint(tmp_path / "sweep" / "best.pt").target == "frames"


def test_predict_writes_segments_and_row_labels_of_real_videos(tmp_path):
    from helpers import FAST, make_video

    from pipeline.extract.run import extract_videos
    from pipeline.predict import predict

    # Four real videos of 20 frames at 25 fps; frames 0-9 are "open", 10-19 "closed"; extracted every 2nd frame.
    for i in range(4):
        make_video(tmp_path / "videos" / f"v{i}.mp4", 20, offset=3 * i)
    gt = write_label_folder(tmp_path / "gt", {f"v{i}.mp4": ["open"] * 10 + ["closed"] * 10 for i in range(4)})
    extract_videos([tmp_path / "videos"], tmp_path / "cache.h5", stride=2, **FAST)
    run = train_head(
        tmp_path / "cache.h5", tmp_path / "run", head="gru", frame_labels=gt, val_fraction=0.25,
        **{**FRAME_HEAD, "epochs": 3, "plots": True},
    )  # fmt: skip
    assert (tmp_path / "run" / "strips.png").stat().st_size > 1000  # ground truth vs prediction of the val video

    make_video(tmp_path / "new" / "clip.mp4", 20, offset=50)
    report = predict(tmp_path / "run" / "best.pt", [tmp_path / "new"], tmp_path / "segments.csv", json=True,
                     progress=False, workers=0)  # fmt: skip
    assert report.frames_output == tmp_path / "segments.frames.csv"
    with open(tmp_path / "segments.frames.csv") as f:
        rows = list(csv.DictReader(f))
    # One row per cached row: decoded frames 0, 2, ..., 18 at their own times.
    assert [int(r["frame"]) for r in rows] == list(range(0, 20, 2))
    assert [float(r["time_s"]) for r in rows] == pytest.approx([f / 25 for f in range(0, 20, 2)], abs=1e-3)
    assert {r["label"] for r in rows} <= {"open", "closed"} and all(0 < float(r["prob"]) <= 1 for r in rows)
    with open(tmp_path / "segments.csv") as f:
        segments = list(csv.DictReader(f))
    # The segments are the runs of the row labels: they tile the video, each ending where the next one starts.
    labels = [r["label"] for r in rows]
    runs = [labels[0]] + [b for a, b in zip(labels, labels[1:]) if a != b]
    assert [s["label"] for s in segments] == runs
    assert int(segments[0]["start_frame"]) == 0 and int(segments[-1]["end_frame"]) == 20
    for a, b in zip(segments, segments[1:]):
        assert a["end_frame"] == b["start_frame"] and a["end_s"] == b["start_s"]
    for s in segments:
        assert float(s["start_s"]) == pytest.approx(int(s["start_frame"]) / 25, abs=1e-3)
    saved = json.loads((tmp_path / "segments.json").read_text())
    assert len(saved) == 1 and len(saved[0]["frames"]) == 10 and saved[0]["segments"][0]["start_frame"] == 0
    assert run.summary["target"] == "frames"
