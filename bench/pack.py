"""What `pipeline pack` costs on a UCF101-sized cache, and reading a packed cache against its parts.

    python bench/pack.py                          # 9,500 videos x ~180 x 2048 float16 (~6.5 GB), temp folder
    python bench/pack.py --videos 1000 --dir /scratch/bench     # a quick run, elsewhere

Generates a cache of parts (not timed as a result, only reported), then times `pack(cache, -o packed.h5)` and
a full read of every video's features through `open_cache` from each layout. The page cache is dropped between
steps only when the script runs as root and /proc/sys/vm/drop_caches is writable (`--cold`); otherwise reads
may hit memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine  # bench/common.py, beside this script

from pipeline.data.cache import open_cache, pack
from pipeline.data.synthetic import synthetic_spec, write_feature_cache


def generate(path: Path, videos: int, dim: int, seed: int = 0) -> None:
    """`videos` sequences of 120..240 rows (mean 180), float16, slices of one random bank (fast to make)."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((8192, dim)).astype(np.float32)

    def rows():
        for v in range(videos):
            t = int(rng.integers(120, 241))
            start = int(rng.integers(0, len(bank) - t))
            yield (
                f"class{v % 101:03d}/video_{v:05d}.avi",
                bank[start : start + t],
                f"class{v % 101:03d}",
                None,
            )

    write_feature_cache(path, rows(), synthetic_spec(dim))


def drop_caches(cold: bool) -> None:
    if not cold:
        return
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    cache = open_cache(path)
    n = 0
    for key in cache:
        n += cache.features(key).nbytes
    cache.close()
    return time.perf_counter() - started, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=9_500)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dir", type=Path, default=None, help="working folder [default: a temporary one, removed]")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each step (root only)")
    ap.add_argument("--reuse", action="store_true", help="keep a cache already generated in --dir")
    args = ap.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_pack_"))
    work.mkdir(parents=True, exist_ok=True)
    cache, packed = work / "cache.h5", work / "packed.h5"
    try:
        print(machine(), flush=True)
        started = time.perf_counter()
        if not (args.reuse and cache.exists()):
            generate(cache, args.videos, args.dim)
        packed.unlink(missing_ok=True)
        parts_bytes = sum(p.stat().st_size for p in Path(str(cache) + ".parts").rglob("*.h5"))
        index = open_cache(cache)
        rows = sum(index.num_frames(k) for k in index)
        print(
            f"generated {args.videos} videos, {rows} rows x {args.dim} float16, "
            f"{parts_bytes / 1e9:.2f} GB of parts "
            f"in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

        drop_caches(args.cold)
        result = pack(cache, packed)
        gb = result.bytes / 1e9
        print(
            f"pack: {result.seconds:.1f}s for {gb:.2f} GB ({gb / result.seconds:.2f} "
            f"GB/s, {result.videos / result.seconds:.0f} videos/s)",
            flush=True,
        )

        for name, path in (("parts", cache), ("packed", packed)):
            drop_caches(args.cold)
            seconds, nbytes = read_all(path)
            print(f"read every video ({name}): {seconds:.1f}s ({nbytes / 1e9 / seconds:.2f} GB/s)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
