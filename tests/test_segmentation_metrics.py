"""Segmentation metrics on small hand-computed sequences: segments, edit, F1@k, the report, merged runs, strips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.train_head import segmentation
from pipeline.train_head.segmentation import (
    SEGMENT_METRICS,
    edit_score,
    f1,
    f1_counts,
    merge_segments,
    plot_strips,
    segmentation_report,
    segments,
)


def a(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- segments
def test_segments_are_the_runs_with_exclusive_ends():
    assert segments(a(0, 0, 1, 1, 1, 0)) == [(0, 0, 2), (1, 2, 5), (0, 5, 6)]
    assert segments(a(3)) == [(3, 0, 1)]
    assert segments(a()) == []


def test_segments_leave_out_background_and_negative_labels():
    assert segments(a(0, 0, 1, 1, 1, 0), background={0}) == [(1, 2, 5)]
    # -1 breaks the run of 2s in two and is itself no segment.
    assert segments(a(2, 2, -1, 2, -1, -1, 3)) == [(2, 0, 2), (2, 3, 4), (3, 6, 7)]
    assert segments(a(-1, -1)) == []


# ---------------------------------------------------------------------------------------------------- edit score
def test_edit_score_of_an_inserted_segment():
    # pred segments A B C, true A C: one deletion turns one into the other, the longer has 3 -> 1 - 1/3.
    assert edit_score(a(0, 0, 1, 2, 2), a(0, 0, 2, 2, 2)) == pytest.approx(2 / 3)
    # A B A vs A C A: one substitution out of 3.
    assert edit_score(a(0, 1, 0), a(0, 2, 0)) == pytest.approx(2 / 3)
    # Only the order counts, not where the boundaries are.
    assert edit_score(a(0, 1, 1, 1), a(0, 0, 0, 1)) == 1.0


def test_edit_score_with_background_and_empty_sequences():
    # Without background: 0 1 0 2 vs 1 2 -> delete both 0s: 2 edits out of 4 -> 0.5; with 0 as background: 1 2 vs 1 2.
    assert edit_score(a(0, 1, 0, 2), a(1, 1, 2, 2)) == pytest.approx(0.5)
    assert edit_score(a(0, 1, 0, 2), a(1, 1, 2, 2), background={0}) == 1.0
    assert edit_score(a(0, 0), a(0, 0), background={0}) == 1.0  # neither has a segment
    assert edit_score(a(1, 1), a(0, 0), background={0}) == 0.0  # 1 insertion out of 1


# ---------------------------------------------------------------------------------------------------- F1
def test_f1_of_an_over_segmented_prediction():
    true = a(1, 1, 1, 1, 1, 1, 1, 1, 1, 1)  # one segment [0, 10)
    pred = a(1, 1, 1, 1, 1, 0, 1, 1, 1, 1)  # with 0 as background: [0, 5) and [6, 10)
    # [0, 5): IoU 5/10 = 0.5 -> tp at 0.5 (>=), marks the true segment; [6, 10): IoU 4/10, its best match is
    # taken -> fp. Nothing missed.
    assert f1_counts(pred, true, 0.5, background={0}) == (1, 1, 0)
    assert f1_counts(pred, true, 0.1, background={0}) == (1, 1, 0)
    # Above 0.5 neither piece is enough: 2 fp, and the true segment is missed.
    assert f1_counts(pred, true, 0.6, background={0}) == (0, 2, 1)
    # Without background the 0 at row 5 is a segment of its own with no true 0 segment: one more fp.
    assert f1_counts(pred, true, 0.5) == (1, 2, 0)


def test_f1_of_a_shifted_segment():
    true = a(1, 1, 1, 1, 0, 0)  # 1 on [0, 4)
    pred = a(0, 1, 1, 1, 1, 0)  # 1 on [1, 5): intersection 3, union 5 -> IoU 0.6
    for overlap in (0.1, 0.25, 0.5):
        assert f1_counts(pred, true, overlap, background={0}) == (1, 0, 0)
    assert f1_counts(pred, true, 0.75, background={0}) == (0, 1, 1)
    # 0 as a class: true 0 on [4, 6); pred 0 on [0, 1) (IoU 0: fp) and [5, 6) (IoU 1/2: tp at 0.5).
    assert f1_counts(pred, true, 0.5) == (2, 1, 0)
    assert f1(2, 1, 0) == pytest.approx(0.8)  # precision 2/3, recall 1 -> 2 * (2/3) / (5/3)


def test_f1_counts_duplicates_as_false_positives_and_missed_segments_as_false_negatives():
    # True 1 on [0, 6); pred 1 on [0, 3) (IoU 0.5) and [4, 6) (IoU 2/6): both pass 0.1 but only the first counts.
    assert f1_counts(a(1, 1, 1, 0, 1, 1, 0, 0), a(1, 1, 1, 1, 1, 1, 0, 0), 0.1, background={0}) == (1, 1, 0)
    true = a(1, 1, 0, 2, 2, 0, 3, 3)
    # Only the 1 found: the 2 and the 3 are missed.
    assert f1_counts(a(1, 1, 0, 0, 0, 0, 0, 0), true, 0.5, background={0}) == (1, 0, 2)
    # A 3 where the true 2 is: no true 3 overlaps it -> fp, and the 2 and 3 are still missed.
    assert f1_counts(a(1, 1, 0, 3, 3, 0, 0, 0), true, 0.5, background={0}) == (1, 1, 2)


def test_f1_from_counts():
    assert f1(0, 0, 0) == 0.0
    assert f1(0, 3, 2) == 0.0
    assert f1(3, 0, 0) == 1.0
    assert f1(1, 0, 3) == pytest.approx(0.4)  # precision 1, recall 1/4 -> 2 * 0.25 / 1.25


# ---------------------------------------------------------------------------------------------------- report
CLASSES = ["bg", "a", "b", "c"]
# v1: frames right at rows 0, 2-6 (6 of 8; rows 1 and 7 are background frames predicted as a and b).
#   Segments (0 background): true a[2,5) b[5,7); pred a[1,5) (IoU 3/4) b[5,8) (IoU 2/3) -> edit 1, tp 2 at every k.
# v2: rows 2-3 right (2 of 4). true a[0,4); pred b[0,2) (no true b: fp) a[2,4) (IoU 2/4: tp at 0.1, 0.25, 0.5).
#   Edit: b a vs a -> 1 deletion of 2 -> 0.5. F1: precision 1/2, recall 1 -> 2/3.
V1 = (a(0, 0, 1, 1, 1, 2, 2, 0), a(0, 1, 1, 1, 1, 2, 2, 2))
V2 = (a(1, 1, 1, 1), a(2, 2, 1, 1))


def report(**kwargs) -> dict:
    return segmentation_report([V1[1], V2[1]], [V1[0], V2[0]], CLASSES, keys=["v1", "v2"], background={0}, **kwargs)


def test_report_overall_numbers():
    r = report()
    assert SEGMENT_METRICS == ("acc", "edit", "f1@10", "f1@25", "f1@50")
    assert r["videos"] == 2 and r["frames"] == 12
    # 8 of 12 frames right, background frames included (on the 9 non-background frames it would be 7/9).
    assert r["acc"] == pytest.approx(8 / 12)
    assert r["edit"] == pytest.approx((1.0 + 0.5) / 2)
    # Summed counts tp 3, fp 1, fn 0 -> precision 3/4, recall 1 -> 1.5 / 1.75 = 6/7, not the mean (1 + 2/3) / 2.
    for k in ("f1@10", "f1@25", "f1@50"):
        assert r[k] == pytest.approx(6 / 7)
    assert r["loss"] is None
    assert r["classes"] == CLASSES and r["background"] == ["bg"]


def test_report_per_video_numbers():
    v1, v2 = report()["per_video"]
    assert v1 == {"key": "v1", "frames": 8, "acc": 0.75, "edit": 1.0, "f1@10": 1.0, "f1@25": 1.0, "f1@50": 1.0}
    assert v2["key"] == "v2" and v2["frames"] == 4
    assert v2["acc"] == pytest.approx(0.5) and v2["edit"] == pytest.approx(0.5)
    assert v2["f1@50"] == pytest.approx(2 / 3)


def test_report_confusion_matrix_and_per_class_accuracy():
    r = report()
    # v1: bg->bg 1, bg->a 1, bg->b 1, a->a 3, b->b 2; v2: a->b 2, a->a 2.
    assert r["confusion_matrix"] == [[1, 1, 1, 0], [0, 5, 2, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    acc = r["per_class_accuracy"]
    assert acc["bg"] == pytest.approx(1 / 3) and acc["a"] == pytest.approx(5 / 7) and acc["b"] == 1.0
    assert acc["c"] is None


def test_report_loss_is_the_mean_frame_nll():
    # Every frame gives its true class 0.5 (the rest 1/6 each): NLL log 2 per frame.
    probs = []
    for true in (V1[0], V2[0]):
        p = np.full((len(true), 4), 0.5 / 3)
        p[np.arange(len(true)), true] = 0.5
        probs.append(p)
    assert report(probs=probs)["loss"] == pytest.approx(math.log(2))


def test_report_ignores_unlabelled_rows_and_rejects_length_mismatch():
    r = segmentation_report([a(1, 1, 0, 0)], [a(1, 1, -1, -1)], ["x", "y"])
    assert r["frames"] == 2 and r["acc"] == 1.0
    assert r["confusion_matrix"] == [[0, 0], [0, 2]]
    assert r["per_video"][0]["key"] == "0"
    with pytest.raises(ValueError):
        segmentation_report([a(1, 1)], [a(1, 1, 1)], ["x", "y"])


# ---------------------------------------------------------------------------------------------------- merged runs
def test_merge_segments_takes_frames_from_frame_indices():
    # Every 2nd frame at 25 fps: rows at frames 0 2 4 6, 0.08 s apart.
    runs = merge_segments(a(0, 0, 1, 1), a(0, 2, 4, 6), np.array([0.0, 0.08, 0.16, 0.24]), ["walk", "run"])
    assert [(r["label"], r["start_row"], r["end_row"], r["start_frame"], r["end_frame"]) for r in runs] == [
        ("walk", 0, 2, 0, 4),  # ends where the next run starts: frame 4 (frames 0-3 are walking)
        ("run", 2, 4, 4, 8),  # the last run: last row's frame 6 + the frame step 2
    ]
    assert runs[0]["start_s"] == 0.0 and runs[0]["end_s"] == pytest.approx(0.16)  # where the next row starts
    assert runs[1]["start_s"] == pytest.approx(0.16)
    assert runs[1]["end_s"] == pytest.approx(0.24 + 0.08)  # last timestamp + the median step


def test_merge_segments_of_a_single_row():
    (run,) = merge_segments(a(1), a(10), np.array([0.4]), ["walk", "run"])
    assert run == {
        "label": "run",
        "start_row": 0,
        "end_row": 1,
        "start_frame": 10,
        "end_frame": 11,
        "start_s": 0.4,
        "end_s": 0.4,
    }


# ---------------------------------------------------------------------------------------------------- plot
def test_plot_strips_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "strips.png"
    items = [("v1", V1[0], V1[1]), ("v2", V2[0], V2[1]), ("v3", a(-1, 3, 3), a(3, 3, 3))]
    assert plot_strips(items, CLASSES, path, title="val") is True
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_strips_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(segmentation, "pyplot", lambda: None)
    path = tmp_path / "strips.png"
    assert plot_strips([("v1", V1[0], V1[1])], CLASSES, path) is False
    assert not path.exists()
