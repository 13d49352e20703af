"""The segment sample (a label per frame: idle, approach, leave) and the demo that labels frames."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import decode_all_rgb

from pipeline.sample import SEGMENT_CLASSES, make_segment_sample, segment_plan


def _segments(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    out: dict[str, list[tuple[str, int, int]]] = {}
    with open(folder / "segments.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["key", "start", "end", "label"]
    for key, start, end, label in rows[1:]:
        out.setdefault(key, []).append((label, int(start), int(end)))
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("segments")
    return out, make_segment_sample(out, videos=4, seed=5)


def test_labels_segments_and_decoded_frames_agree(sample):
    out, paths = sample
    segments = _segments(out)
    assert len(paths) == 4 and sorted(segments) == sorted(p.name for p in paths)
    for path in paths:
        labels = (out / "groundTruth" / f"{path.stem}.txt").read_text().splitlines()
        frames = decode_all_rgb(path)
        assert 40 <= len(labels) <= 80
        assert len(frames) == len(labels), path.name  # one label per frame that OpenCV decodes
        assert frames[0].shape == (72, 96, 3)
        # the segments cover every frame exactly once, in order, and say what the label file says
        covered = []
        for n, (label, start, end) in enumerate(segments[path.name]):
            assert start == len(covered) and 8 <= end - start <= 20
            assert label in SEGMENT_CLASSES
            if n:
                assert label != segments[path.name][n - 1][0]  # neighbours of one class would be one segment
            covered += [label] * (end - start)
        assert covered == labels


def test_approach_grows_and_leave_shrinks(sample):
    out, paths = sample
    seen = set()
    for path in paths:
        # the square is bright (every channel >= 220), the background dark: count its pixels in every frame
        bright = np.array([int((f.min(axis=2) > 160).sum()) for f in decode_all_rgb(path)])
        for label, start, end in _segments(out)[path.name]:
            steps = np.diff(bright[start:end])
            seen.add(label)
            if label == "idle":
                assert bright[start:end].max() < 20, (path.name, start)
            elif label == "approach":
                assert bright[start] > 0 and (steps >= 0).all() and bright[end - 1] > 4 * bright[start]
            else:
                assert bright[end - 1] > 0 and (steps <= 0).all() and bright[start] > 4 * bright[end - 1]
    assert seen == set(SEGMENT_CLASSES)


def test_same_seed_same_sample(sample, tmp_path):
    out, paths = sample
    again = make_segment_sample(tmp_path / "again", videos=4, seed=5)
    other = make_segment_sample(tmp_path / "other", videos=4, seed=6)
    assert (tmp_path / "again" / "segments.csv").read_bytes() == (out / "segments.csv").read_bytes()
    for a, b in zip(paths, again):
        assert (tmp_path / "again" / "groundTruth" / f"{b.stem}.txt").read_bytes() == (
            out / "groundTruth" / f"{a.stem}.txt"
        ).read_bytes()
        assert np.array_equal(np.stack(decode_all_rgb(a)), np.stack(decode_all_rgb(b)))
    assert (tmp_path / "other" / "segments.csv").read_bytes() != (out / "segments.csv").read_bytes()
    assert len(other) == 4


def test_segment_plan_fills_every_length_exactly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        plan = segment_plan(rng, (20, 90), (8, 20), SEGMENT_CLASSES)
        lengths = [n for _, n in plan]
        assert 20 <= sum(lengths) <= 90 and all(8 <= n <= 20 for n in lengths)
    with pytest.raises(ValueError, match="segment lengths"):
        segment_plan(rng, (40, 80), (8, 12), SEGMENT_CLASSES)


def test_frames_demo_end_to_end_at_reduced_size(tmp_path):
    from pipeline.demo import run_frames_demo

    said: list[str] = []
    small = dict(train_videos=6, test_videos=2, predict_videos=1, train={"epochs": 2}, progress=False)
    result = run_frames_demo(tmp_path / "demo", echo=said.append, **small)
    assert said[-1] == (
        f"The whole demo took {result['seconds']:.0f}s (sample, extraction, training, evaluation, prediction)."
    )
    assert set(result["test"]) == {"tcn", "meanpool"}
    for head, name in (("tcn", "tcn head"), ("meanpool", "meanpool baseline")):
        m = result["test"][head]
        assert m["videos"] == 2 and 0.0 <= m["f1@50"] <= 1.0
        row = next(line for line in said if line.strip().startswith(name))
        assert row.split()[-5:] == [f"{m[k]:.1%}" for k in ("acc", "edit", "f1@10", "f1@25", "f1@50")]
    assert result["runs"]["tcn"].summary["parameters"] > result["runs"]["meanpool"].summary["parameters"]

    # the prediction: segments that cover the new video's every frame, and a label per frame beside them
    (prediction,) = result["predictions"].predictions
    frames = len(decode_all_rgb(Path(prediction.path)))
    assert prediction.error is None and len(prediction.rows) == frames
    with open(tmp_path / "demo" / "segments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[0]["start_frame"]) == 0 and int(rows[-1]["end_frame"]) == frames
    assert all(int(a["end_frame"]) == int(b["start_frame"]) for a, b in zip(rows, rows[1:]))
    with open(tmp_path / "demo" / "segments.frames.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == frames
    assert 0.0 <= result["predict_acc"] <= 1.0

    # run again in the same folder: the samples and caches are reused, the runs replaced
    said.clear()
    again = run_frames_demo(tmp_path / "demo", echo=said.append, **small)
    assert sum("reusing" in line for line in said) == 3
    assert again["test"]["tcn"]["frames"] == result["test"]["tcn"]["frames"]


@pytest.mark.slow
def test_the_frames_demo_shows_why_order_matters(tmp_path):
    """The demo as shipped: the tcn head finds the segments; meanpool, which sees each row alone, cannot."""
    from pipeline.demo import run_frames_demo

    result = run_frames_demo(tmp_path / "demo", progress=False, echo=lambda line: None)
    tcn, meanpool = result["test"]["tcn"], result["test"]["meanpool"]
    assert tcn["f1@50"] > 0.8 and tcn["acc"] > 0.85
    assert tcn["f1@50"] > meanpool["f1@50"] + 0.3
    assert meanpool["acc"] < 0.75  # idle right, approach and leave a coin flip


def test_demo_command_runs_the_frames_demo_with_its_own_folder(monkeypatch):
    from typer.testing import CliRunner

    from pipeline import demo
    from pipeline.cli import app

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append(("order", out)))
    monkeypatch.setattr(demo, "run_frames_demo", lambda out, **kw: calls.append(("frames", out, kw["weights"])))
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "-q"]).exit_code == 0
    assert runner.invoke(app, ["demo", "--frames", "-q"]).exit_code == 0
    assert runner.invoke(app, ["demo", "--frames", "--out", "elsewhere", "--weights", "DEFAULT"]).exit_code == 0
    assert calls == [
        ("order", Path("demo_out")),
        ("frames", Path("demo_frames"), "none"),
        ("frames", Path("elsewhere"), "DEFAULT"),
    ]
