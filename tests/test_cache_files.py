"""The cache as files: moved, copied without its parts, damaged, packed into one file, and extracted into
again."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest
from helpers import FAST, TINY_HEAD, feature_cache, make_video, separable_videos
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_ERROR, EXIT_OK, app
from pipeline.data.cache import CacheError, open_cache, pack, parts_dir


def all_features(path) -> dict[str, np.ndarray]:
    cache = open_cache(path)
    return {k: cache.features(k) for k in cache}


@pytest.fixture
def cache_file(tmp_path):
    """A small cache of parts written from arrays (no video, no CNN): 6 videos of 16-d features."""
    return feature_cache(tmp_path / "c.h5", separable_videos(classes=3, per_class=2))


def test_renamed_cache_reads_under_its_new_name(cache_file, tmp_path):
    before = all_features(cache_file)
    shutil.move(cache_file, tmp_path / "d.h5")
    shutil.move(parts_dir(cache_file), tmp_path / "d.h5.parts")
    after = all_features(tmp_path / "d.h5")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "d.h5"), "--check"])
    assert result.exit_code == EXIT_OK and "check      all 6 videos read and match the index" in result.output


def test_index_copied_without_its_parts_fails_in_one_line(tiny_run, tmp_path):
    cache_file, run = tiny_run
    lone = tmp_path / "elsewhere" / "cache.h5"
    lone.parent.mkdir()
    shutil.copy(cache_file, lone)
    message = "needs its parts folder cache.h5.parts/ (not found beside it): copy it along, or make one"
    with pytest.raises(CacheError, match=re.escape(message)):
        open_cache(lone)
    for args in (
        ["info", str(lone)],
        ["train-head", str(lone), "--out", str(tmp_path / "run"), "-q"],
        ["evaluate", str(run / "best.pt"), str(lone), "-q"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == EXIT_ERROR, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_damaged_part_is_named_in_one_line_found_by_check_and_redone_by_extract(tmp_path):
    for k in range(3):  # three per class, so that train-head can split them
        make_video(tmp_path / "v" / "a" / f"x{k}.avi", 2, offset=k)
        make_video(tmp_path / "v" / "b" / f"y{k}.avi", 2, offset=10 + k)
    out = tmp_path / "c.h5"
    pipeline.extract_videos([tmp_path / "v"], out, **FAST)
    part = open_cache(out).part_path("b/y1.avi")
    part.write_bytes(part.read_bytes()[:1500])  # truncated: a full disk, an interrupted copy

    with pytest.raises(CacheError) as caught:
        open_cache(out).features("b/y1.avi")
    text = str(caught.value)
    assert "'b/y1.avi'" in text and str(part) in text and "rerun the `pipeline extract` command" in text
    assert "\n" not in text

    result = CliRunner().invoke(app, ["info", str(out), "--check"])
    assert result.exit_code == EXIT_ERROR and "damaged    1 videos" in result.output
    assert "  b/y1.avi: " in result.output and "x0.avi:" not in result.output
    head = CliRunner().invoke(
        app,
        ["train-head", str(out), "--out", str(tmp_path / "run"), "--epochs", "1", "--clip-len", "0", "-q"],
    )
    assert head.exit_code == EXIT_ERROR and "'b/y1.avi'" in head.output, head.output
    assert len(head.output.strip().splitlines()) == 1, head.output  # no h5py traceback

    report = pipeline.extract_videos([tmp_path / "v"], out, **FAST)
    assert report.extracted == ["b/y1.avi"] and len(report.skipped) == 5
    assert CliRunner().invoke(app, ["info", str(out), "--check"]).exit_code == EXIT_OK


def test_pack_writes_one_plain_hdf5_file_every_reader_reads(cache_file, tmp_path):
    before = all_features(cache_file)
    packed = tmp_path / "alone" / "p.h5"
    packed.parent.mkdir()
    result = CliRunner().invoke(app, ["pack", str(cache_file), "-o", str(packed)])
    assert result.exit_code == EXIT_OK and "6 videos in one file" in result.output, result.output
    assert parts_dir(cache_file).is_dir() and not parts_dir(packed).exists()
    assert [p.name for p in packed.parent.iterdir()] == ["p.h5"]  # no temporary file left

    with h5py.File(packed) as f:  # h5py alone, the documented access path
        keys = list(f["index/key"].asstr()[()])
        ids = list(f["index/id"].asstr()[()])
        ds = f["videos"][ids[0]]["features"]
        assert ds.compression is None and ds.chunks == (ds.shape[0], 16)  # (min(256, T), D)
        assert np.array_equal(ds[()], before[keys[0]])
        assert f["videos"][ids[0]].attrs["key"] == keys[0] and f.attrs["layout"] == "packed"
    after = all_features(packed)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert open_cache(packed).info(keys[0])["label"] == open_cache(cache_file).label(keys[0])

    info = CliRunner().invoke(app, ["info", str(packed), "--check"])
    assert info.exit_code == EXIT_OK and "one packed file" in info.output
    run = pipeline.train_head(packed, tmp_path / "run", head="meanpool", **{**TINY_HEAD, "epochs": 2})
    assert (tmp_path / "run" / "best.pt").exists() and run is not None


def test_pack_in_place_then_extract_again_resumes(tmp_path):
    videos = tmp_path / "v"
    make_video(videos / "a.avi", 3)
    make_video(videos / "b.avi", 2)
    out = tmp_path / "c.h5"
    pipeline.extract_videos([videos], out, **FAST)
    before = all_features(out)
    assert pack(out).videos == 2
    assert not parts_dir(out).exists() and open_cache(out).packed and all_features(out).keys() == before.keys()

    make_video(videos / "c.avi", 4)
    report = pipeline.extract_videos([videos], out, **FAST, pack=True)
    assert report.skipped == ["a.avi", "b.avi"] and report.extracted == ["c.avi"] and report.packed
    cache = open_cache(out)
    assert cache.packed and not parts_dir(out).exists() and sorted(cache.keys()) == ["a.avi", "b.avi", "c.avi"]
    assert np.array_equal(cache.features("a.avi"), before["a.avi"]) and cache.features("c.avi").shape == (
        4,
        512,
    )


def test_cache_written_before_the_layout_attribute_still_reads(cache_file):
    """Caches of the earlier code have no `layout` attribute and are read through their parts folder."""
    before = all_features(cache_file)
    with h5py.File(cache_file, "r+") as f:
        del f.attrs["layout"]
    cache = open_cache(cache_file)
    assert not cache.packed and all(np.array_equal(cache.features(k), before[k]) for k in before)


def test_parts_live_in_subfolders_by_id_and_plain_h5py_follows_the_index(tmp_path):
    out = feature_cache(tmp_path / "c.h5", separable_videos(classes=4, per_class=10))
    parts = parts_dir(out)
    files = sorted(parts.rglob("*.h5"))
    assert len(files) == 40 and not list(parts.glob("*.h5"))  # none left at the top
    for f in files:
        assert f.parent.parent == parts and f.name.startswith(f.parent.name) and len(f.parent.name) == 2
    cache = open_cache(out)
    with h5py.File(out, "r") as f:  # the index's external links name the subfolder
        vid = cache._row("class1/vid_003.mp4")["id"]
        np.testing.assert_array_equal(f[f"videos/{vid}/features"][()], cache.features("class1/vid_003.mp4"))
        assert f.attrs["parts_layout"] == "nested"
    (cache.part_path("class2/vid_000.mp4")).unlink()
    assert cache.missing_parts() == ["class2/vid_000.mp4"]
