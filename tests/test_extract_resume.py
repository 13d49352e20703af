"""Resume, change detection, spec mismatch refusal, and kill -9 of a real extraction process at several points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import FAST, descendants, make_video, survivors

import pipeline
from pipeline.data.cache import CacheError, parts_dir


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    for k in range(4):
        make_video(root / "cls" / f"v{k}.avi", 5 + k, offset=k * 10)
    return root


def test_rerun_skips_finished_videos_and_changes_nothing(videos, tmp_path):
    out = tmp_path / "c.h5"
    first = pipeline.extract_videos([videos], out, **FAST)
    assert len(first.extracted) == 4 and not first.skipped
    parts = {p.name: p.stat().st_mtime_ns for p in parts_dir(out).rglob("*.h5")}
    before = {k: pipeline.open_cache(out).features(k) for k in pipeline.open_cache(out).keys()}
    second = pipeline.extract_videos([videos], out, **FAST)
    assert second.extracted == [] and sorted(second.skipped) == sorted(before) and second.frames == 0
    assert {p.name: p.stat().st_mtime_ns for p in parts_dir(out).rglob("*.h5")} == parts
    cache = pipeline.open_cache(out)
    for k, f in before.items():
        np.testing.assert_array_equal(cache.features(k), f)


def test_changed_video_is_redone_and_new_video_added(videos, tmp_path):
    out = tmp_path / "c.h5"
    pipeline.extract_videos([videos], out, **FAST)
    old = pipeline.open_cache(out).features("cls/v1.avi")
    time.sleep(0.01)
    make_video(videos / "cls" / "v1.avi", 9, offset=500)  # new content, new size and mtime
    make_video(videos / "cls" / "v9.avi", 3)
    report = pipeline.extract_videos([videos], out, **FAST)
    assert sorted(report.extracted) == ["cls/v1.avi", "cls/v9.avi"] and len(report.skipped) == 3
    cache = pipeline.open_cache(out)
    assert cache.features("cls/v1.avi").shape == (9, 512) and old.shape == (6, 512)
    assert len(cache) == 5 and len(list(parts_dir(out).rglob("*.h5"))) == 5


@pytest.mark.parametrize(
    "change", [{"backbone": "resnet34"}, {"stride": 2}, {"crop": 48}, {"dtype": "float32"}, {"weights": "SEEDFILE"}]
)
def test_other_spec_into_existing_cache_is_refused_or_overwritten(videos, tmp_path, change, resnet18_state_file):
    out = tmp_path / "c.h5"
    pipeline.extract_videos([videos], out, **FAST)
    if change.get("weights") == "SEEDFILE":
        change = {"weights": str(resnet18_state_file)}
    options = {**FAST, **change}
    with pytest.raises(CacheError, match="another spec") as err:
        pipeline.extract_videos([videos], out, **options)
    assert "--overwrite" in str(err.value) and list(change)[0] in str(err.value)
    assert len(pipeline.open_cache(out)) == 4  # nothing lost
    report = pipeline.extract_videos([videos], out, overwrite=True, **options)
    assert len(report.extracted) == 4
    cache = pipeline.open_cache(out)
    key, value = next(iter(change.items()))
    recorded = {
        "backbone": cache.spec.backbone,
        "stride": cache.spec.sampling.stride,
        "crop": cache.spec.preprocessing.crop,
        "dtype": cache.dtype,
        "weights": str(resnet18_state_file) if cache.spec.weights == resnet18_state_file.name else None,
    }
    assert recorded[key] == value


def test_foreign_file_at_output_is_refused(tmp_path, videos):
    out = tmp_path / "mine.h5"
    with h5py.File(out, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(CacheError, match="not a pipeline feature cache"):
        pipeline.extract_videos([videos], out, **FAST)
    with h5py.File(out, "r") as f:
        assert list(f["x"][()]) == [1, 2, 3]


def test_cache_is_plain_hdf5(videos, tmp_path):
    """The documented layout, read with h5py alone."""
    out = tmp_path / "c.h5"
    pipeline.extract_videos([videos], out, **FAST)
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "pipeline-feature-cache" and f.attrs["schema_version"] == 1
        keys = list(f["index/key"].asstr()[()])
        ids = list(f["index/id"].asstr()[()])
        assert sorted(keys) == [f"cls/v{k}.avi" for k in range(4)]
        g = f["videos"][ids[keys.index("cls/v2.avi")]]
        assert g["features"].shape == (7, 512) and g["features"].dtype == np.float16
        assert list(g["frame_indices"][()]) == list(range(7)) and g.attrs["label"] == "cls"
        assert g.attrs["decoded_frames"] == 7 and g.attrs["width"] == 96 and g.attrs["height"] == 72


# ------------------------------------------------------------------------------------------------- kill -9 tests
CRASH_ARGS = [
    "--backbone",
    "resnet18",
    "--weights",
    "none",
    "--resize",
    "128",
    "--crop",
    "112",
    "--dtype",
    "float32",
    "--batch-size",
    "4",
    "--threads",
    "1",
    "--workers",
    "2",
    "-q",
]


def _launch(videos: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", str(videos), "-o", str(out), *CRASH_ARGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, out: Path, parts: int | None, after_s: float | None = None) -> int:
    """SIGKILL the extraction process once `parts` videos are committed (or after `after_s` seconds); every
    process it started must be gone 2 s later."""
    start = time.monotonic()
    pdir = parts_dir(out)
    below = []
    while proc.poll() is None and time.monotonic() - start < 120:
        below = descendants(proc.pid) or below  # its decode workers, once started
        done = len(list(pdir.rglob("*.h5"))) if pdir.is_dir() else -1
        if (parts is not None and done >= parts) or (after_s is not None and time.monotonic() - start >= after_s):
            break
        time.sleep(0.005)
    proc.kill()  # kill -9 of the main process only, as a user or the OOM killer would
    proc.wait()
    left = survivors(below, within_s=2.0)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"decode workers {left} outlived the killed run"
    return len(list(pdir.rglob("*.h5"))) if pdir.is_dir() else 0


@pytest.mark.slow
def test_kill_9_at_several_points_then_rerun_equals_uninterrupted_run(tmp_path):
    videos = tmp_path / "videos"
    for k in range(10):
        make_video(videos / f"c{k % 2}" / f"v{k}.avi", 12, offset=k * 3)
    reference = tmp_path / "ref.h5"
    proc = _launch(videos, reference)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    out = tmp_path / "crash.h5"
    seen = []
    for parts, after_s in ((None, 0.5), (0, None), (2, None), (5, None), (None, 2.5), (8, None)):
        done = _kill_when(_launch(videos, out), out, parts, after_s)
        seen.append(done)
        if out.exists():  # whatever moment it died, the cache it leaves is readable, without duplicates
            cache = pipeline.open_cache(out)
            assert len(set(cache.keys())) == len(cache.keys()) <= done
            for key in cache.keys():
                assert cache.features(key).shape == (12, 512)
    print("parts committed at each kill:", seen)
    assert seen[-1] > 0, f"the kills never landed mid-run: {seen}"
    proc = _launch(videos, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    ref, got = pipeline.open_cache(reference), pipeline.open_cache(out)
    assert sorted(got.keys()) == sorted(ref.keys()) and len(got) == 10
    assert sorted(p.name for p in parts_dir(out).rglob("*.tmp")) == []
    assert len(list(parts_dir(out).rglob("*.h5"))) == 10 and got.unindexed_parts() == 0
    for key in ref.keys():
        np.testing.assert_array_equal(got.frame_indices(key), ref.frame_indices(key))
        # Bit for bit: every forward pass has one shape, so how the kills split the batches changes nothing.
        assert got.features(key).tobytes() == ref.features(key).tobytes(), key
        assert got.label(key) == ref.label(key)
