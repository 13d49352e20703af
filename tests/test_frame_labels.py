"""Per-frame labels (a folder of per-video label files, or a segments CSV) aligned to the rows of a cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import FAST, feature_cache, make_video

import pipeline
from pipeline.data.cache import open_cache
from pipeline.data.frame_labels import FrameLabelError, FrameLabels, read_frame_labels
from pipeline.data.splits import SplitError

# Synthetic rows: row i is frame i, at i / 25 s.
VIDEOS = {"cereals/P03_cam01_P03_cereals.avi": 10, "tea/P04_webcam_P04_tea.avi": 6, "tea/P05_cam01_P05_tea.avi": 8}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c.h5"
    rng = np.random.default_rng(0)
    feature_cache(path, [(k, rng.normal(size=(t, 4)), None, None) for k, t in VIDEOS.items()])
    return open_cache(path)


def write_labels(folder, name, labels):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in labels))
    return path


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ folder
def test_folder_files_match_keys_by_name_and_label_every_row(cache, tmp_path, caplog):
    gt = tmp_path / "groundTruth"
    write_labels(gt, "P03_cam01_P03_cereals.txt", ["SIL"] * 3 + ["pour"] * 5 + ["SIL"] * 2)
    write_labels(gt, "P04_webcam_P04_tea.txt", ["take"] * 6 + ["", ""])  # blank lines at the end are ignored
    write_labels(gt, "P99_unknown.txt", ["x"] * 4)
    write_labels(gt, ".hidden.txt", ["x"])
    with caplog.at_level(logging.WARNING):
        labels = read_frame_labels(gt, cache)
    assert isinstance(labels, FrameLabels) and labels.source == gt
    assert set(labels.rows) == {"cereals/P03_cam01_P03_cereals.avi", "tea/P04_webcam_P04_tea.avi"}
    assert labels.rows["cereals/P03_cam01_P03_cereals.avi"].tolist() == ["SIL"] * 3 + ["pour"] * 5 + ["SIL"] * 2
    assert labels.rows["tea/P04_webcam_P04_tea.avi"].tolist() == ["take"] * 6
    assert labels.unmatched == ["P99_unknown.txt"]
    assert labels.classes() == ["SIL", "pour", "take"]
    assert "1 entries name no video" in caplog.text and "P99_unknown" in caplog.text


def test_folder_is_searched_recursively_and_keys_restrict_the_videos(cache, tmp_path):
    gt = tmp_path / "gt"
    write_labels(gt, "tea/P05_cam01_P05_tea.txt", ["a"] * 4 + ["b"] * 4)  # matches the key's path
    write_labels(gt, "split1/cereals_files/P03_cam01_P03_cereals.labels", ["c"] * 10)  # by its name only
    labels = read_frame_labels(gt, cache)
    assert labels.rows["tea/P05_cam01_P05_tea.avi"].tolist() == ["a"] * 4 + ["b"] * 4
    assert labels.rows["cereals/P03_cam01_P03_cereals.avi"].tolist() == ["c"] * 10
    only = read_frame_labels(gt, cache, keys=["tea/P05_cam01_P05_tea.avi"])
    assert list(only.rows) == ["tea/P05_cam01_P05_tea.avi"] and only.unmatched == []


def test_folder_length_mismatches_name_the_files_and_both_numbers(cache, tmp_path):
    gt = tmp_path / "gt"
    write_labels(gt, "P03_cam01_P03_cereals.txt", ["a"] * 9)
    write_labels(gt, "P04_webcam_P04_tea.txt", ["a"] * 7)
    write_labels(gt, "P05_cam01_P05_tea.txt", ["a"] * 8)  # right
    with pytest.raises(FrameLabelError) as err:
        read_frame_labels(gt, cache)
    text = str(err.value)
    assert isinstance(err.value, SplitError)
    assert "2 label files that do not fit" in text
    assert "P03_cam01_P03_cereals.txt: 9 labels" in text and "has 10 decoded frames" in text
    assert "P04_webcam_P04_tea.txt: 7 labels" in text and "has 6 decoded frames" in text
    assert "P05" not in text


def test_folder_blank_line_in_the_middle_is_an_error(cache, tmp_path):
    gt = tmp_path / "gt"
    write_labels(gt, "P04_webcam_P04_tea.txt", ["a", "a", "", "b", "b", "b", "b"])
    with pytest.raises(FrameLabelError, match=r"P04_webcam_P04_tea\.txt, line 3: a blank line"):
        read_frame_labels(gt, cache)


# --------------------------------------------------------------------------------------------------------- CSV
def test_csv_in_frames_with_header(cache, tmp_path):
    csv = write_csv(
        tmp_path / "seg.csv",
        [
            "key,start,end,label",
            "P04_webcam_P04_tea,0,2,take",
            "P04_webcam_P04_tea,2,6,pour",
            "missing_video,0,5,x",
        ],
    )
    labels = read_frame_labels(csv, cache, units="frames")
    assert list(labels.rows) == ["tea/P04_webcam_P04_tea.avi"]
    assert labels.rows["tea/P04_webcam_P04_tea.avi"].tolist() == ["take"] * 2 + ["pour"] * 4
    assert labels.unmatched == ["missing_video"]


def test_csv_in_seconds_without_header_and_background(cache, tmp_path):
    # P03: 10 rows at 0, 0.04, ..., 0.36 s (0.4 s long); P05: 8 rows (0.32 s)
    csv = write_csv(
        tmp_path / "seg.csv",
        ["cereals/P03_cam01_P03_cereals.avi,0.08,0.2,pour", "P05_cam01_P05_tea,0,0.32,tea"],
    )
    labels = read_frame_labels(csv, cache, units="seconds", background="SIL")
    assert labels.rows["cereals/P03_cam01_P03_cereals.avi"].tolist() == ["SIL"] * 2 + ["pour"] * 3 + ["SIL"] * 5
    assert labels.rows["tea/P05_cam01_P05_tea.avi"].tolist() == ["tea"] * 8
    assert labels.classes() == ["SIL", "pour", "tea"]


def test_csv_needs_its_units(cache, tmp_path):
    csv = write_csv(tmp_path / "seg.csv", ["P04_webcam_P04_tea,0,6,take"])
    with pytest.raises(FrameLabelError, match="--label-units seconds"):
        read_frame_labels(csv, cache)


def test_csv_overlaps_and_empty_segments_name_the_lines(cache, tmp_path):
    csv = write_csv(
        tmp_path / "seg.csv",
        [
            "key,start,end,label",
            "P03_cam01_P03_cereals,0,6,a",
            "P03_cam01_P03_cereals,5,10,b",
            "P04_webcam_P04_tea,4,4,c",
            "P05_cam01_P05_tea,zero,8,d",
        ],
    )
    with pytest.raises(FrameLabelError) as err:
        read_frame_labels(csv, cache, units="frames")
    text = str(err.value)
    assert str(csv) in text
    assert "lines 2 and 3" in text and "overlap" in text
    assert "line 4: the segment ends (4) at or before its start (4)" in text
    assert "line 5: start and end must be numbers" in text


def test_csv_uncovered_rows_need_a_background(cache, tmp_path):
    csv = write_csv(tmp_path / "seg.csv", ["P03_cam01_P03_cereals,0,4,a", "P03_cam01_P03_cereals,6,10,b"])
    with pytest.raises(FrameLabelError) as err:
        read_frame_labels(csv, cache, units="frames")
    text = str(err.value)
    assert "2 of 10 rows (the first at frame 4)" in text and "--background NAME" in text
    filled = read_frame_labels(csv, cache, units="frames", background="bg")
    assert filled.rows["cereals/P03_cam01_P03_cereals.avi"].tolist() == ["a"] * 4 + ["bg"] * 2 + ["b"] * 4


def test_csv_of_frame_numbers_read_as_seconds_is_caught(cache, tmp_path):
    csv = write_csv(tmp_path / "seg.csv", ["P03_cam01_P03_cereals,0,5,a", "P03_cam01_P03_cereals,5,10,b"])
    with pytest.raises(FrameLabelError) as err:
        read_frame_labels(csv, cache, units="seconds")
    text = str(err.value)
    assert "line 2" in text and "starts at 5 s but the video lasts 0.4 s (10 frames)" in text
    assert "--label-units frames" in text
    assert read_frame_labels(csv, cache, units="frames").rows["cereals/P03_cam01_P03_cereals.avi"].tolist() == (
        ["a"] * 5 + ["b"] * 5
    )


# ---------------------------------------------------------------------------------------------------- real video
def test_labels_of_a_real_video_extracted_with_a_stride(tmp_path):
    video = make_video(tmp_path / "videos" / "clip.avi", 20, fps=25.0)
    out = tmp_path / "c.h5"
    pipeline.extract_videos([video], out, **FAST, stride=2)
    cache = open_cache(out)
    (key,) = cache.keys()
    np.testing.assert_array_equal(cache.frame_indices(key), np.arange(0, 20, 2))
    expected = ["a"] * 4 + ["b"] * 6  # frames 0, 2, 4, 6 | 8, ..., 18

    gt = tmp_path / "gt"
    write_labels(gt, "clip.txt", ["a"] * 7 + ["b"] * 13)  # frames 0-6: a, 7-19: b
    rows = read_frame_labels(gt, cache).rows[key]
    assert rows.tolist() == expected and rows[3] == "a" and rows[4] == "b"

    write_labels(gt, "clip.txt", ["a"] * 7 + ["b"] * 12)
    with pytest.raises(FrameLabelError, match=r"clip\.txt: 19 labels, but 'clip\.avi' has 20 decoded frames"):
        read_frame_labels(gt, cache)

    csv = write_csv(tmp_path / "seg.csv", ["clip,0,0.28,a", "clip,0.28,0.8,b"])
    assert read_frame_labels(csv, cache, units="seconds").rows[key].tolist() == expected
