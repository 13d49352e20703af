"""A cache of hundreds of thousands of small videos: what the index, resume, `info`, train-head's load and `pack`
cost as it grows, and the files and inodes it takes.

    python bench/scale.py --dir /tmp/scale --size 100000          # write up to 100,000 videos, then measure
    python bench/scale.py --dir /tmp/scale --size 500000 --skip pack load   # grow the same cache, measure again

Videos are a few rows of small features (--rows x --dim float16), written as two shards by two processes through
the real writer (CacheWriter(shard=(i, 2)), as torchrun ranks or a Slurm array write them), so the cache has the
layout and the shard tables of a real sharded extraction. Writing resumes: a larger --size adds only the new
videos. Each step is timed in this process (the `info` step as a fresh `pipeline info` process):

  merge        building CACHE.h5 after the sharded writes (`pipeline merge`), from the shards' tables
  merge-cold   the same with no shard table (parts copied in from elsewhere): every part opened once
  reindex      an unsharded writer opening the cache: CACHE.h5 rebuilt from the index it replaces (stat only)
  resume       what a rerun does before extracting: open the writer, then `is_done` for every video
  info         `pipeline info CACHE.h5`, a new process
  load         train-head's read of the whole cache into memory (load_labelled, --memory ram)
  pack         `pipeline pack CACHE.h5 -o packed.h5` (the packed copy is deleted afterwards)

Results go to stdout as one table row per step, with microseconds per video, so that runs at several sizes show
whether a step grows linearly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import load_average, machine  # bench/common.py, beside this script

from pipeline.config import TrainConfig
from pipeline.data.cache import CacheWriter, merge, open_cache, pack, part_file, parts_dir, video_id
from pipeline.data.labelled import load_labelled
from pipeline.data.synthetic import synthetic_spec

CLASSES = 400  # Kinetics-400-like labels
STEPS = ("merge", "merge-cold", "reindex", "resume", "info", "load", "pack")


def key_of(k: int) -> str:
    return f"class{k % CLASSES:03d}/video_{k:07d}.mp4"


def write_shard(path: Path, shard: int, size: int, rows: int, dim: int) -> int:
    """Write the videos k < size with k % 2 == shard that are not there yet; returns how many were written."""
    spec = synthetic_spec(dim, backbone="resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")
    writer = CacheWriter(path, spec, "float16", shard=(shard, 2))
    rng = np.random.default_rng(shard)
    bank = rng.standard_normal((4096, dim)).astype(np.float32)
    parts = parts_dir(path)
    written = 0
    try:
        for k in range(shard, size, 2):
            key = key_of(k)
            if part_file(parts, video_id(key)).exists():
                continue
            start = int(rng.integers(0, len(bank) - rows))
            part = writer.begin(key, dim)
            part.append(bank[start : start + rows], np.arange(rows), np.arange(rows) / 25.0)
            part.commit(
                {
                    "key": key,
                    "label": f"class{k % CLASSES:03d}",
                    "split": "",
                    "source_path": f"/data/kinetics/{key}",
                    "source_size": rows,
                    "source_mtime_ns": k,
                    "kind": "video",
                    "spec_id": spec.id,
                    "shard": f"{shard}/2",
                }
            )
            written += 1
    finally:
        writer.close()
    return written


def files_and_inodes(path: Path) -> dict:
    parts = parts_dir(path)
    per_folder = Counter()
    nbytes = nfiles = 0
    for root, dirs, files in os.walk(parts):
        per_folder[root] = len(files) + len(dirs)
        for name in files:
            nfiles += 1
            nbytes += os.lstat(os.path.join(root, name)).st_blocks * 512
    folders = len(per_folder)
    return {
        "files": nfiles + 1,  # + the index
        "folders": folders,
        "inodes": nfiles + folders + 1,
        "largest_folder": max(per_folder.values()),
        "top_folder": per_folder[str(parts)],
        "disk_MB": (nbytes + path.stat().st_blocks * 512) / 1e6,
        "index_MB": path.stat().st_size / 1e6,
    }


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the cache lives (kept between runs)")
    ap.add_argument("--size", type=int, default=500_000, help="videos in the cache (written as needed)")
    ap.add_argument("--rows", type=int, default=4, help="rows (frames) per video")
    ap.add_argument("--dim", type=int, default=16, help="feature dimensions")
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS, help="steps not to run")
    ap.add_argument("--write-only", action="store_true", help="write up to --size videos and stop")
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "cache.h5"
    print(f"# {machine()}; load {load_average()}", flush=True)
    t = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        written = sum(pool.starmap(write_shard, [(path, s, args.size, args.rows, args.dim) for s in (0, 1)]))
    seconds = time.perf_counter() - t
    if written:
        print(f"# wrote {written} videos in {seconds:.0f} s ({1e6 * seconds / written:.0f} us/video, 2 processes)")
    if args.write_only:
        return
    n = args.size
    results: dict[str, float] = {}

    def step(name: str, fn) -> None:
        if name in args.skip:
            return
        results[name] = timed(fn)
        print(f"{name:11s} {n:8d} videos  {results[name]:8.2f} s  {1e6 * results[name] / n:8.1f} us/video", flush=True)

    spec = json.loads((parts_dir(path) / "spec.json").read_text())
    tables = sorted(parts_dir(path).glob(".index.shard-*"))
    if not tables and "merge" not in args.skip:  # merged before: set the shard tables aside again
        print("# no shard tables (merged before): the merge step below rebuilds from CACHE.h5", file=sys.stderr)
    step("merge", lambda: merge(path))
    if "merge-cold" not in args.skip:
        path.unlink()  # no index, no table: every part must be opened
        step("merge-cold", lambda: merge(path))

    def reindex() -> None:
        from pipeline.spec import FeatureSpec

        CacheWriter(path, FeatureSpec.from_dict(spec["spec"]), spec["dtype"]).close()

    step("reindex", reindex)

    def resume() -> None:
        from pipeline.spec import FeatureSpec

        writer = CacheWriter(path, FeatureSpec.from_dict(spec["spec"]), spec["dtype"])
        try:
            done = sum(writer.is_done(key_of(k), args.rows, k) for k in range(n))
        finally:
            writer.close()
        assert done == n, f"{n - done} videos not found done"

    step("resume", resume)

    def info() -> None:
        exe = Path(sys.executable).with_name("pipeline")
        out = subprocess.run([str(exe), "info", str(path)], capture_output=True, text=True, check=True).stdout
        assert f"videos     {n}" in out, out

    step("info", info)

    def load() -> None:
        cfg = TrainConfig(out=args.dir / "run", memory="ram")
        cfg = replace(cfg, runtime=replace(cfg.runtime, progress=False))
        data = load_labelled(path, cfg)
        assert len(data.store.keys) == n, len(data.store.keys)

    step("load", load)

    def packed() -> None:
        result = pack(path, args.dir / "packed.h5")
        assert result.videos == n
        (args.dir / "packed.h5").unlink()

    step("pack", packed)
    usage = files_and_inodes(path)
    print("files      " + "  ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in usage.items()))
    assert open_cache(path).keys()[:1]
    shutil.rmtree(args.dir / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
