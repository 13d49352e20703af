"""End to end on real generated videos: extract, train, evaluate, and `pipeline predict` on new videos."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from helpers import FAST, make_video
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_ERROR, EXIT_INPUTS_FAILED, EXIT_OK, EXIT_USAGE, app
from pipeline.extract.backbone import WeightsError
from pipeline.sample import CLASSES, make_order_sample

runner = CliRunner()
SAMPLE = dict(frames=8, width=64, height=48)
HEAD = dict(
    epochs=25,
    batch_size=8,
    lr=3e-3,
    hidden=64,
    clip_len=8,
    patience=0,
    group_regex=r"clip_(\d+)",
    progress=False,
    plots=False,
    threads=2,
)


@pytest.fixture(scope="module")
def order_runs(tmp_path_factory):
    """The order-only sample as real videos (8 frames, 56-pixel crops): train caches, LSTM and meanpool heads."""
    root = tmp_path_factory.mktemp("order")
    make_order_sample(root / "train", per_class=8, seed=0, **SAMPLE)
    make_order_sample(root / "test", per_class=4, seed=1, **SAMPLE)
    for name in ("train", "test"):
        report = pipeline.extract_videos([root / name], root / f"{name}.h5", **FAST)
        assert report.ok
    for head in ("lstm", "meanpool"):
        pipeline.train_head(root / "train.h5", root / head, head=head, **HEAD)
    return root


def test_order_only_videos_lstm_high_meanpool_at_chance(order_runs):
    top1 = {
        head: pipeline.evaluate(order_runs / head / "best.pt", order_runs / "test.h5", progress=False).metrics["top1"]
        for head in ("lstm", "meanpool")
    }
    assert top1["lstm"] >= 0.75, top1
    assert top1["meanpool"] <= 0.3, top1  # the classes share their frames: one ordering of four is right


def test_predict_new_videos_with_the_checkpoint_feature_spec(order_runs, tmp_path):
    ckpt = order_runs / "lstm" / "best.pt"
    folder = order_runs / "test" / "right_to_left"
    args = [
        "predict",
        str(ckpt),
        str(folder),
        "-o",
        str(tmp_path / "preds.csv"),
        "--json",
        "--cache",
        str(tmp_path / "pred.h5"),
        "--workers",
        "0",
        "--top-k",
        "4",
    ]
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == EXIT_OK, result.output
    assert "4 extracted, 0 already" in result.output
    rows = list(csv.DictReader((tmp_path / "preds.csv").read_text().splitlines()))
    assert [r["path"] for r in rows] == [str(p) for p in sorted(folder.iterdir())]
    for r in rows:
        probs = [float(r[f"prob_{i}"]) for i in range(1, 5)]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert sorted(r[f"label_{i}"] for i in range(1, 5)) == sorted(CLASSES) and r["error"] == ""
    assert sum(r["label_1"] == "right_to_left" for r in rows) >= 3
    assert f"-> {tmp_path / 'preds.csv'} and {tmp_path / 'preds.json'}" in " ".join(result.output.split())
    help_text = runner.invoke(app, ["predict", "--help"], terminal_width=200).output
    assert "suffix.json(preds.csv->preds.json)" in "".join(c for c in help_text if not c.isspace() and c != "│")
    as_json = json.loads((tmp_path / "preds.json").read_text())
    assert [p["path"] for p in as_json] == [r["path"] for r in rows]
    assert as_json[0]["predictions"][0]["label"] == rows[0]["label_1"]

    # the new features are those `pipeline extract` made for the test cache: same spec, same rows
    pred_cache, test_cache = pipeline.open_cache(tmp_path / "pred.h5"), pipeline.open_cache(order_runs / "test.h5")
    assert pred_cache.spec == test_cache.spec
    video = sorted(folder.iterdir())[0]
    np.testing.assert_array_equal(
        pred_cache.features(str(video.resolve())), test_cache.features(f"right_to_left/{video.name}")
    )

    # predicting again extracts nothing
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == EXIT_OK and "0 extracted, 4 already in the prediction cache" in result.output


def test_json_output_never_replaces_the_csv(tmp_path):
    result = runner.invoke(
        app,
        ["predict", str(tmp_path / "best.pt"), str(tmp_path), "-o", str(tmp_path / "p.json"), "--json"],
        terminal_width=200,
    )
    assert result.exit_code == EXIT_USAGE and "give -o a .csv name" in result.output


def test_predict_reports_a_broken_video_and_goes_on(order_runs, tmp_path):
    good = order_runs / "test" / "left_to_right" / "clip_000.avi"
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video at all")
    result = runner.invoke(
        app,
        [
            "predict",
            str(order_runs / "lstm" / "best.pt"),
            str(good),
            str(bad),
            "-o",
            str(tmp_path / "p.csv"),
            "--cache",
            str(tmp_path / "p.h5"),
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == EXIT_INPUTS_FAILED, result.output
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "p.csv").read_text().splitlines())}
    assert rows[str(good)]["label_1"] and rows[str(good)]["error"] == ""
    assert rows[str(bad)]["label_1"] == "" and rows[str(bad)]["error"]


def test_predict_needs_the_same_weights_file(tmp_path, resnet18_state_file):
    videos = tmp_path / "videos"
    for c in ("a", "b"):
        for k in range(2):
            make_video(videos / c / f"{k}.avi", 2, offset=10 * k + (0 if c == "a" else 5))
    opts = {**FAST, "weights": str(resnet18_state_file)}
    assert pipeline.extract_videos([videos], tmp_path / "c.h5", **opts).ok
    pipeline.train_head(
        tmp_path / "c.h5",
        tmp_path / "run",
        head="meanpool",
        **{**HEAD, "epochs": 1, "clip_len": 2, "group_regex": None},
    )
    ckpt = tmp_path / "run" / "best.pt"
    new = make_video(tmp_path / "new.avi", 2, offset=3)
    common = dict(cache=tmp_path / "pred.h5", workers=0, progress=False)
    with pytest.raises(WeightsError, match="pass it with --weights"):
        pipeline.predict(ckpt, [new], tmp_path / "p.csv", **common)
    torch.manual_seed(5)
    import torchvision

    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(WeightsError, match="sha256"):
        pipeline.predict(ckpt, [new], tmp_path / "p.csv", weights=other, **common)
    renamed = tmp_path / "copy of the weights.pth"  # the same bytes under another name are the same weights
    shutil.copy(resnet18_state_file, renamed)
    report = pipeline.predict(ckpt, [new], tmp_path / "p.csv", weights=renamed, **common)
    assert not report.failed and report.predictions[0].top[0][0] in ("a", "b")
    assert pipeline.open_cache(tmp_path / "pred.h5").spec == pipeline.open_cache(tmp_path / "c.h5").spec


def test_predict_refuses_an_unsafe_checkpoint(tmp_path):
    from pipeline.train_head.checkpoint import FORMAT_NAME

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"format": FORMAT_NAME, "x": Payload()}, tmp_path / "evil.pt")
    video = make_video(tmp_path / "v.avi", 2)
    result = runner.invoke(app, ["predict", str(tmp_path / "evil.pt"), str(video), "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == EXIT_ERROR and "refusing" in result.output
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.csv").exists()
