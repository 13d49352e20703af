"""Discovery, labels, manifests, and bad inputs that are reported and skipped without stopping the run."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from helpers import FAST, FAST_ARGS, make_frame_folder, make_video, pattern_frame
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_INPUTS_FAILED, app
from pipeline.extract.inputs import InputError, discover


def test_labels_from_parent_folders_and_recursive_discovery(tmp_path):
    root = tmp_path / "videos"
    make_video(root / "jump" / "a.MP4", 3)  # upper-case extension
    make_video(root / "jump" / "b.avi", 3)
    make_video(root / "run" / "c.avi", 3)
    make_frame_folder(root / "run" / "d_frames", 3, ext=".jpg")
    make_video(root / "loose.avi", 3)
    (root / "run" / "notes.txt").write_text("not a video")
    items = {i.key: i for i in discover([root])}
    assert set(items) == {"jump/a.MP4", "jump/b.avi", "run/c.avi", "run/d_frames", "loose.avi"}
    assert items["jump/a.MP4"].label == "jump" and items["run/d_frames"].label == "run"
    assert items["loose.avi"].label is None and items["run/d_frames"].kind == "frames"

    pipeline.extract_videos([root], tmp_path / "c.h5", **FAST)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert cache.labels() == {
        "jump/a.MP4": "jump",
        "jump/b.avi": "jump",
        "run/c.avi": "run",
        "run/d_frames": "run",
        "loose.avi": None,
    }
    assert cache.info("run/c.avi")["source_path"] == str((root / "run" / "c.avi").resolve())


def test_csv_manifest_labels_and_splits(tmp_path):
    make_video(tmp_path / "clips" / "x.avi", 2)
    make_video(tmp_path / "clips" / "y.avi", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,split\nclips/x.avi,wave,train\nclips/y.avi,clap,test\n")
    pipeline.extract_videos([manifest], tmp_path / "c.h5", **FAST)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    assert cache.labels() == {"clips/x.avi": "wave", "clips/y.avi": "clap"}
    assert cache.info("clips/y.avi")["split"] == "test"


def test_bad_manifest_and_missing_input_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a.avi,l,train,extra\n")
    with pytest.raises(InputError, match=r"bad.csv, row 1"):
        discover([bad])
    with pytest.raises(InputError, match="no such file"):
        discover([tmp_path / "nope"])


def test_same_key_from_two_inputs_is_refused(tmp_path):
    make_video(tmp_path / "a" / "clip.avi", 2)
    make_video(tmp_path / "b" / "clip.avi", 2)
    with pytest.raises(InputError, match="same key 'clip.avi'"):
        discover([tmp_path / "a" / "clip.avi", tmp_path / "b" / "clip.avi"])


@pytest.fixture
def messy(tmp_path):
    """A folder holding every kind of bad input next to good ones. Returns (root, expected failures by key)."""
    root = tmp_path / "in"
    make_video(root / "good.avi", 4)
    make_video(root / "sp ace é 视频.mp4", 3)  # unicode and spaces
    make_video(root / "one_frame.avi", 1)
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("this is not a video\n" * 50)
    full = make_video(tmp_path / "full.mp4", 30)
    (root / "truncated.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # mp4v: index at the end
    corrupt = bytearray(make_video(tmp_path / "c.avi", 20).read_bytes())
    corrupt[200:] = np.random.default_rng(0).integers(0, 256, len(corrupt) - 200, dtype=np.uint8).tobytes()
    (root / "garbage.avi").write_bytes(bytes(corrupt))
    os.symlink(tmp_path / "missing.mp4", root / "broken_link.mp4")
    mixed = make_frame_folder(root / "mixed_sizes", 3)
    cv2.imwrite(str(mixed / "img_4.png"), cv2.cvtColor(pattern_frame(3, 40, 120), cv2.COLOR_RGB2BGR))
    gray = root / "gray"
    gray.mkdir()
    for i in range(3):
        cv2.imwrite(str(gray / f"{i}.png"), cv2.cvtColor(pattern_frame(i), cv2.COLOR_RGB2GRAY))
    rgba = root / "rgba"
    rgba.mkdir()
    for i in range(2):
        cv2.imwrite(str(rgba / f"{i}.png"), cv2.cvtColor(pattern_frame(i), cv2.COLOR_RGB2BGRA))
    bad_image = make_frame_folder(root / "bad_image", 2)
    (bad_image / "img_3.png").write_bytes(b"\x89PNG broken")
    expected_failures = {
        "zero.mp4": "empty file",
        "text.mp4": "cannot open it as a video",
        "truncated.mp4": "cannot open it as a video",
        "garbage.avi": "",  # any reason: corrupt data either fails to open or yields no frame
        "broken_link.mp4": "does not exist",
        "bad_image": "cannot decode image 'img_3.png'",
    }
    return root, expected_failures


def test_bad_inputs_are_reported_recorded_and_skipped(messy, tmp_path):
    root, expected = messy
    report = pipeline.extract_videos([root], tmp_path / "c.h5", **FAST)
    cache = pipeline.open_cache(tmp_path / "c.h5")
    good = {"good.avi", "sp ace é 视频.mp4", "one_frame.avi", "mixed_sizes", "gray", "rgba"}
    if "garbage.avi" not in report.failed:  # FFmpeg may salvage leading frames of a damaged file: fine, if real
        good.add("garbage.avi")
        expected.pop("garbage.avi")
    assert set(report.failed) == set(expected)
    for key, needle in expected.items():
        path, reason = report.failed[key]
        assert needle in reason and path.endswith(key)
    assert set(cache.keys()) == good
    assert cache.info("mixed_sizes")["mixed_frame_sizes"] and cache.features("mixed_sizes").shape == (4, 512)
    assert cache.features("gray").shape == (3, 512) and cache.features("rgba").shape == (2, 512)
    assert {f["key"]: f["reason"] for f in cache.failures()} == {k: report.failed[k][1] for k in report.failed}


def test_failed_inputs_exit_3_list_in_info_and_are_retried(messy, tmp_path):
    root, expected = messy
    out = tmp_path / "c.h5"
    args = [
        "extract",
        str(root),
        "-o",
        str(out),
        *FAST_ARGS,
        "--workers",
        "0",
        "-q",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_INPUTS_FAILED, result.output
    assert "zero.mp4: empty file (0 bytes)" in result.output
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and f"failures   {len(pipeline.open_cache(out).failures())}" in info.output
    assert "broken_link.mp4: file does not exist" in info.output

    # Fix two inputs and rerun: only the failed ones are tried again; the fixed ones succeed and leave the list.
    os.remove(root / "zero.mp4")
    make_video(root / "zero.mp4", 2)
    (root / "bad_image" / "img_3.png").unlink()
    report = pipeline.extract_videos([root], out, **FAST)
    assert set(report.extracted) == {"zero.mp4", "bad_image"}
    cache = pipeline.open_cache(out)
    assert "zero.mp4" in cache and "zero.mp4" not in {f["key"] for f in cache.failures()}
    assert "text.mp4" in {f["key"] for f in cache.failures()}


def test_decode_workers_start_after_opencv_used_its_thread_pool(tmp_path):
    """Forked decode workers must not hang when the parent process already ran OpenCV on a large image."""
    import subprocess
    import sys

    video = make_video(tmp_path / "v" / "a.avi", 3)
    script = (
        "import cv2, numpy as np, pipeline\n"
        "cv2.cvtColor(np.zeros((720, 1280, 3), np.uint8), cv2.COLOR_RGB2BGR)\n"
        f"r = pipeline.extract_videos([{str(video)!r}], {str(tmp_path / 'c.h5')!r}, backbone='resnet18',"
        " weights='none', resize=64, crop=56, workers=1, progress=False)\n"
        "assert r.ok and r.frames == 3\n"
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_progress_is_one_bar_in_frames_with_an_honest_total(tmp_path, capsys):
    root = tmp_path / "in"
    make_video(root / "short.avi", 4)
    make_video(root / "long.avi", 20)
    make_video(root / "mid.avi", 9)
    pipeline.extract_videos([root], tmp_path / "c.h5", **{**FAST, "progress": True})
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    # the one bar counts frames; once every video is done its total is exactly the frames extracted
    assert final.startswith("extract: 100%") and "33/33" in final and "3/3 videos" in final, final
    assert "video/s" not in err and "frames:" not in err  # no separate per-video bar
