"""Inputs that must never stop, hang or corrupt a run: link loops, names that are not UTF-8, files that
change, vanish or stop decoding, unreadable folders, bad manifests and option values, leftovers of crashed
runs."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import FAST, FAST_ARGS, TINY_HEAD, feature_cache, make_frame_folder, make_video, separable_videos
from typer.testing import CliRunner

import pipeline
from pipeline.cli import EXIT_INPUTS_FAILED, EXIT_OK, EXIT_USAGE, app
from pipeline.data.cache import CacheWriter, parts_dir
from pipeline.extract.inputs import InputError, discover

CLI_FAST = [
    *FAST_ARGS,
    "--workers",
    "0",
    "-q",
]


def extract_cli(*args: str):
    return CliRunner().invoke(app, ["extract", *args, *CLI_FAST])


# ------------------------------------------------------------------------------------------------- link loops
def test_symlink_loops_are_skipped_and_linked_videos_are_one_video(tmp_path, caplog):
    root = tmp_path / "videos"
    make_video(root / "jump" / "a.avi", 2)
    make_video(root / "run" / "b.avi", 2)
    os.symlink(".", root / "loop")  # enumerated every video ~40 times under `loop`
    os.symlink("..", root / "run" / "up")  # a second loop: together they made discovery endless
    os.symlink(root / "jump" / "a.avi", root / "alias.avi")  # the same file twice
    os.symlink(root / "run", root / "run_again")  # the same folder twice
    extra = make_video(tmp_path / "elsewhere" / "c.avi", 2)
    os.symlink(extra.parent, root / "linked")  # a link to a folder outside: followed

    with caplog.at_level(logging.WARNING):
        items = discover([root])
    assert sorted(i.key for i in items) == ["jump/a.avi", "linked/c.avi", "run/b.avi"]
    assert {i.key: i.label for i in items}["jump/a.avi"] == "jump"  # the direct path wins over the link
    warned = caplog.text
    for link in ("loop", "up", "alias.avi", "run_again"):
        assert f"{link}: " in warned, warned

    result = extract_cli(str(root), "-o", str(tmp_path / "c.h5"))
    assert result.exit_code == EXIT_OK, result.output
    assert sorted(pipeline.open_cache(tmp_path / "c.h5").keys()) == [
        "jump/a.avi",
        "linked/c.avi",
        "run/b.avi",
    ]


# ----------------------------------------------------------------------------------------- non-UTF-8 file
# names
def test_names_that_are_not_utf8_are_keys_that_round_trip(tmp_path):
    root = tmp_path / "in"
    make_video(root / "ok.avi", 2)
    latin1 = os.fsdecode(b"caf\xe9.avi")  # 'caf\udce9.avi': a Latin-1 name on a UTF-8 system
    make_video(root / "tmp.avi", 3)  # (written under a UTF-8 name: cv2 cannot take the other one)
    os.rename(root / "tmp.avi", root / latin1)
    escape = "\x1b[31mred.avi"  # a terminal escape sequence in a file name
    make_video(root / escape, 2)
    folder = os.fsdecode(b"fr\xe4mes")
    os.rename(make_frame_folder(root / "tmp_frames", 2), root / folder)
    (root / os.fsdecode(b"bad\xff.mp4")).write_text("not a video\n" * 20)
    out = tmp_path / "c.h5"

    result = extract_cli(str(root), "-o", str(out))
    assert result.exit_code == EXIT_INPUTS_FAILED, result.output
    assert "bad\\xff.mp4: OpenCV/FFmpeg cannot open it" in result.output  # the failed one, named, escaped
    assert "\x1b" not in result.output
    cache = pipeline.open_cache(out)
    assert sorted(cache.keys()) == sorted(["ok.avi", latin1, escape, folder])
    assert cache.features(latin1).shape == (3, 512) and cache.features(folder).shape == (2, 512)
    assert cache.info(latin1)["key"] == latin1 and Path(cache.info(latin1)["source_path"]).name == latin1
    assert [f["key"] for f in cache.failures()] == [os.fsdecode(b"bad\xff.mp4")]

    # With h5py alone: the raw file-name bytes, decoded as documented.
    with h5py.File(out) as f:
        keys = list(f["index/key"].asstr(errors="surrogateescape")[()])
    assert latin1 in keys

    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == EXIT_OK and "bad\\xff.mp4" in info.output and "\x1b" not in info.output

    again = pipeline.extract_videos([root], out, **FAST)  # the keys match again: resumed, nothing redone
    assert sorted(again.skipped) == sorted(cache.keys()) and list(again.failed) == [os.fsdecode(b"bad\xff.mp4")]


def test_train_head_and_evaluate_take_keys_that_are_not_utf8(tmp_path):
    videos = [
        (os.fsdecode(b"caf\xe9/") + key, x, label, split) for key, x, label, split in separable_videos(per_class=4)
    ]
    cache = feature_cache(tmp_path / "c.h5", videos)
    pipeline.train_head(cache, tmp_path / "run", head="meanpool", **{**TINY_HEAD, "epochs": 2})
    report = pipeline.evaluate(tmp_path / "run" / "best.pt", cache)
    assert report.metrics["videos"] + report.seen["videos"] == 12  # held-out videos scored, training ones apart


# --------------------------------------------------------------------------------- stale and orphaned entries
def test_video_that_changed_and_now_fails_is_no_longer_served(tmp_path):
    root = tmp_path / "in"
    make_video(root / "a.avi", 2)
    make_video(root / "b.avi", 3)
    out = tmp_path / "c.h5"
    pipeline.extract_videos([root], out, **FAST)
    (root / "b.avi").write_bytes(b"\x00" * 4000)  # replaced by a corrupt file
    report = pipeline.extract_videos([root], out, **FAST)
    assert list(report.failed) == ["b.avi"]
    cache = pipeline.open_cache(out)
    assert cache.keys() == ["a.avi"] and [f["key"] for f in cache.failures()] == ["b.avi"]
    assert len(list(parts_dir(out).rglob("*.h5"))) == 1


def test_vanished_sources_are_reported_and_removed_only_by_prune(tmp_path):
    root = tmp_path / "in"
    make_video(root / "a.avi", 2)
    make_video(root / "b.avi", 2)
    (root / "broken.avi").write_text("x")
    out = tmp_path / "c.h5"
    pipeline.extract_videos([root], out, **FAST)
    os.rename(root / "b.avi", root / "renamed.avi")
    (root / "broken.avi").unlink()

    assert extract_cli(str(root), "-o", str(out)).exit_code == EXIT_OK  # never pruned silently
    assert sorted(pipeline.open_cache(out).keys()) == ["a.avi", "b.avi", "renamed.avi"]
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == EXIT_OK
    assert "missing sources  1  (" in info.output and "--prune" in info.output and "b.avi" in info.output

    result = extract_cli(str(root), "-o", str(out), "--prune")
    assert result.exit_code == EXIT_OK, result.output
    assert "pruned b.avi" in result.output and "pruned broken.avi" in result.output
    cache = pipeline.open_cache(out)
    assert sorted(cache.keys()) == ["a.avi", "renamed.avi"] and cache.failures() == []
    assert "missing sources" not in CliRunner().invoke(app, ["info", str(out)]).output


def test_source_on_a_missing_disk_keeps_its_features(tmp_path):
    """A manifest whose file is gone fails, but the features extracted before stay (its disk may be
    unmounted)."""
    make_video(tmp_path / "disk" / "a.avi", 2)
    manifest = tmp_path / "list.csv"
    manifest.write_text("disk/a.avi,x\n")
    out = tmp_path / "c.h5"
    pipeline.extract_videos([manifest], out, **FAST)
    shutil.move(tmp_path / "disk", tmp_path / "unmounted")
    report = pipeline.extract_videos([manifest], out, **FAST)
    assert "does not exist" in report.failed["disk/a.avi"][1]
    assert pipeline.open_cache(out).features("disk/a.avi").shape == (2, 512)


# ------------------------------------------------------------------------------------------------ small ones
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_fps_must_be_finite(tmp_path, value):
    make_video(tmp_path / "a.avi", 2)
    result = extract_cli(str(tmp_path / "a.avi"), "-o", str(tmp_path / "c.h5"), "--fps", value)
    assert result.exit_code == EXIT_USAGE and "--fps must be a finite number > 0" in result.output
    assert not (tmp_path / "c.h5").exists()


def test_manifest_errors_name_the_rows(tmp_path):
    make_video(tmp_path / "a.avi", 2)
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n\n")
    with pytest.raises(InputError, match=r"empty.csv: no rows"):
        discover([empty])
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("path,label\na.avi,jump\nb.avi,run\n./a.avi,run\n")
    with pytest.raises(InputError, match=r"conflict.csv, rows 2 and 4: 'a.avi' is listed twice"):
        discover([conflict])
    twice = tmp_path / "twice.csv"
    twice.write_text("a.avi,jump\na.avi,jump\n")
    assert [i.key for i in discover([twice])] == ["a.avi"]
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\na.avi,jump\na.avi,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.csv, row 3: not UTF-8 text \(byte 0xe9\)"):
        discover([latin1])
    result = extract_cli(str(latin1), "-o", str(tmp_path / "c.h5"))
    assert result.exit_code == EXIT_USAGE and "row 3" in result.output

    # The one exception: a path cell holding the raw bytes of an existing file's name (as `ls > list.csv`
    # writes it).
    os.rename(tmp_path / "a.avi", tmp_path / os.fsdecode(b"\xe9t\xe9.avi"))
    raw = tmp_path / "raw.csv"
    raw.write_bytes(b"\xe9t\xe9.avi,jump\n")
    assert [(i.key, i.label) for i in discover([raw])] == [(os.fsdecode(b"\xe9t\xe9.avi"), "jump")]


def test_unreadable_subfolder_is_reported_and_the_rest_extracted(tmp_path, monkeypatch):
    root = tmp_path / "in"
    make_video(root / "ok" / "a.avi", 2)
    make_video(root / "locked" / "b.avi", 2)
    real_scandir = os.scandir

    def scandir(path="."):  # what chmod 000 does for a user other than root (the tests run as root)
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = extract_cli(str(root), "-o", str(tmp_path / "c.h5"))
    assert result.exit_code == EXIT_INPUTS_FAILED, result.output
    assert f"{root / 'locked'}: cannot list the folder (Permission denied)" in result.output
    assert pipeline.open_cache(tmp_path / "c.h5").keys() == ["ok/a.avi"]


def test_leftover_temp_index_of_a_dead_run_is_removed(tmp_path):
    make_video(tmp_path / "v" / "a.avi", 2)
    out = tmp_path / "c.h5"
    pipeline.extract_videos([tmp_path / "v"], out, **FAST)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = tmp_path / f".c.h5.{int(gone.stdout)}.tmp"
    alive = tmp_path / f".c.h5.{os.getppid()}.tmp"  # a live process's file (e.g. a pack in progress) is left alone
    dead.write_bytes(b"half an index")
    alive.write_bytes(b"being written")
    pipeline.extract_videos([tmp_path / "v"], out, **FAST)
    assert not dead.exists() and alive.exists()


def test_reader_of_a_cache_being_written_warns_once_and_only_when_no_writer_runs(tmp_path, caplog):
    out = feature_cache(tmp_path / "c.h5", separable_videos(per_class=2))
    spec = pipeline.open_cache(out).spec
    writer = CacheWriter(out, spec, "float16")  # holds the lock, as a running extraction does
    part = writer.begin("new.avi", spec.dim)  # a finished video the index does not list yet
    part.append(np.zeros((2, spec.dim), np.float32), np.arange(2), np.arange(2) / 25)
    part.commit({"key": "new.avi", "spec_id": spec.id})
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            assert len(pipeline.open_cache(out)) == 6
        assert "not in the index yet" not in caplog.text  # a run is writing: being behind is normal
        info = CliRunner().invoke(app, ["info", str(out)])
        assert info.exit_code == EXIT_OK and "is writing to this cache now" in info.output
        writer.close()
        for _ in range(50):
            pipeline.open_cache(out)
    assert caplog.text.count("not in the index yet") == 1
