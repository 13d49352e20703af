"""Extraction shared by several processes: torchrun ranks (gloo on CPU) and --shard i/n, then one merged cache."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, FAST_ARGS, make_video
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.data import cache as cache_module
from pipeline.data.cache import CacheError, CacheWriter, merge, open_cache, parts_dir

ARGS = [
    *FAST_ARGS,
    "--dtype",
    "float32",
    "--workers",
    "0",
    "-q",
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist") / "videos"
    for k in range(10):  # uneven lengths, so balancing by size matters
        make_video(root / f"c{k % 3}" / f"v{k}.avi", 4 + 3 * (k % 4), offset=k)
    return root


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    pipeline.extract_videos([videos], out, **{**FAST, "dtype": "float32"})
    return open_cache(out)


def assert_same_cache(got, ref):
    assert sorted(got.keys()) == sorted(ref.keys())
    assert got.spec.id == ref.spec.id
    for key in ref.keys():
        np.testing.assert_array_equal(got.frame_indices(key), ref.frame_indices(key))
        np.testing.assert_allclose(got.features(key), ref.features(key), rtol=1e-5, atol=1e-5)
        assert got.label(key) == ref.label(key)


def torchrun(videos: Path, out: Path, nproc: int = 2) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "pipeline",
        "extract",
        str(videos),
        "-o",
        str(out),
        *ARGS,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(videos, reference, tmp_path):
    out = tmp_path / "c.h5"
    proc = torchrun(videos, out)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    cache = open_cache(out)
    assert_same_cache(cache, reference)
    shards = cache.shards()
    assert set(shards) == {"0/2", "1/2"} and sum(shards.values()) == 10 and min(shards.values()) >= 3
    info = CliRunner().invoke(app, ["info", str(out)])
    assert "shards     2   0/2:" in info.output


@pytest.mark.slow
def test_killed_rank_then_rerun_does_only_missing_videos(videos, reference, tmp_path):
    out = tmp_path / "c.h5"
    proc = torchrun(videos, out)
    pdir = parts_dir(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if pdir.is_dir() and len(list(pdir.rglob("*.h5"))) >= 3:
            break
        time.sleep(0.005)
    ranks = children(proc.pid)
    assert ranks, "no rank process found"
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun then stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    with pytest.raises(FileNotFoundError, match="pipeline merge"):
        open_cache(out)  # no index yet: the ranks never reached the merge
    before = {p.name: p.stat().st_mtime_ns for p in pdir.rglob("*.h5")}
    assert 3 <= len(before) < 10

    proc = torchrun(videos, out)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    after = {p.name: p.stat().st_mtime_ns for p in pdir.rglob("*.h5")}
    assert len(after) == 10 and all(after[name] == mtime for name, mtime in before.items())
    assert not list(pdir.rglob(".*.tmp"))
    assert_same_cache(open_cache(out), reference)


def test_shards_then_merge_and_other_world_size_resumes(videos, reference, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    opts = {**FAST, "dtype": "float32"}
    first = pipeline.extract_videos([videos], out, shard="0/2", **opts)
    with pytest.raises(FileNotFoundError, match="pipeline merge"):
        open_cache(out)
    second = pipeline.extract_videos([videos], out, shard="1/2", **opts)
    assert not set(first.extracted) & set(second.extracted)
    assert len(first.extracted) + len(second.extracted) == 10
    # Each shard left the index rows of its parts: the merge opens no part (fast at 500,000 videos)
    tables = sorted(p.name for p in parts_dir(out).glob(".index.shard-*"))
    assert tables == [".index.shard-0-of-2", ".index.shard-1-of-2"]
    opened = []
    monkeypatch.setattr(cache_module, "_part_row", lambda part: opened.append(part))
    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 0 and "10 videos" in result.output
    assert opened == [] and not list(parts_dir(out).glob(".index.shard-*"))
    monkeypatch.undo()
    assert_same_cache(open_cache(out), reference)
    for i in range(3):  # another world size finds everything done
        report = pipeline.extract_videos([videos], out, shard=f"{i}/3", **opts)
        assert report.extracted == [] and len(report.skipped) >= 3


def test_merge_refuses_other_spec_and_running_writers(videos, tmp_path):
    out = tmp_path / "c.h5"
    pipeline.extract_videos([videos], out, shard="0/2", **FAST)
    other = tmp_path / "other.h5"
    pipeline.extract_videos([videos], other, shard="1/2", **{**FAST, "crop": 48})
    for part in parts_dir(other).rglob("*.h5"):  # a shard of another spec lands in this cache's folder
        target = parts_dir(out) / part.relative_to(parts_dir(other))
        target.parent.mkdir(exist_ok=True)
        shutil.copy(part, target)
    with pytest.raises(CacheError, match="another feature spec"):
        merge(out)
    for part in parts_dir(other).rglob("*.h5"):
        (parts_dir(out) / part.relative_to(parts_dir(other))).unlink()
    writer = CacheWriter(out, _spec_of(out), "float16", shard=(1, 2))  # a shard still running
    try:
        with pytest.raises(CacheError, match="another extraction is writing"):
            merge(out)
    finally:
        writer.close()
    assert merge(out) == len(list(parts_dir(out).rglob("*.h5")))


def _spec_of(cache: Path):
    import json

    from pipeline.spec import FeatureSpec

    return FeatureSpec.from_dict(json.loads((parts_dir(cache) / "spec.json").read_text())["spec"])


def test_shard_option_errors():
    result = CliRunner().invoke(app, ["extract", ".", "-o", "x.h5", "--shard", "2/2"])
    assert result.exit_code == 2 and "0 <= i < n" in result.output
    result = CliRunner().invoke(app, ["extract", ".", "-o", "x.h5", "--shard", "0/2", "--overwrite"])
    assert result.exit_code == 2 and "--overwrite cannot be combined with --shard" in result.output


# ----------------------------------------------------------------------------------------- two nodes, rendezvous
def test_node_ranks_shares_cores_and_the_merger():
    from pipeline.extract.distributed import Distributed

    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    second = Distributed.parse(None, {**env, "RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1"})
    assert second.shard == (3, 4) and (second.node, second.local_rank, second.local_world) == (1, 1, 2)
    assert second.threads(None, 16) == 8 and second.threads(3, 16) == 3  # its node's 16 cores, shared by 2 ranks
    assert not second.merges  # a node's local rank 0 is not the merger: only global rank 0 is
    assert not Distributed.parse(None, {**env, "RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1"}).merges
    assert Distributed.parse(None, {**env, "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}).merges
    assert second.describe() == "rank 3/4 (node 1, local rank 1/2)"
    assert Distributed.parse("1/3", {}).shard == (1, 3) and not Distributed.parse("1/3", {}).merges


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(videos: Path, out: Path, rank: int, port: int, run_id: str) -> subprocess.Popen:
    """One node of two (two ranks each), meeting the other through torchrun's c10d rendezvous on localhost."""
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank)),
        *("--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}"),
        *("--rdzv-id", run_id, "--max-restarts", "0"),
        *("-m", "pipeline", "extract", str(videos), "-o", str(out), *ARGS),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def two_nodes(videos: Path, out: Path, run_id: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    port = free_port()
    return node(videos, out, 0, port, run_id), node(videos, out, 1, port, run_id)


@pytest.fixture(scope="module")
def more_videos(tmp_path_factory):
    """20 videos: enough work per rank that a node can be killed while every rank is mid-run."""
    root = tmp_path_factory.mktemp("nodes") / "videos"
    for k in range(20):
        make_video(root / f"c{k % 4}" / f"v{k}.avi", 8 + 3 * (k % 4), offset=k)
    return root


@pytest.fixture(scope="module")
def one_thread_reference(more_videos, tmp_path_factory):
    """A one-process run with the one thread each rank gets (2 cores shared by a node's 2 ranks): the same bytes."""
    out = tmp_path_factory.mktemp("ref1") / "ref.h5"
    pipeline.extract_videos([more_videos], out, **{**FAST, "dtype": "float32", "threads": 1})
    return open_cache(out)


def assert_same_bytes(got, ref):
    assert sorted(got.keys()) == sorted(ref.keys()) and got.spec.id == ref.spec.id
    for key in ref.keys():
        np.testing.assert_array_equal(got.features(key), ref.features(key))
        np.testing.assert_array_equal(got.frame_indices(key), ref.frame_indices(key))


@pytest.mark.slow
def test_two_nodes_through_the_rendezvous_then_one_killed_and_both_rerun(more_videos, one_thread_reference, tmp_path):
    videos = more_videos
    out = tmp_path / "c.h5"
    first, second = two_nodes(videos, out, "whole")
    logs = [p.communicate(timeout=300)[0].decode() for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, logs
    cache = open_cache(out)
    assert_same_bytes(cache, one_thread_reference)
    shards = cache.shards()  # global ranks 0..3 of both nodes: each video once, by the rank that owns it
    assert set(shards) == {"0/4", "1/4", "2/4", "3/4"} and sum(shards.values()) == 20
    assert not list(parts_dir(out).glob(".index.shard-*"))  # the one merger took every rank's table

    out = tmp_path / "killed.h5"
    first, second = two_nodes(videos, out, "killed")
    pdir = parts_dir(out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None and second.poll() is None:
        if pdir.is_dir() and list(pdir.rglob("*.h5")):  # the first video is done: every rank is mid-run
            break
        time.sleep(0.005)
    ranks = children(second.pid)  # node 1 is lost: both its ranks and its launcher
    assert len(ranks) == 2, ranks
    for pid in [*ranks, second.pid]:
        os.kill(pid, signal.SIGKILL)
    second.wait()
    log = first.communicate(timeout=180)[0].decode()  # node 0's ranks lose their peers: the job fails
    assert first.returncode != 0, log
    with pytest.raises(FileNotFoundError, match="pipeline merge"):
        open_cache(out)
    before = {p.name: p.stat().st_mtime_ns for p in pdir.rglob("*.h5")}
    assert 1 <= len(before) < 20

    first, second = two_nodes(videos, out, "rerun")
    logs = [p.communicate(timeout=300)[0].decode() for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, logs
    after = {p.name: p.stat().st_mtime_ns for p in pdir.rglob("*.h5")}
    assert len(after) == 20 and all(after[name] == mtime for name, mtime in before.items())  # nothing redone
    assert not list(pdir.rglob(".*.tmp"))
    assert_same_bytes(open_cache(out), one_thread_reference)
