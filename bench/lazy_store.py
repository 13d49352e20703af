"""Training on a cache larger than the memory the process may use: `--memory lazy` under a memory limit against
`--memory ram` on a cache that fits, and where the difference goes.

    python bench/lazy_store.py --dir /tmp/lazy                      # 2.2 GB cache, 1 GiB limit, defaults below
    python bench/lazy_store.py --dir /tmp/lazy --limit-mb 512 --epochs 2

Two caches of the same videos' shape (--rows x --dim float16): a large one (--videos) and a small one (a quarter
of it). Each run is a real `pipeline train-head` process (--epochs, the default head), timed by its own
metrics.csv (train seconds per epoch), reported as rows per second so that the two caches compare:

  ram-small     --memory ram on the small cache (it fits): the in-memory speed
  lazy-small    --memory lazy on the small cache, its files in the page cache: what the lazy path itself costs
  lazy-large    --memory lazy on the large cache inside a memory cgroup of --limit-mb (page cache included), after
                dropping the page cache: every epoch reads from disk
  read-large    a cold read of the large cache's part files, bytes only (the disk's bandwidth), and through
                h5py per video (`features(key)`): the floor under lazy-large

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

from pipeline.data.cache import open_cache, parts_dir
from pipeline.data.synthetic import synthetic_spec, write_feature_cache

CLASSES = 20


def generate(path: Path, videos: int, rows: int, dim: int) -> None:
    if path.exists():
        return
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--videos", type=int, default=12_000)
    ap.add_argument("--rows", type=int, default=180)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--limit-mb", type=int, default=1024, help="memory the lazy run may use, page cache included")
    ap.add_argument("--epochs", type=int, default=3)
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
    for name, cache, memory, rows, limited in (
        ("ram-small", small, "ram", rows_small, False),
        ("lazy-small", small, "lazy", rows_small, False),
        ("lazy-large", large, "lazy", rows_large, True),
    ):
        dropped = drop_caches() if limited else False
        sec, peak = train(cache, args.dir / f"run-{name}", memory, args.epochs, limit if limited else None)
        results[name] = rows / sec
        note = f"  peak {peak / 2**20:.0f} MiB in the cgroup" if peak else ""
        note += "  (page cache dropped first)" if dropped else ""
        print(f"{name:11s} {sec:7.2f} s/epoch  {rows / sec / 1e3:8.1f} k rows/s{note}", flush=True)
    raw, h5, total = read_cold(large)
    print(f"read-large  {raw:7.0f} MB/s raw bytes  {h5:7.0f} MB/s through h5py per video  ({total / 1e9:.2f} GB)")
    print(f"lazy-large / ram-small: {results['lazy-large'] / results['ram-small']:.2f}x the in-memory speed")
    print(f"lazy-small / ram-small: {results['lazy-small'] / results['ram-small']:.2f}x (the lazy path, warm)")
    bytes_per_row = args.dim * 2
    print(f"disk floor for lazy-large: {h5 * 1e6 / bytes_per_row / 1e3:.1f} k rows/s (h5py cold read)")


if __name__ == "__main__":
    main()
