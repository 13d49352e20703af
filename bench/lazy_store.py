"""Training on a cache larger than the memory the process may use: `--memory lazy` under a memory limit against
`--memory ram` on a cache that fits, and where the difference goes.

    python bench/lazy_store.py --dir /tmp/lazy                      # 2.4 GB cache, 1 GiB limit: about 6 minutes
    python bench/lazy_store.py --dir /tmp/lazy --limit-mb 512 --epochs 2

Two caches of the same videos' shape (--rows x --dim float16): a large one (--videos) and a small one (a quarter
of it). Each run is a real `pipeline train-head` process (--epochs, the default head), timed by its own
metrics.csv (train seconds per epoch), reported as rows per second so that the two caches compare:

  ram-small     --memory ram on the small cache (it fits): the in-memory speed
  lazy-small    --memory lazy on the small cache, its files in the page cache: what the lazy path itself costs
  lazy-large    --memory lazy on the large cache inside a memory cgroup of --limit-mb (page cache included), after
                dropping the page cache: every epoch reads from disk
  lazy-packed   the same on the large cache packed into one file (`pipeline pack`): one open file instead of one
                part file per video (the layout on disk)
  read-large    a cold read of the large cache's part files, bytes only (the disk's bandwidth), and through
                h5py per video (`features(key)`): the floor under lazy-large
  chunks        cold reads of --chunk-videos videos written with (R, D) chunks for each R of --chunk-rows: the
                whole video (what a lazy reader does), and only the 8 rows of a segment clip (what it would read
                if chunks were small enough to skip the rest)

The memory limit is a cgroup (v1 /sys/fs/cgroup/memory or v2) made for the run, which also bounds the page cache
the process may fill; without one (not root, no controller) the script says so and falls back to
resource.setrlimit(RLIMIT_AS), which bounds the process but not the page cache. The page cache is dropped between
runs when /proc/sys/vm/drop_caches is writable.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import load_average, machine  # bench/common.py, beside this script

import pipeline.data.cache as cache_format
from pipeline.data.cache import open_cache, pack, parts_dir
from pipeline.data.synthetic import synthetic_spec, write_feature_cache

CLASSES = 20
DEFAULT_CHUNK_ROWS = cache_format.CHUNK_ROWS
SEGMENTS = 8  # rows of a segment clip (train-head's default sampling)


def generate(path: Path, videos: int, rows: int, dim: int, chunk_rows: int | None = None) -> None:
    if path.exists():
        return
    if chunk_rows is not None:
        cache_format.CHUNK_ROWS = chunk_rows  # the writer's chunk shape (rows, D): for this bench only
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.0, (CLASSES, dim)).astype(np.float32)
    bank = rng.standard_normal((8192, dim)).astype(np.float32)

    def items():
        for v in range(videos):
            c = v % CLASSES
            start = int(rng.integers(0, len(bank) - rows))
            yield f"class{c:02d}/video_{v:06d}.mp4", means[c] + bank[start : start + rows], f"class{c:02d}", None

    t = time.perf_counter()
    write_feature_cache(path, items(), synthetic_spec(dim), dtype="float16")
    print(f"# wrote {path} ({videos} videos) in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    cache_format.CHUNK_ROWS = DEFAULT_CHUNK_ROWS


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cgroup(limit: int) -> Path | None:
    """A fresh memory cgroup of `limit` bytes (v2 or v1), or None when none can be made here."""
    v2, v1 = (Path("/sys/fs/cgroup"), "memory.max"), (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")
    for root, name in (v2, v1):
        if not (root / name).exists() and not (root / "cgroup.procs").exists():
            continue
        group = root / f"pipeline-lazy-bench-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
            (group / name).write_text(str(limit))
            return group
        except OSError:
            continue
    return None


def train(cache: Path, out: Path, memory: str, epochs: int, limit: int | None) -> tuple[float, int]:
    """Seconds per epoch (mean of the epochs after the first) of a train-head process, and the peak RSS."""
    args = [
        *(str(Path(sys.executable).with_name("pipeline")), "train-head", str(cache), "--out", str(out)),
        *("--memory", memory, "--epochs", str(epochs), "--patience", "0", "--no-plots", "-q", "--overwrite"),
    ]
    group = cgroup(limit) if limit else None
    preexec = None
    if limit and group is None:
        print("# no memory cgroup here: falling back to RLIMIT_AS (the page cache is not bounded)", file=sys.stderr)

        def preexec():
            resource.setrlimit(resource.RLIMIT_AS, (limit * 4, limit * 4))  # torch maps more than it touches

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(args, env=env, preexec_fn=preexec, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if group is not None:
        (group / "cgroup.procs").write_text(str(proc.pid))  # before it reads the cache (it starts by importing)
    output = proc.communicate()[0].decode()
    usage = 0
    if group is not None:
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            if (group / name).exists():
                usage = int((group / name).read_text())
        group.rmdir()
    if proc.returncode != 0:
        killed = " (killed: the limit is below what torch itself needs, about 0.5 GiB)" if proc.returncode < 0 else ""
        raise RuntimeError(f"train-head exited with {proc.returncode}{killed}:\n{output}")
    with open(out / "metrics.csv") as f:
        seconds = [float(r["train_seconds"]) for r in csv.DictReader(f)]
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds)), usage


def read_cold(cache: Path) -> tuple[float, float, int]:
    """(MB/s reading the part files' bytes, MB/s reading through h5py per video, bytes), each after a cache drop."""
    files = [p for p in parts_dir(cache).rglob("*.h5")]
    drop_caches()
    t = time.perf_counter()
    total = 0
    for p in files:
        with open(p, "rb") as f:
            total += len(f.read())
    raw = time.perf_counter() - t
    drop_caches()
    c = open_cache(cache)
    t = time.perf_counter()
    for key in c.keys():
        c.features(key)
    h5 = time.perf_counter() - t
    return total / raw / 1e6, total / h5 / 1e6, total


def read_chunks(folder: Path, videos: int, rows: int, dim: int, chunk_rows: list[int]) -> None:
    """Cold reads per video: the whole video, and the rows of one segment clip (sorted, one per segment)."""
    import h5py

    rng = np.random.default_rng(0)
    for r in chunk_rows:
        path = folder / f"chunks{r}.h5"
        generate(path, videos, rows, dim, chunk_rows=r)
        c = open_cache(path)
        keys = c.keys()
        parts = [c.part_path(k) for k in keys]
        picks = [np.sort(rng.choice(rows, SEGMENTS, replace=False)) for _ in keys]
        timings = {}
        for what in ("whole", "segment"):
            drop_caches()
            t = time.perf_counter()
            for part, pick in zip(parts, picks, strict=True):
                with h5py.File(part, "r") as f:
                    d = f["features"]
                    d[()] if what == "whole" else d[pick]  # read and checksummed, then dropped
            timings[what] = (time.perf_counter() - t) / len(keys)
        size = sum(p.stat().st_size for p in parts) / len(parts)
        print(
            f"chunks {r:4d} rows  {size / 1e3:6.0f} KB a video  cold read of a whole video "
            f"{1e3 * timings['whole']:6.2f} ms  of one {SEGMENTS}-row segment clip {1e3 * timings['segment']:6.2f} ms",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--videos", type=int, default=12_000)
    ap.add_argument("--rows", type=int, default=180)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--limit-mb", type=int, default=1024, help="memory the lazy run may use, page cache included")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, nargs="*", default=[256, 64, 16], help="chunk heights to compare")
    ap.add_argument("--chunk-videos", type=int, default=2000, help="videos of each chunk-height cache")
    ap.add_argument("--skip", nargs="*", default=[], help="steps not to run (names as above)")
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    large, small = args.dir / "large.h5", args.dir / "small.h5"
    generate(large, args.videos, args.rows, args.dim)
    generate(small, args.videos // 4, args.rows, args.dim)
    size = sum(p.stat().st_size for p in parts_dir(large).rglob("*.h5"))
    limit = args.limit_mb * 2**20
    print(f"# {machine()}; load {load_average()}")
    print(f"# large cache {size / 1e9:.2f} GB = {size / limit:.1f}x the {args.limit_mb} MiB limit", end="")
    print(f"; {args.epochs} epochs, train seconds per epoch from metrics.csv (the first epoch left out)")
    rows_large, rows_small = args.videos * args.rows, (args.videos // 4) * args.rows
    results = {}
    packed = args.dir / "large-packed.h5"
    if "lazy-packed" not in args.skip and not packed.exists():
        t = time.perf_counter()
        pack(large, packed)
        print(f"# packed the large cache in {time.perf_counter() - t:.0f} s", flush=True)
    for name, cache, memory, rows, limited in (
        ("ram-small", small, "ram", rows_small, False),
        ("lazy-small", small, "lazy", rows_small, False),
        ("lazy-large", large, "lazy", rows_large, True),
        ("lazy-packed", packed, "lazy", rows_large, True),
    ):
        if name in args.skip:
            continue
        dropped = drop_caches() if limited else False
        sec, peak = train(cache, args.dir / f"run-{name}", memory, args.epochs, limit if limited else None)
        results[name] = rows / sec
        note = f"  peak {peak / 2**20:.0f} MiB in the cgroup" if peak else ""
        note += "  (page cache dropped first)" if dropped else ""
        print(f"{name:11s} {sec:7.2f} s/epoch  {rows / sec / 1e3:8.1f} k rows/s{note}", flush=True)
    if "read-large" not in args.skip:
        raw, h5, total = read_cold(large)
        print(f"read-large  {raw:7.0f} MB/s raw bytes  {h5:7.0f} MB/s through h5py per video  ({total / 1e9:.2f} GB)")
        bytes_per_row = args.dim * 2
        print(f"disk floor for lazy-large: {h5 * 1e6 / bytes_per_row / 1e3:.1f} k rows/s (h5py cold read)")
    base = results.get("ram-small")
    for name in ("lazy-small", "lazy-large", "lazy-packed"):
        if base and name in results:
            print(f"{name} / ram-small: {results[name] / base:.2f}x the in-memory speed")
    if "chunks" not in args.skip:
        read_chunks(args.dir, args.chunk_videos, args.rows, args.dim, args.chunk_rows)


if __name__ == "__main__":
    main()
